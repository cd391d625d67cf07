"""Shared fixtures: tiny random checkpoints, the real Gemma-3-270M, and transformers oracles."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.fixtures.tiny import tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dir() -> Callable[[str], Path]:
    """`tiny_dir("llama")`: the folder of a tiny random checkpoint (see `TINY_MODELS`)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def gemma3_270m_dir() -> Path:
    """The bundled Gemma-3-270M as a Hugging Face folder (converted once, cached)."""
    from tests.fixtures.gemma270m import gemma3_270m_dir

    return gemma3_270m_dir()


@pytest.fixture(scope="session")
def hf_model() -> Callable[[Path, torch.dtype], PreTrainedModel]:
    """`hf_model(path, torch.float32)`: the transformers model of a folder, in eval mode.

    Loaded once per (path, dtype) for the whole session: these are read-only oracles.
    """

    @cache
    def load(path: Path, dtype: torch.dtype) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    return load
