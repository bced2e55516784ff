"""`Model` and `Trace`: run a trained transformer on a text and keep what attention did.

A model is its weights (read with safetensors or gguf), its tokenizer (the `tokenizers` library)
and a forward pass in NumPy whose attention goes through
:func:`attnscope.scaled_dot_product_attention`. Loading lives in ``_loader``; each family
(``_bert``, ``_gpt2``, ``_llama``) builds on this module alone.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import attnscope


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a loader read, before a family turns it into a model.

    Attributes:
        name: display name.
        path: the folder or ``.gguf`` file the model came from.
        config: Hugging Face style config (``num_hidden_layers``, ...).
        weights: tensors under Hugging Face names.
        tokenizer: a ``tokenizers.Tokenizer``, or None (then only ids can be read).
        config_file: what error messages about the config name (``config.json`` or the GGUF).
        weights_file: what error messages about a tensor name.
        chat_template: the Jinja chat template, if the checkpoint carries one.
        tensor_names: how the file names a tensor, where that differs (GGUF's ``blk.0.attn_q``).
    """

    name: str
    path: Path
    config: dict
    weights: Mapping[str, np.ndarray]
    tokenizer: object | None
    config_file: Path
    weights_file: Path
    chat_template: str | None = None
    tensor_names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Trace:
    """What one forward pass did.

    Attributes:
        tokens: the token strings, as the tokenizer spells them (ids as text without a tokenizer).
        ids: ``(n,)`` int64 token ids.
        attentions: ``(layers, heads, n, n)`` attention weights; row ``i`` is how query token
            ``i`` spreads its attention over the keys.
        hidden_states: ``(n, d)`` output of the final layer (after the final norm in decoders).
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

    Use :func:`attnscope.models.load` to make one. Subclasses implement one architecture
    family's forward pass.
    """

    family = ""
    is_causal = False

    def __init__(self, checkpoint: Checkpoint, dtype):
        self.name = checkpoint.name
        self.path = checkpoint.path
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.dtype = np.dtype(dtype)
        self._config_file = checkpoint.config_file
        self._weights_file = checkpoint.weights_file
        self._tensor_names = checkpoint.tensor_names
        self._setup(checkpoint)

    # Filled in by subclasses from the config in _setup.
    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    @property
    def causal(self) -> bool:
        """Whether token ``i`` attends to tokens ``<= i`` only."""
        return self.is_causal

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than query heads with grouped-query attention)."""
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_length(self) -> int:
        """The most tokens the model reads at once."""
        return self.max_positions

    def _setup(self, checkpoint: Checkpoint) -> None:
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
                f"{self.name} has no tokenizer in {self.path}: pass ids= instead of text"
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
        self._check_attention_memory(token_ids.size)
        attentions, hidden_states, logits = self._forward(token_ids)
        return Trace(tokens, token_ids, attentions, hidden_states, logits, self.is_causal)

    def _check_attention_memory(self, n: int) -> None:
        """Refuses a text whose attention maps (every layer and head) would not fit the
        engine's weights memory limit, before anything is allocated."""
        needed = self.num_layers * self.num_heads * n * n * self.dtype.itemsize
        limit = attnscope.get_weights_memory_limit()
        if needed > limit:
            raise ValueError(
                f"the attention maps of {n} tokens ({self.num_layers} layers x "
                f"{self.num_heads} heads x {n} x {n}) would take {needed / 2**30:.1f} GiB, "
                f"more than the weights memory limit of {limit / 2**30:.1f} GiB "
                "(attnscope.set_weights_memory_limit); shorten the text"
            )

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

    def _weight(self, weights: Mapping, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` in the model's dtype, after checking it is there, float and `shape`."""
        label = self._tensor_names.get(name, name)
        try:
            array = weights[name]
        except KeyError:
            raise ValueError(
                f"{self._weights_file} has no tensor {label!r}; is it a {self.family} model?"
            ) from None
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{self._weights_file}: tensor {label!r} has dtype {array.dtype}; weights must "
                "be floating point"
            )
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{self._weights_file}: tensor {label!r} has shape {tuple(array.shape)} but "
                f"{self._config_file} implies {tuple(shape)}"
            )
        return np.ascontiguousarray(array, dtype=self.dtype)

    def _config_int(
        self, config: dict, *keys: str, minimum: int = 1, default: int | None = None
    ) -> int:
        """The first of `keys` present in the config, as an int of at least `minimum`."""
        for key in keys:
            value = config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{self._config_file}: {key} must be an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"{self._config_file}: {key} must be >= {minimum}, got {value}")
            return int(value)
        if default is not None:
            return default
        raise ValueError(f"{self._config_file} has no integer {' / '.join(keys)}")

    def _config_float(self, config: dict, key: str, default: float) -> float:
        """``config[key]`` as a positive finite float, `default` when absent."""
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1e30:
            raise ValueError(f"{self._config_file}: {key} must be a positive number, got {value!r}")
        return float(value)

    def _heads_divide(self, width: int, heads: int, what: str) -> int:
        """Width of one head; refuses a width that `heads` does not divide."""
        if width % heads:
            raise ValueError(
                f"{self._config_file}: {what} {width} is not a multiple of the {heads} heads"
            )
        return width // heads


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """(n, heads·d_head) -> (heads, n, d_head), contiguous."""
    n, width = x.shape
    return np.ascontiguousarray(x.reshape(n, num_heads, width // num_heads).transpose(1, 0, 2))


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(heads, n, d_head) -> (n, heads·d_head)."""
    heads, n, d_head = x.shape
    return x.transpose(1, 0, 2).reshape(n, heads * d_head)
