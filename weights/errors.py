"""Errors raised while finding, reading or validating a checkpoint.

Each message is one sentence that says what is wrong and how to fix it; callers
print `str(err)` to the user unchanged.
"""


class WeightsError(Exception):
    """Base class: anything wrong with a model's files or their contents."""


class ConfigError(WeightsError):
    """config.json is missing, unsupported, or asks for something we cannot express."""


class CheckpointError(WeightsError):
    """A safetensors shard is missing, corrupt, or lacks a tensor the config needs."""


class HubError(WeightsError):
    """A model could not be resolved or downloaded from the Hugging Face Hub."""
