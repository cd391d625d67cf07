"""Building from GGUF files of every family, against transformers' own GGUF loading.

Tiny GGUFs are written here from the tiny random checkpoints (tests/fixtures/tiny_gguf.py),
with several tensor types per file, and converted through the path `tools.build FILE.gguf`
takes (`weights.resolve_model`). transformers reads the same files itself
(`from_pretrained(dir, gguf_file=...)`, float32) as the oracle; its weights are rounded to
bfloat16 by torch, as our folder stores them.

Where transformers' GGUF loader does not read what llama.cpp stores or assumes, the oracle is
given it through its config (`oracle_config`): Gemma-3's linear RoPE scaling and query scale
(llama.cpp: head_dim), Llama 3's RoPE scaling (stored as the `rope_freqs` tensor, which
transformers skips), and Qwen3's head_dim (attention.key_length). Everything else (every
tensor, the tokenizer) is transformers' own reading of the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from netdef import NetworkOptions, build_network
from runtime.cpu import CpuBackend, sequence_logits
from runtime.generate import Generator
from runtime.sampling import SamplingParams
from runtime.tokenizer import Tokenizer
from tests.fixtures.tiny import tiny_model_dir
from tests.fixtures.tiny_gguf import write_gguf, write_wide_gguf
from weights import Checkpoint, WeightsError, resolve_model
from weights.gguf_import import gguf_model_dir, open_gguf

# Test model -> (tiny checkpoint, vocabulary style); "wide" is random K-quant blocks.
CASES = {
    "gemma3": ("gemma3", False),
    "llama": ("llama", True),  # Llama 3: byte-level vocabulary, llama3 RoPE scaling
    "llama_spm": ("llama", False),  # Llama 2: sentencepiece vocabulary
    "qwen2": ("qwen2", True),
    "qwen3": ("qwen3", True),
    "wide": (None, True),
}
F32_TOL = 1e-3  # as tests/test_netdef_parity.py: of the largest reference logit
TEXTS = [
    "The capital of France is Paris.",
    "Call me Ishmael. Some years ago -- never mind how long precisely -- having little money",
    "Ünïcödé: naïve café, 日本語, emoji 🤖, \t tabs\n\n\nnewlines   runs      of spaces ",
    "<|im_start|>user\nHi there!<|im_end|>\n<think> and <bos> in the middle<eos>",
    "    ",
    "",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each test model as a GGUF file in a folder of its own."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for case, (family, byte_level) in CASES.items():
        (root / case).mkdir()
        path = root / case / f"{case}.gguf"
        if family is None:
            out[case] = write_wide_gguf(path)
        else:
            out[case] = write_gguf(tiny_model_dir(family), path, family, byte_level=byte_level)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def converted(files, cache) -> dict[str, Path]:
    return {case: gguf_model_dir(path, cache, progress=False) for case, path in files.items()}


def oracle_config(path: Path):
    """transformers' config of the GGUF, with what its loader misses (module docstring)."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch == "gemma3":
        config.query_pre_attn_scalar = meta["gemma3.attention.key_length"]
        config.rope_parameters["full_attention"] = {
            "rope_type": "linear",
            "rope_theta": config.rope_parameters["full_attention"]["rope_theta"],
            "factor": meta["gemma3.rope.scaling.factor"],
        }
    if arch == "llama" and any(t.name == "rope_freqs.weight" for t in reader.tensors):
        source = json.loads((tiny_model_dir("llama") / "config.json").read_text())
        config.rope_parameters = source["rope_parameters"]
    if arch == "qwen3":
        config.head_dim = meta["qwen3.attention.key_length"]
    return config


@pytest.fixture(scope="module")
def oracles(files) -> dict:
    models = {}
    for case, path in files.items():
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=oracle_config(path), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
        models[case] = model
    return models


def test_every_tensor_matches(converted, oracles):
    for case, folder in converted.items():
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
        theirs = oracles[case].state_dict()
        assert sorted(ours) == sorted(theirs), case
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), (case, name)


def test_config_matches(converted, oracles):
    for case, folder in converted.items():
        ours = AutoConfig.from_pretrained(folder)
        theirs = oracles[case].config
        for field in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rope_parameters",
            "tie_word_embeddings",
            "sliding_window",
            "layer_types",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            assert getattr(ours, field, None) == getattr(theirs, field, None), (case, field)
        assert np.float32(ours.rms_norm_eps) == np.float32(theirs.rms_norm_eps), case
        heads = ours.hidden_size // ours.num_attention_heads  # Qwen2 configs leave head_dim out
        assert (ours.head_dim or heads) == (getattr(theirs, "head_dim", None) or heads), case
    llama = json.loads((converted["llama"] / "config.json").read_text())
    source = json.loads((tiny_model_dir("llama") / "config.json").read_text())
    assert llama["rope_scaling"] == {
        k: v for k, v in source["rope_parameters"].items() if k != "rope_theta"
    }  # recovered from rope_freqs: factor 8, low 1, high 4, original context 32


def test_executor_logits_match_transformers(converted, oracles):
    """float32 network on the CPU executor, prefill then decode through the KV cache."""
    rng = np.random.default_rng(0)
    for case, folder in converted.items():
        seq = rng.integers(0, 512, 20).tolist()
        options = NetworkOptions(dtype="float32", max_seq_len=24, max_prefill=9, all_logits=True)
        model = CpuBackend(build_network(Checkpoint.open(folder), options))
        ours = sequence_logits(model, [seq], 9)[0]
        with torch.no_grad():
            ref = oracles[case](torch.tensor([seq])).logits[0].numpy()
        err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
        assert err <= F32_TOL * scale, f"{case}: max |diff| {err:.3g} > {F32_TOL} x {scale:.3g}"
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1), err_msg=case)


def test_greedy_is_token_exact(converted, oracles):
    prompt = "Call me Ishmael. Some years ago"
    for case, folder in converted.items():
        tokenizer = Tokenizer.from_dir(folder)
        options = NetworkOptions(dtype="float32", max_seq_len=40, max_prefill=8)
        model = CpuBackend(build_network(Checkpoint.open(folder), options))
        run = Generator(model, tokenizer, eos_ids=[]).start(
            [prompt], SamplingParams(max_new_tokens=12)
        )
        list(run)
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            full = oracles[case].generate(
                ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert run.completions[0].token_ids == full[0, ids.shape[1] :].tolist(), case


@pytest.mark.parametrize("case", ["gemma3", "llama", "llama_spm", "qwen2"])
def test_tokenizer_matches(case, files, converted):
    path = files[case]
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    mine = Tokenizer.from_dir(converted[case])  # what the runtime reads
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert mine.encode(text) == ids, text
        assert (
            mine.encode(text, add_special_tokens=False)
            == theirs(text, add_special_tokens=False).input_ids
        ), text
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    assert mine.encode("<|im_start|>user")[1] == theirs.convert_tokens_to_ids("<|im_start|>")
    chat = [{"role": "user", "content": "Hi there!"}]
    assert mine.encode_chat(chat) == theirs.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def _split(source: Path, path: Path) -> None:
    """`source` rewritten as three parts named as llama.cpp's gguf-split names them."""
    _rewrite(source, path, split_max_tensors=15)


def test_split_file_converts_like_the_whole(files, tmp_path):
    """A GGUF split into parts (gguf's writer, llama.cpp's part names) gives the same folder."""
    _split(files["qwen2"], tmp_path / "qwen2.gguf")
    parts = sorted(p.name for p in tmp_path.glob("*.gguf"))
    assert parts == [f"qwen2-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = gguf_model_dir(files["qwen2"], tmp_path / "cache-a", progress=False)
    split = gguf_model_dir(tmp_path, tmp_path / "cache-b", progress=False)  # the folder
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (split / name).read_bytes() == (whole / name).read_bytes(), name


def test_resolve_model_takes_a_file_or_its_folder(files, cache, monkeypatch, converted):
    monkeypatch.setenv("TRT_NETDEF_CACHE", str(cache))
    assert resolve_model(str(files["qwen3"]), progress=False) == converted["qwen3"]
    assert resolve_model(str(files["qwen3"].parent), progress=False) == converted["qwen3"]


def _error(path: Path, cache: Path) -> str:
    with pytest.raises(WeightsError) as err:
        gguf_model_dir(path, cache, progress=False)
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))
    return str(err.value)


def _rewrite(
    source: Path, path: Path, skip_keys=(), arch: str | None = None, types=None, **writer_args
) -> Path:
    """A copy of a GGUF with some metadata left out, another architecture or tensor types."""
    reader = gguf.GGUFReader(source)
    arch = arch or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path, arch, **writer_args)
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")) or name.startswith(skip_keys):
            continue
        writer.add_key_value(
            name.replace(reader.fields["general.architecture"].contents(), arch),
            field.contents(),
            field.types[0],
            field.types[-1],
        )
    for t in reader.tensors:
        qtype = (types or {}).get(t.name, t.tensor_type)
        data = np.asarray(t.data)
        if qtype != t.tensor_type:
            data = gguf.quants.quantize(gguf.quants.dequantize(data, t.tensor_type), qtype)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture(files, tmp_path):
    path = _rewrite(files["llama"], tmp_path / "phi.gguf", arch="phi3")
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()} is a GGUF file of architecture 'phi3', which is not supported; "
        "supported architectures are gemma3, llama, qwen2, qwen3 (Gemma-3, Llama 2/3.x, "
        "Qwen2/2.5, Qwen3)."
    )


def test_tensor_type_we_cannot_dequantize(files, tmp_path):
    """IQ4_NL (an importance-matrix type) is not among the supported types."""
    reader = gguf.GGUFReader(files["qwen2"])
    writer = gguf.GGUFWriter(tmp_path / "iq.gguf", "qwen2")
    for name, field in reader.fields.items():
        if not name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":  # 128 rows of 64: 2 blocks of 32 (18 bytes) each
            data = np.zeros((128, 2 * 18), np.uint8)
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "iq.gguf"
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()}: tensor 'blk.1.ffn_up.weight' has type IQ4_NL, which is not "
        "supported; supported types are F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, "
        "Q3_K, Q4_K, Q5_K, Q6_K (re-quantize the model with llama-quantize to one of them)."
    )


def test_truncated_file(files, tmp_path):
    path = tmp_path / "cut.gguf"
    data = files["qwen2"].read_bytes()
    for size in (len(data) - 1000, 100):  # inside the tensor data, inside the header
        path.write_bytes(data[:size])
        assert _error(path, tmp_path / "cache") == (
            f"{path.resolve()} is not a complete GGUF file: it ends before the data its header "
            "describes, or is not a GGUF file at all; download it again."
        )


def test_split_file_with_a_missing_part(files, tmp_path):
    _split(files["qwen2"], tmp_path / "m.gguf")
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    first = (tmp_path / "m-00001-of-00003.gguf").resolve()
    assert _error(first, tmp_path / "cache") == (
        f"{first} is split into 3 parts, but part 2 (m-00002-of-00003.gguf) is missing from "
        f"{first.parent}; download every part into the same folder."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-00001-of-00003.gguf",
        "m-00003-of-00003.gguf",
    ]


def test_no_tokenizer(files, tmp_path):
    path = _rewrite(files["qwen3"], tmp_path / "bare.gguf", skip_keys=("tokenizer.",))
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()} has no tokenizer (no tokenizer.ggml.tokens metadata), so text cannot "
        "be encoded for it; use a GGUF file that embeds its tokenizer (llama.cpp's "
        "convert_hf_to_gguf.py writes one)."
    )


def test_folder_with_several_models(files, tmp_path):
    for case in ("qwen2", "qwen3"):
        shutil.copy(files[case], tmp_path)
    assert _error(tmp_path, tmp_path / "cache") == (
        f"{tmp_path.resolve()} holds 2 GGUF models (qwen2.gguf, qwen3.gguf); pass the path of "
        "the one to build."
    )


def test_build_cli_from_a_gguf_file(files, converted, cache, tmp_path, monkeypatch, capsys):
    """`python -m tools.build FILE.gguf` with the real TensorRT-RTX builder: the artifact holds
    the converted folder's weights (checksum), config and tokenizer."""
    from netdef.artifact import files_sha256, read_metadata
    from tools import build as build_tool

    monkeypatch.setenv("TRT_NETDEF_CACHE", str(cache))
    out = tmp_path / "artifact"
    monkeypatch.chdir(files["qwen3"].parent)  # given relative, recorded absolute
    args = [files["qwen3"].name, "--target", "sm89", "--max-seq-len", "32", "--output", str(out)]
    assert build_tool.main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    meta = read_metadata(out)
    folder = converted["qwen3"]
    assert meta["model"]["name"] == str(files["qwen3"].resolve())
    assert meta["model"]["path"] == str(folder)
    assert meta["weights_sha256"] == files_sha256([folder / "model.safetensors"])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name


def test_missing_metadata_fails_before_any_work(files, tmp_path):
    """Said with the file's path, before the cache is touched (it was said mid-conversion)."""
    path = _rewrite(files["qwen3"], tmp_path / "bare.gguf", skip_keys=("qwen3.block_count",))
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()} has no 'qwen3.block_count' metadata, which a qwen3 model needs; the "
        "file is incomplete or was written by an unsupported converter: convert the model again "
        "with llama.cpp's convert_hf_to_gguf.py."
    )


def test_metadata_that_is_not_utf8(files, tmp_path):
    """GGUFReader decodes strings only when asked: a damaged one raised UnicodeDecodeError."""
    data = files["qwen2"].read_bytes()
    assert data.count(b"<think>") == 1  # the user-defined token, in tokenizer.ggml.tokens
    path = tmp_path / "bad.gguf"
    path.write_bytes(data.replace(b"<think>", b"<th\xffnk>"))
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()} is damaged: its metadata 'tokenizer.ggml.tokens' is not UTF-8 text, "
        "as every GGUF string is; download it again."
    )


def test_a_converted_file_is_read_once(files, cache, converted, tmp_path, monkeypatch):
    """Reading Gemma-3's 262k-token vocabulary took GGUFReader about 10 s: a build reusing the
    conversion spent that on every run, and a conversion read the file twice."""
    from weights import gguf_import

    real, reads = gguf_import.read_gguf_file, []
    monkeypatch.setattr(
        gguf_import, "read_gguf_file", lambda path: reads.append(path) or real(path)
    )
    assert gguf_model_dir(files["qwen3"], cache, progress=False) == converted["qwen3"]
    assert reads == []
    gguf_model_dir(files["qwen3"], tmp_path / "cache", progress=False)
    assert reads == [files["qwen3"].resolve()]


def test_a_folder_with_only_later_parts_of_a_split_file(files, tmp_path):
    _split(files["qwen2"], tmp_path / "m.gguf")
    (tmp_path / "m-00001-of-00003.gguf").unlink()
    assert _error(tmp_path, tmp_path / "cache") == (
        f"{tmp_path} holds parts of a split GGUF file but not its first part "
        "(m-00001-of-00003.gguf); download every part into that folder."
    )


def test_a_file_without_an_architecture(files, tmp_path):
    """A GGUF without general.architecture (an adapter, a vocabulary) said "architecture None"."""
    path = tmp_path / "bare.gguf"
    reader = gguf.GGUFReader(files["qwen3"])
    writer = gguf.GGUFWriter(path, "qwen3")
    del writer.kv_data[0]["general.architecture"]
    for name, field in reader.fields.items():
        if not name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _error(path, tmp_path / "cache") == (
        f"{path.resolve()} has no general.architecture metadata, so it is not a model's GGUF "
        "file (a LoRA adapter or a vocabulary alone, say); pass the model's file."
    )


def test_an_unreadable_file_is_one_error(tmp_path):
    (tmp_path / "dir.gguf").mkdir()  # unreadable as a file; root reads past chmod 000
    with pytest.raises(WeightsError) as err:
        open_gguf(tmp_path / "dir.gguf")
    assert (
        str(err.value) == f"cannot read {tmp_path / 'dir.gguf'} (Is a directory); check the file."
    )
