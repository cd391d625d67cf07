"""Hugging Face checkpoints: normalized configs and zero-copy weights."""

from .checkpoint import Checkpoint
from .config import LayerConfig, ModelConfig, RopeConfig, load_config, parse_config
from .errors import CheckpointError, ConfigError, HubError, WeightsError
from .hub import SHORT_NAMES, repo_id_for, resolve_model

__all__ = [
    "SHORT_NAMES",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "HubError",
    "LayerConfig",
    "ModelConfig",
    "RopeConfig",
    "WeightsError",
    "load_config",
    "parse_config",
    "repo_id_for",
    "resolve_model",
]
