"""weights.gguf_file against the gguf package's GGUFReader, the oracle: the same metadata
values, and tensors with the same bytes, types, shapes and array layout."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.fixtures.tiny import tiny_model_dir
from tests.fixtures.tiny_gguf import write_gguf, write_wide_gguf
from weights import WeightsError
from weights.gguf_file import read_gguf_file

Q = gguf.GGMLQuantizationType


def every_value_type(path: Path) -> Path:
    """Every GGUF value type, arrays of numbers, strings and arrays, a 64-byte alignment,
    and F32, F16, BF16 and Q8_0 tensors of several ranks."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for kind, value in [
        ("uint8", 200), ("int8", -5), ("uint16", 60000), ("int16", -30000),
        ("uint32", 4_000_000_000), ("int32", -2_000_000_000), ("uint64", 2**63 + 5),
        ("int64", -(2**62)), ("float32", 0.1), ("float64", 0.1), ("bool", True),
        ("string", "naïve 日本語 🤖"),
    ]:  # fmt: skip
        getattr(w, f"add_{kind}")(f"test.{kind}", value)
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.25])
    w.add_array("test.strings", ["", "a", "ü" * 300])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(2, 3, 4)).astype(np.float16))
    bf16 = gguf.quants.quantize(rng.normal(size=(4, 8)).astype(np.float32), Q.BF16)
    w.add_tensor("bf16", bf16, raw_dtype=Q.BF16)
    q8 = gguf.quants.quantize(rng.normal(size=(2, 64)).astype(np.float32), Q.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=Q.Q8_0)
    w.add_tensor("vector", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gguf_file")
    return [
        every_value_type(root / "types.gguf"),
        write_gguf(tiny_model_dir("gemma3"), root / "gemma3.gguf", "gemma3", byte_level=False),
        write_gguf(tiny_model_dir("qwen2"), root / "qwen2.gguf", "qwen2", byte_level=True),
        write_wide_gguf(root / "wide.gguf"),  # K-quant blocks
    ]


def test_metadata_and_tensors_are_gguf_reader_s(files):
    for path in files:
        meta, tensors = read_gguf_file(path)
        reader = gguf.GGUFReader(path)
        want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert meta == want, path
        assert [type(v) for v in meta.values()] == [type(v) for v in want.values()], path
        assert len(tensors) == len(reader.tensors), path
        for ours, theirs in zip(tensors, reader.tensors, strict=True):
            assert (ours.name, ours.tensor_type) == (theirs.name, theirs.tensor_type)
            assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
            assert (ours.data.shape, ours.data.dtype) == (theirs.data.shape, theirs.data.dtype)
            assert ours.data.tobytes() == np.asarray(theirs.data).tobytes(), ours.name
            assert not ours.data.flags.writeable  # a view of the mapped file
    meta, tensors = read_gguf_file(files[0])
    assert meta["general.alignment"] == 64 and meta["test.string"] == "naïve 日本語 🤖"
    assert meta["test.strings"] == ["", "a", "ü" * 300]
    got = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in tensors}
    assert got["vector"].tolist() == list(range(7))


def test_a_file_cut_anywhere_is_one_error(files, tmp_path):
    """Every prefix of a small file (header, metadata, tensor infos, data) is refused with
    the same sentence, never another exception."""
    data = files[0].read_bytes()
    path = tmp_path / "cut.gguf"
    message = (
        f"{path} is not a complete GGUF file: it ends before the data its header describes, "
        "or is not a GGUF file at all; download it again."
    )
    for size in [*range(0, 600, 3), *range(600, len(data), 61)]:
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError) as err:
            read_gguf_file(path)
        assert str(err.value) == message, size
