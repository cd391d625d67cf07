"""weights.checkpoint and weights.safetensors_file: exact zero-copy reads, shards, every error.

Broken files are made the way they happen: the official writer (`safetensors.torch`) for
well-formed files that do not fit the config, byte-level edits for damaged ones.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.tiny import TINY_MODELS, decoder_of, tiny_model_dir
from weights import Checkpoint, CheckpointError
from weights.checkpoint import sanitize

FIX = "re-download model.safetensors (it is truncated or corrupt)"


def mapped_buffer(arr: np.ndarray) -> object:
    """The object at the end of an array's `.base` chain: what really holds its bytes."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_tensor_reads_exact_and_zero_copy(name, hf_model):
    ckpt = Checkpoint.open(tiny_model_dir(name))
    ckpt.validate()
    model = hf_model(tiny_model_dir(name), torch.bfloat16)
    params = dict(decoder_of(model).named_parameters())
    params["lm_head.weight"] = model.lm_head.weight
    assert set(params) == set(ckpt.config.tensor_shapes()) | {"lm_head.weight"}
    for canonical in params:
        ours = ckpt.tensor(canonical)
        assert ours.dtype == ml_dtypes.bfloat16
        assert not ours.flags.writeable and not ours.flags.owndata
        assert isinstance(mapped_buffer(ours), mmap.mmap)
        assert np.shares_memory(ours, ckpt.tensor(canonical))
        theirs = params[canonical].detach().view(torch.int16).numpy()
        np.testing.assert_array_equal(ours.view(np.int16), theirs)  # bit for bit
    tied = np.shares_memory(ckpt.tensor("lm_head.weight"), ckpt.tensor("embed_tokens.weight"))
    assert tied == ckpt.config.tie_word_embeddings
    assert ckpt.nbytes == sum(ckpt.tensor(n).nbytes for n in ckpt.config.tensor_shapes())
    assert ckpt.model_dir == tiny_model_dir(name)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_only_non_decoder_tensors_are_left_over(name):
    """Every stored name either has a canonical form or belongs to the vision side."""
    ckpt = Checkpoint.open(tiny_model_dir(name))
    stored = {raw: sanitize(raw) for f in ckpt.files for raw in f.names()}
    required = set(ckpt.config.tensor_shapes())
    assert required <= set(stored.values())
    left_over = {raw for raw, canonical in stored.items() if canonical not in required}
    vision = {
        raw for raw in left_over if raw.startswith(("vision_tower.", "multi_modal_projector."))
    }
    assert left_over == vision and bool(vision) == (name == "gemma3_mm")


def copy_fixture(name: str, dest: Path) -> Path:
    shutil.copytree(tiny_model_dir(name), dest)
    return dest


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite a safetensors file with the official writer after `edit` changed its tensors."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_transformers5_multimodal_names(tmp_path):
    """`model.language_model.*`, as transformers 5 names a multimodal Gemma-3 in memory."""
    folder = copy_fixture("gemma3_mm", tmp_path / "mm")

    def rename(tensors):
        for raw in list(tensors):
            if raw.startswith("language_model.model."):
                new = "model.language_model." + raw.removeprefix("language_model.model.")
                tensors[new] = tensors.pop(raw)

    rewrite_tensors(folder / "model.safetensors", rename)
    renamed, original = Checkpoint.open(folder), Checkpoint.open(tiny_model_dir("gemma3_mm"))
    renamed.validate()
    assert any(raw.startswith("model.language_model.") for raw in renamed.files[0].names())
    for canonical in original.config.tensor_shapes():
        np.testing.assert_array_equal(renamed.tensor(canonical), original.tensor(canonical))


@pytest.mark.parametrize("name", ["qwen3", "gemma3_mm"])
def test_sharded_checkpoint_reads_like_the_single_file(name, hf_model, tmp_path):
    model = hf_model(tiny_model_dir(name), torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(shards) > 2
    sharded, single = Checkpoint.open(tmp_path), Checkpoint.open(tiny_model_dir(name))
    sharded.validate()
    assert sorted(f.path for f in sharded.files) == shards
    assert sharded.config == single.config and sharded.nbytes == single.nbytes
    for canonical in single.config.tensor_shapes():
        assert sharded.tensor(canonical).shape == single.tensor(canonical).shape
        np.testing.assert_array_equal(sharded.tensor(canonical), single.tensor(canonical))


def test_missing_shard(hf_model, tmp_path):
    hf_model(tiny_model_dir("qwen3"), torch.bfloat16).save_pretrained(
        tmp_path, max_shard_size="100KB"
    )
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(tmp_path)
    assert str(err.value) == (
        f"shard {victim.name} listed in model.safetensors.index.json is missing from {tmp_path}; "
        "re-download the model."
    )


def test_invalid_index(tmp_path):
    folder = copy_fixture("qwen3", tmp_path / "qwen3")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    assert str(err.value) == (
        f"{folder / 'model.safetensors.index.json'} is not a valid safetensors index "
        "('weight_map'); re-download the model."
    )


def test_no_safetensors(tmp_path):
    folder = copy_fixture("llama", tmp_path / "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder)
    assert str(err.value) == (
        f"{folder} has no model.safetensors or model.safetensors.index.json; "
        "point to a Hugging Face folder with safetensors weights."
    )


# Damaged files --------------------------------------------------------------------------------


@pytest.fixture
def llama(tmp_path) -> Path:
    """A private copy of the tiny llama folder, to damage."""
    return copy_fixture("llama", tmp_path / "llama")


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def open_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder).validate()
    return str(err.value)


def test_truncated_file(llama):
    path = llama / "model.safetensors"
    header, data = read_header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    path.write_bytes(path.read_bytes()[:-100])
    assert open_error(llama) == (
        f"{path}: tensor {last!r} claims bytes [{begin}, {end}) for {end - begin} bytes of data, "
        f"but the file holds {len(data) - 100}; {FIX}."
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"\x10\x00\x00", "is too short to be a safetensors file"),
        (
            struct.pack("<Q", 10**9) + b"{}",
            "has a header of 1000000000 bytes but only 10 bytes in all",
        ),
        (struct.pack("<Q", 6) + b'{"a": ', "has an unreadable header"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "has an unreadable header"),
        (struct.pack("<Q", 2) + b"[]", "has an unreadable header"),
    ],
    ids=["empty", "short", "header-beyond-file", "garbage-json", "not-utf8", "not-an-object"],
)
def test_corrupt_header(llama, content, problem):
    path = llama / "model.safetensors"
    path.write_bytes(content)
    assert open_error(llama) == f"{path} {problem}; {FIX}."


def test_offsets_inconsistent_with_dtype_and_shape(llama):
    path = llama / "model.safetensors"
    header, data = read_header(path)
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["dtype"] = "F32"  # 64 float32 values need 256 bytes, the entry spans 128
    write_raw(path, header, data)
    assert open_error(llama) == (
        f"{path}: tensor '{name}' claims bytes [{begin}, {end}) for 256 bytes of data, "
        f"but the file holds {len(data)}; {FIX}."
    )


def test_invalid_header_entry(llama):
    path = llama / "model.safetensors"
    header, data = read_header(path)
    del header["model.norm.weight"]["shape"]
    write_raw(path, header, data)
    entry = header["model.norm.weight"]
    assert open_error(llama) == (
        f"{path}: tensor 'model.norm.weight' has an invalid header entry {entry!r}; {FIX}."
    )


def test_overlapping_tensors_are_refused_as_safetensors_refuses_them(llama, tmp_path, capsys):
    """Two entries over the same bytes: `tools.build` stops before building, as the
    `safetensors` library itself refuses to load the file."""
    from tools import build as build_tool

    path = llama / "model.safetensors"
    header, data = read_header(path)
    first, second = (
        f"model.layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")
    )
    begin, end = header[first]["data_offsets"]
    header[second]["data_offsets"] = [begin, end]
    write_raw(path, header, data)
    with pytest.raises(Exception, match="offset"):
        load_file(path)
    out_dir = tmp_path / "artifact"
    args = [str(llama), "--target", "sm89", "--max-seq-len", "32", "--output", str(out_dir)]
    assert build_tool.main(args) == 1
    assert capsys.readouterr().err == (
        f"error: {path}: tensor {second!r} starts at byte {begin} of the data, but the tensors "
        f"before it end at byte {end} (they overlap or leave a gap); {FIX}.\n"
    )
    assert not out_dir.exists()


def test_bytes_no_tensor_claims_are_refused(llama):
    path = llama / "model.safetensors"
    header, data = read_header(path)
    write_raw(path, header, data + b"\0" * 8)
    assert open_error(llama) == (
        f"{path}: its tensors cover {len(data)} bytes of data, but the file holds "
        f"{len(data) + 8}; {FIX}."
    )


# Well-formed files that do not fit the config -------------------------------------------------


def test_wrong_shape(llama):
    name = "model.layers.0.self_attn.k_proj.weight"

    def transpose(tensors):
        tensors[name] = tensors[name].T.contiguous()

    rewrite_tensors(llama / "model.safetensors", transpose)
    assert open_error(llama) == (
        f"tensor '{name}' in model.safetensors has shape [64, 16] but config.json implies [16, 64]; "
        "the weights and config.json do not belong together."
    )


def test_wrong_dtype(llama):
    name = "model.norm.weight"

    def to_int32(tensors):
        tensors[name] = tensors[name].to(torch.int32)

    rewrite_tensors(llama / "model.safetensors", to_int32)
    assert open_error(llama) == (
        f"tensor '{name}' in model.safetensors is int32, but weights must be bfloat16, float16 or "
        "float32; re-export the checkpoint in a floating-point dtype."
    )


def test_unknown_dtype(llama):
    """An FP8 checkpoint: a dtype the reader has no NumPy type for."""
    name = "model.layers.1.mlp.up_proj.weight"

    def to_fp8(tensors):
        tensors[name] = tensors[name].to(torch.float8_e4m3fn)

    rewrite_tensors(llama / "model.safetensors", to_fp8)
    assert open_error(llama) == (
        f"{llama / 'model.safetensors'}: tensor '{name}' has dtype 'F8_E4M3', which is not supported "
        "(known: BF16, F16, F32, F64, I64, I32, I16, I8, U8, BOOL); use a checkpoint stored in BF16, "
        "F16 or F32."
    )


def test_missing_tensor(llama):
    def drop(tensors):
        del tensors["model.layers.2.mlp.up_proj.weight"]

    rewrite_tensors(llama / "model.safetensors", drop)
    ckpt = Checkpoint.open(llama)
    ckpt.tensor("layers.2.mlp.down_proj.weight")  # the rest still reads
    assert open_error(llama) == (
        f"tensor 'layers.2.mlp.up_proj.weight' is missing from the checkpoint in {llama}; "
        "the weights do not match config.json — re-download the model."
    )


def test_untied_head_is_required(llama):
    rewrite_tensors(llama / "model.safetensors", lambda tensors: tensors.pop("lm_head.weight"))
    assert open_error(llama) == (
        f"tensor 'lm_head.weight' is missing from the checkpoint in {llama}; "
        "the weights do not match config.json — re-download the model."
    )


def test_float16_and_float32_checkpoints_read_as_stored(llama):
    def mixed(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
        tensors["lm_head.weight"] = tensors["lm_head.weight"].half()

    reference = Checkpoint.open(tiny_model_dir("llama"))
    rewrite_tensors(llama / "model.safetensors", mixed)
    ckpt = Checkpoint.open(llama)
    ckpt.validate()
    assert ckpt.tensor("norm.weight").dtype == np.float32
    assert ckpt.tensor("lm_head.weight").dtype == np.float16
    np.testing.assert_array_equal(
        ckpt.tensor("norm.weight"), reference.tensor("norm.weight").astype(np.float32)
    )


def test_gemma3_270m_reads_in_bf16_with_every_tensor_accounted_for(gemma3_270m_dir):
    ckpt = Checkpoint.open(gemma3_270m_dir)
    ckpt.validate()
    stored = {sanitize(name) for f in ckpt.files for name in f.names()}
    assert stored == set(ckpt.config.tensor_shapes())  # nothing missing, nothing left over
    assert {ckpt.tensor(name).dtype for name in stored} == {np.dtype(ml_dtypes.bfloat16)}
    assert ckpt.config.num_layers == 18 and ckpt.config.tie_word_embeddings


def mapped_rss(path: Path) -> int:
    """Bytes of `path`'s mappings resident in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:
            inside = line.endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_release_drops_a_tensors_mapped_pages_and_a_later_read_maps_them_again(tmp_path):
    from weights.safetensors_file import SafetensorsFile

    path = tmp_path / "model.safetensors"
    big = torch.arange(2**20, dtype=torch.float32)  # 4 MiB
    save_file({"small": torch.ones(3), "big": big, "after": torch.full((5,), 2.0)}, path)
    f = SafetensorsFile(path)
    assert float(f.tensor("big").sum(dtype=np.float64)) == float(big.double().sum())
    assert mapped_rss(path) >= 4 * 2**20
    f.release("big")
    assert mapped_rss(path) <= 2 * mmap.PAGESIZE  # only the pages it shares with neighbours
    np.testing.assert_array_equal(f.tensor("small"), np.ones(3, np.float32))
    np.testing.assert_array_equal(f.tensor("after"), np.full(5, 2.0, np.float32))
    np.testing.assert_array_equal(f.tensor("big"), big.numpy())  # mapped again from the file


def test_checkpoint_release_leaves_a_tied_heads_table_mapped(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("gemma3"))
    assert ckpt.config.tie_word_embeddings
    calls = []
    f, raw = ckpt._where["embed_tokens.weight"]
    f.release = calls.append
    ckpt.release("lm_head.weight")
    assert calls == []
    ckpt.release("embed_tokens.weight")
    assert calls == [raw]
