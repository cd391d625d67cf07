"""A model folder's weights under canonical names, checked against its config, without copies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ModelConfig, load_config
from .errors import CheckpointError
from .safetensors_file import MODEL_DTYPES, SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
# Where a decoder's tensors live in each checkpoint layout, most specific first: multimodal
# Gemma-3 as transformers 5 names it in memory, as the Hub stores it (`language_model.model.*`,
# with the head at `language_model.lm_head.weight`), and plain causal LMs. Names that keep no
# canonical form after this (vision tower, projector) are not the decoder's and are ignored.
PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")


def sanitize(name: str) -> str:
    """Checkpoint name -> canonical name (`layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def shard_paths(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index lists, or model.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e}); re-download the model."
            ) from None
        paths = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for path in paths:
            if not path.is_file():
                raise CheckpointError(
                    f"shard {path.name} listed in {INDEX_FILE} is missing from {model_dir}; re-download the model."
                )
        return paths
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{model_dir} has no model.safetensors or {INDEX_FILE}; point to a Hugging Face folder with safetensors weights."
    )


class Checkpoint:
    """`tensor(name)` returns a read-only view into the mapped shard, checked for shape and dtype."""

    def __init__(self, model_dir: Path, config: ModelConfig, files: list[SafetensorsFile]):
        self.model_dir = model_dir
        self.config = config
        self.files = files
        self.shapes = config.tensor_shapes()
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in files:
            for raw in f.names():
                name = sanitize(raw)
                if name in self.shapes:
                    self._where[name] = (f, raw)

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Read config.json and map every safetensors file of a Hugging Face model folder."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        return cls(model_dir, config, [SafetensorsFile(p) for p in shard_paths(model_dir)])

    def tensor(self, name: str) -> np.ndarray:
        """The tensor under its canonical name (see `ModelConfig.tensor_shapes`), without a copy."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "embed_tokens.weight"  # tied head: the same bytes
        if name not in self.shapes:
            raise KeyError(f"{name!r} is not a tensor of a {self.config.family} model")
        if name not in self._where:
            raise CheckpointError(
                f"tensor {name!r} is missing from the checkpoint in {self.model_dir}; "
                "the weights do not match config.json — re-download the model."
            )
        f, raw = self._where[name]
        dtype, shape = f.info(raw)
        if dtype not in MODEL_DTYPES.values():
            raise CheckpointError(
                f"tensor {raw!r} in {f.path.name} is {dtype}, but weights must be bfloat16, float16 or float32; "
                "re-export the checkpoint in a floating-point dtype."
            )
        if shape != self.shapes[name]:
            raise CheckpointError(
                f"tensor {raw!r} in {f.path.name} has shape {list(shape)} but config.json implies "
                f"{list(self.shapes[name])}; the weights and config.json do not belong together."
            )
        return f.tensor(raw)

    def release(self, name: str) -> None:
        """Drop this process's mapped pages of a tensor it has copied (SafetensorsFile.release);
        a tied head's name is ignored, since the embedding table it names is read in place."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return
        if name in self._where:
            f, raw = self._where[name]
            f.release(raw)

    def validate(self) -> None:
        """Every tensor the config needs is present with the right shape and dtype."""
        for name in self.shapes:
            self.tensor(name)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoder's tensors (a tied head counted once; vision tensors not at all)."""
        return sum(f.tensor(raw).nbytes for f, raw in self._where.values())
