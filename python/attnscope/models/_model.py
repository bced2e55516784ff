"""`Model` and `Trace`: run a trained transformer on a text and keep what attention did.

A model is its weights (read with safetensors or gguf), its tokenizer (the `tokenizers` library)
and a forward pass in NumPy whose attention goes through
:func:`attnscope.scaled_dot_product_attention`. Loading lives in ``_loader``; each family
(``_bert``, ``_gpt2``, ``_llama``) builds on this module alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import attnscope

from .._checks import file_positive_number, file_whole_number, is_whole_number


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
        head_outputs: ``(layers, heads, n, head_dim)``: each head's output (its weights times
            the values) before the output projection mixes the heads, as it entered that
            projection in this pass (ablated or patched heads as replaced). A trace with head
            outputs can be the source of ``encode(patch=...)``.
    """

    tokens: list[str]
    ids: np.ndarray
    attentions: np.ndarray
    hidden_states: np.ndarray
    logits: np.ndarray | None
    is_causal: bool
    head_outputs: np.ndarray | None = None


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
    # Set only by families whose config can say otherwise (grouped-query attention, a head
    # width apart from hidden_size / num_heads).
    _num_kv_heads: int | None = None
    _head_dim: int | None = None

    @property
    def causal(self) -> bool:
        """Whether token ``i`` attends to tokens ``<= i`` only."""
        return self.is_causal

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads per layer (fewer than query heads with grouped-query attention)."""
        return self.num_heads if self._num_kv_heads is None else self._num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads if self._head_dim is None else self._head_dim

    @property
    def context_length(self) -> int:
        """The most tokens the model reads at once."""
        return self.max_positions

    def _setup(self, checkpoint: Checkpoint) -> None:
        raise NotImplementedError

    # --- one forward pass, in pieces each family implements ----------------------------------
    # The residual stream is a (rows, d) array: one sequence of n tokens, or a batch of them
    # stacked (rows = batch·n), so that interventions can run many variants in one product.

    def _embeddings(self, ids: np.ndarray) -> np.ndarray:
        """The residual stream entering the first layer, ``(n, d)``."""
        raise NotImplementedError

    def _layer_attention(
        self, index: int, x: np.ndarray, n: int, *, return_weights: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Layer `index`'s heads on the stream `x` of sequences of `n` tokens: each head's
        output ``(batch, heads, n, head_dim)`` and, if asked, the weights
        ``(batch, heads, n, n)``."""
        raise NotImplementedError

    def _layer_rest(self, index: int, x: np.ndarray, merged: np.ndarray) -> np.ndarray:
        """The rest of layer `index`: the output projection of the concatenated head outputs
        `merged` ``(rows, heads·head_dim)``, the residual, norms and MLP. Row by row, so any
        subset of rows may be passed."""
        raise NotImplementedError

    def _final_hidden(self, x: np.ndarray) -> np.ndarray:
        """The final hidden states for the stream leaving the last layer (final norm applied)."""
        return x

    def _readout(self, hidden: np.ndarray) -> np.ndarray | None:
        """Next-token logits for final hidden states; None for encoders."""
        return None

    def _forward(
        self, ids: np.ndarray, edit: Edit | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Attentions, head outputs, final hidden states and logits of one sequence; `edit`
        (layer, head outputs) -> head outputs replaces heads before the output projection."""
        n = ids.size
        attentions = np.empty((self.num_layers, self.num_heads, n, n), dtype=self.dtype)
        head_outputs = np.empty(
            (self.num_layers, self.num_heads, n, self.head_dim), dtype=self.dtype
        )
        x = self._embeddings(ids)
        for index in range(self.num_layers):
            context, attentions[index] = self._layer_attention(index, x, n, return_weights=True)
            if edit is not None:
                context = edit(index, context)
            head_outputs[index] = context[0]
            x = self._layer_rest(index, x, merge_heads(context))
        final = self._final_hidden(x)
        return attentions, head_outputs, final, self._readout(final)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r}: {self.num_layers} layers x {self.num_heads} "
            f"heads, d={self.hidden_size}, {'causal' if self.is_causal else 'bidirectional'}>"
        )

    def tokenize(self, text: str) -> tuple[list[str], np.ndarray]:
        """The tokens and ids the model reads for `text` (special tokens included)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_encodable(text, "text")
        if self.tokenizer is None:
            raise ValueError(
                f"{self.name} has no tokenizer in {self.path}: pass ids= instead of text"
            )
        encoding = self.tokenizer.encode(text)
        return list(encoding.tokens), np.asarray(encoding.ids, dtype=np.int64)

    def encode(
        self,
        text: str | None = None,
        *,
        ids=None,
        ablate=None,
        ablation: str = "zero",
        patch=None,
    ) -> Trace:
        """Run the model on `text` (tokenized here) or on token `ids`, and trace its attention.

        Interventions act on a head's output before the output projection mixes the heads
        (its slice of the concatenated head outputs, as in TransformerLens); everything after
        it is computed again from the replaced values.

        Args:
            text: the text to read; special tokens (BERT's ``[CLS]``/``[SEP]``) are added.
            ids: token ids to read as they are (a 1-D sequence of ints), instead of text.
            ablate: ``[(layer, head), ...]``: heads whose outputs are replaced as `ablation`
                says. None or ``[]``: the plain forward pass, bit for bit.
            ablation: ``"zero"`` (the head's output becomes 0) or ``"mean"`` (its output at
                every position becomes its mean over this sequence's positions).
            patch: ``{(layer, head): trace}``: activation patching. Each listed head's output is
                taken from ``trace.head_outputs``, a trace of this model that read as many
                tokens (typically the clean input, while this call reads the corrupted one).

        Raises:
            ValueError: both or neither of text and ids, no tokens, ids outside the vocabulary,
                more tokens than the model's context window, a layer or head out of range, an
                unknown ablation, a head both ablated and patched, or a patch source of another
                model or length.
            TypeError: text that is not a str, ids that are not integers, heads that are not
                pairs of integers, or patch sources that are not traces with head outputs.
        """
        tokens, token_ids = self._read_input(text, ids)
        edit = self._interventions(ablate, ablation, patch, token_ids.size)
        self._check_attention_memory(token_ids.size)
        attentions, head_outputs, hidden_states, logits = self._forward(token_ids, edit)
        return Trace(
            tokens, token_ids, attentions, hidden_states, logits, self.is_causal, head_outputs
        )

    def _read_input(self, text: str | None, ids) -> tuple[list[str], np.ndarray]:
        """The tokens and ids of `text` or of `ids` (exactly one given), checked to fit."""
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
        return tokens, token_ids

    def _interventions(self, ablate, ablation, patch, n: int) -> Edit | None:
        """The checked `ablate` / `ablation` / `patch` of :meth:`encode` as an edit of the head
        outputs, or None when there is nothing to change."""
        check_ablation(ablation)
        replaced: dict[int, dict[int, object]] = {}
        for layer, head in self._check_heads(ablate, "ablate"):
            replaced.setdefault(layer, {})[head] = ablation
        if patch is not None:
            if not isinstance(patch, Mapping):
                raise TypeError(
                    "patch must be a dict {(layer, head): trace}, got " + type(patch).__name__
                )
            for (layer, head), source in zip(
                self._check_heads(list(patch), "patch"), patch.values(), strict=True
            ):
                if head in replaced.get(layer, {}):
                    raise ValueError(
                        f"head ({layer}, {head}) is both in ablate and in patch; pick one"
                    )
                replaced.setdefault(layer, {})[head] = self._patch_source(source, layer, head, n)
        if not replaced:
            return None

        def edit(layer: int, context: np.ndarray) -> np.ndarray:
            heads = replaced.get(layer)
            if not heads:
                return context
            context = context.copy()
            for head, how in heads.items():
                context[:, head] = replacement(context[:, head], how)
            return context

        return edit

    def _check_heads(self, heads, name: str) -> list[tuple[int, int]]:
        """`heads` as a list of (layer, head) pairs of this model, or a TypeError/ValueError
        naming the argument `name`."""
        if heads is None:
            return []
        if isinstance(heads, str | bytes | Mapping) or not isinstance(heads, Iterable):
            raise TypeError(
                f"{name} must be a list of (layer, head) pairs, got {type(heads).__name__}"
            )
        checked = []
        for pair in heads:
            if isinstance(pair, str | bytes) or not isinstance(pair, Iterable):
                raise TypeError(f"{name} must hold (layer, head) pairs, got {pair!r}")
            pair = tuple(pair)
            if len(pair) != 2:
                raise TypeError(f"{name} must hold (layer, head) pairs, got {pair!r}")
            for value in pair:
                if not is_whole_number(value):
                    raise TypeError(f"{name}: layers and heads must be integers, got {pair!r}")
            layer, head = int(pair[0]), int(pair[1])
            if not 0 <= layer < self.num_layers:
                raise ValueError(
                    f"{name}: layer {layer} is out of range; {self.name} has layers 0 to "
                    f"{self.num_layers - 1}"
                )
            if not 0 <= head < self.num_heads:
                raise ValueError(
                    f"{name}: head {head} is out of range; {self.name} has heads 0 to "
                    f"{self.num_heads - 1} in each layer"
                )
            checked.append((layer, head))
        return checked

    def _patch_source(self, source, layer: int, head: int, n: int) -> np.ndarray:
        """Head `head` of layer `layer` in the patch source `source`, checked."""
        where = f"patch[({layer}, {head})]"
        if not isinstance(source, Trace):
            raise TypeError(f"{where} must be a Trace (from encode), got {type(source).__name__}")
        outputs = source.head_outputs
        if outputs is None:
            raise TypeError(f"{where} is a Trace without head_outputs; make it with encode")
        expected = (self.num_layers, self.num_heads, outputs.shape[2], self.head_dim)
        if outputs.ndim != 4 or outputs.shape != expected:
            raise ValueError(
                f"{where}: its head outputs have shape {outputs.shape}, not those of "
                f"{self.name} ({self.num_layers}, {self.num_heads}, n, {self.head_dim})"
            )
        if outputs.shape[2] != n:
            raise ValueError(
                f"{where} read {outputs.shape[2]} tokens but this input has {n}; a patch "
                "source must read as many tokens"
            )
        return outputs[layer, head]

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

    def _attend(
        self, q, k, v, *, scale: float, return_weights: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Multi-head attention on the engine: (batch, heads, n, d_head) in, (output, weights
        or None) out."""
        if not return_weights:
            out = attnscope.scaled_dot_product_attention(
                q, k, v, is_causal=self.is_causal, scale=scale
            )
            return out, None
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
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if not np.isfinite(array).all():
            # A damaged or zeroed file can decode to NaN or inf: every output would be NaN.
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ValueError(
                f"{self._weights_file}: tensor {label!r} holds {bad:,} non-finite values "
                "(NaN or inf); the file is damaged"
            )
        return array

    def _config_int(
        self,
        config: dict,
        *keys: str,
        minimum: int = 1,
        maximum: int | None = None,
        default: int | None = None,
    ) -> int:
        """The first of `keys` present in the config, as an int from `minimum` to `maximum`."""
        for key in keys:
            value = config.get(key)
            if value is None:
                continue
            return file_whole_number(
                value, f"{self._config_file}: {key}", low=minimum, high=maximum
            )
        if default is not None:
            return default
        raise ValueError(f"{self._config_file} has no integer {' / '.join(keys)}")

    def _config_float(self, config: dict, key: str, default: float) -> float:
        """``config[key]`` as a positive finite float, `default` when absent."""
        return file_positive_number(config.get(key, default), f"{self._config_file}: {key}")

    def _heads_divide(self, width: int, heads: int, what: str) -> int:
        """Width of one head; refuses a width that `heads` does not divide."""
        if width % heads:
            raise ValueError(
                f"{self._config_file}: {what} {width} is not a multiple of the {heads} heads"
            )
        return width // heads


Edit = Callable[[int, np.ndarray], np.ndarray]
ABLATIONS = ("zero", "mean")


def check_ablation(ablation) -> None:
    """Refuses an ablation kind other than "zero" or "mean"."""
    if not isinstance(ablation, str):
        raise TypeError(f"ablation must be 'zero' or 'mean', got {type(ablation).__name__}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}")


def replacement(outputs: np.ndarray, how) -> np.ndarray:
    """What replaces one head's outputs ``(..., n, head_dim)``: zeros, their mean over the
    positions (for ``"zero"``/``"mean"``), or the given array (a patch)."""
    if isinstance(how, np.ndarray):
        return how
    if how == "zero":
        return np.zeros_like(outputs)
    return np.broadcast_to(outputs.mean(axis=-2, keepdims=True), outputs.shape)


def split_heads(x: np.ndarray, num_heads: int, n: int) -> np.ndarray:
    """(batch·n, heads·d_head) -> (batch, heads, n, d_head), contiguous."""
    rows, width = x.shape
    shape = (rows // n, n, num_heads, width // num_heads)
    return np.ascontiguousarray(x.reshape(shape).transpose(0, 2, 1, 3))


def split_qkv(qkv: np.ndarray, num_heads: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fused ``[q | k | v]`` projection (batch·n, 3·d) -> q, k and v, each (batch, heads, n,
    d_head), contiguous."""
    d = qkv.shape[1] // 3
    q, k, v = (split_heads(qkv[:, i * d : (i + 1) * d], num_heads, n) for i in range(3))
    return q, k, v


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(batch, heads, n, d_head) -> (batch·n, heads·d_head)."""
    batch, heads, n, d_head = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * n, heads * d_head)


def check_encodable(text: str, name: str) -> None:
    """Refuse a str that is not Unicode text: a lone surrogate (``"\\ud800"``, what a broken
    decode or a JSON escape can leave) has no UTF-8 form, so no tokenizer can read it.

    Raises:
        ValueError: naming `name` and where the surrogate is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} holds a lone surrogate {text[error.start]!r} at index {error.start}, "
            "which is not text a tokenizer can read; remove it or decode the text with "
            "errors='replace'"
        ) from None
