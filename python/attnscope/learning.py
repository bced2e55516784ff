"""Tiny transformers trained from scratch in NumPy, with attnscope's exact attention forward and
backward, so that previous-token and induction heads can be watched emerging from training.

Everything but attention (embeddings, projections, LayerNorm, the optional MLP, the loss and Adam)
is vectorised NumPy; attention runs in the engine (``scaled_dot_product_attention(...,
return_lse=True)`` forward, ``scaled_dot_product_attention_backward`` backward).

Example::

    from attnscope import learning

    for report in learning.training(learning.TrainConfig()):
        print(report.step, report.loss, report.induction.max())
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from . import reference
from ._attention import scaled_dot_product_attention, scaled_dot_product_attention_backward
from ._engine import core_available
from .models.stats import head_stats, row_entropy

__all__ = [
    "AGREEMENT_WORDS",
    "TASKS",
    "Batch",
    "Report",
    "TrainConfig",
    "Trainer",
    "head_scores",
    "held_out_data",
    "make_batch",
    "repeated_sequences",
    "token_names",
    "train",
    "training",
]

TASKS = ("induction", "previous_token", "agreement")
# The agreement task's words: pronouns first, then nouns whose grammatical gender is part of
# their meaning, so that each pronoun has exactly one possible antecedent in a sequence.
AGREEMENT_WORDS = {
    "she": ("queen", "mother", "sister", "aunt", "girl", "woman"),
    "he": ("king", "father", "brother", "uncle", "boy", "man"),
}
_PRONOUNS = tuple(AGREEMENT_WORDS)
_FEMININE, _MASCULINE = AGREEMENT_WORDS["she"], AGREEMENT_WORDS["he"]
_FIRST_NOUN = len(_PRONOUNS)
_FIRST_FILLER = _FIRST_NOUN + len(_FEMININE) + len(_MASCULINE)
_LAYER_NORM_EPS = 1e-5
_ADAM_BETAS = (0.9, 0.98)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Every field is checked when the config is made.

    Attributes:
        task: one of ``TASKS``: ``"induction"`` (random tokens repeated twice, predict the next
            token), ``"previous_token"`` (output the token just before), ``"agreement"``
            (at a pronoun, name the earlier noun it refers to).
        num_layers, num_heads, d_model: the model; each head has ``d_model // num_heads`` dims.
        scale: ``"sqrt"`` for the usual ``1/√d_k``, or a positive number (``1.0``: no scaling).
        mlp: add a ReLU MLP (4 × d_model wide) after each attention layer.
        layer_norm: normalise each position before attention, the MLP and the unembedding.
        vocab_size, seq_len, batch_size: the data; induction repeats a block of a quarter to
            a half of ``seq_len`` tokens (the held-out probe: exactly half).
        steps, learning_rate, seed: the optimisation (Adam); the same seed gives the same run.
        report_every: report after every this many steps (and at step 0 and at the end).
        eval_size: held-out sequences for the reports' loss, accuracy and head scores.
        dtype: ``np.float32`` (training) or ``np.float64`` (exact gradient checks).
    """

    task: str = "induction"
    num_layers: int = 2
    num_heads: int = 4
    d_model: int = 64
    scale: str | float = "sqrt"
    mlp: bool = False
    layer_norm: bool = True
    vocab_size: int = 64
    seq_len: int = 32
    batch_size: int = 32
    steps: int = 400
    learning_rate: float = 5e-3
    seed: int = 0
    report_every: int = 25
    eval_size: int = 64
    dtype: type = np.float32

    def __post_init__(self) -> None:
        _check_choice(self.task, "task", TASKS)
        for name, low in (
            ("num_layers", 1),
            ("num_heads", 1),
            ("d_model", 1),
            ("vocab_size", 2),
            ("seq_len", 4),
            ("batch_size", 1),
            ("steps", 0),
            ("seed", 0),
            ("report_every", 1),
            ("eval_size", 1),
        ):
            _check_int(getattr(self, name), name, low)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})"
            )
        for name in ("mlp", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_positive(self.learning_rate, "learning_rate")
        if self.scale != "sqrt":
            if isinstance(self.scale, str):
                raise ValueError(f"scale must be 'sqrt' or a positive number, got {self.scale!r}")
            _check_positive(self.scale, "scale")
        try:
            # np.dtype(None) would be float64: None is refused, not taken for a default.
            name = None if self.dtype is None else np.dtype(self.dtype).name
        except TypeError:
            name = None
        if name not in ("float32", "float64"):
            raise TypeError(f"dtype must be np.float32 or np.float64, got {self.dtype!r}")
        _check_task_fits(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def attention_scale(self) -> float:
        """The number the engine multiplies ``Q·Kᵀ`` by."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale == "sqrt" else float(self.scale)


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_task_fits(config: TrainConfig) -> None:
    """The vocabulary must hold what the task draws from."""
    if config.task == "induction" and config.vocab_size < config.seq_len // 2:
        raise ValueError(
            f"vocab_size ({config.vocab_size}) must be >= seq_len // 2 ({config.seq_len // 2}): "
            "the induction task draws each repeated block without repeats"
        )
    if config.task == "agreement" and config.vocab_size < _FIRST_FILLER + 2:
        raise ValueError(
            f"vocab_size must be >= {_FIRST_FILLER + 2} for the agreement task "
            f"(2 pronouns, {_FIRST_FILLER - _FIRST_NOUN} nouns and some filler words), "
            f"got {config.vocab_size}"
        )


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Batch:
    """Token ids ``(B, T)``, the id each position must output ``(B, T)``, and which positions
    count in the loss and accuracy ``(B, T)`` bool."""

    tokens: np.ndarray
    targets: np.ndarray
    counted: np.ndarray


def repeated_sequences(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """``count`` sequences of ``seq_len // 2`` distinct random ids, each repeated twice (then
    one random id if ``seq_len`` is odd): the held-out probe that reveals induction heads."""
    periods = np.full(count, seq_len // 2)
    return _repeat_blocks(rng, periods, seq_len, vocab_size)[0]


def _repeat_blocks(rng: np.random.Generator, periods: np.ndarray, seq_len: int, vocab_size: int):
    """Per row, ``periods[row]`` distinct random ids, the same ids again, then random ids."""
    count = len(periods)
    half = seq_len // 2
    distinct = np.argsort(rng.random((count, vocab_size)), axis=1)[:, :half]
    tail = rng.integers(0, vocab_size, size=(count, seq_len - half))
    fresh = np.concatenate([distinct, tail], axis=1)
    # Position j of the second copy reads position j - period of the first.
    positions = np.arange(seq_len)[None, :]
    period = periods[:, None]
    in_copy = (positions >= period) & (positions < 2 * period)
    source = np.where(in_copy, positions - period, positions)
    return np.take_along_axis(fresh, source, axis=1), in_copy


def make_batch(task: str, rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """A :class:`Batch` of `count` sequences of one task, drawn from `rng`."""
    _check_choice(task, "task", TASKS)
    if task == "induction":
        return _induction_batch(rng, count, seq_len, vocab_size)
    if task == "previous_token":
        tokens = rng.integers(0, vocab_size, size=(count, seq_len))
        targets = np.roll(tokens, 1, axis=1)
        counted = np.ones(tokens.shape, dtype=bool)
        counted[:, 0] = False  # the first position has no previous token
        return Batch(tokens, targets, counted)
    return _agreement_batch(rng, count, seq_len, vocab_size)


def _induction_batch(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """Random ids repeated once, with a period drawn per sequence (between a quarter and a half
    of the length, so that no fixed offset finds the earlier copy); the loss counts the
    positions whose next token is a repeat: only context can predict them."""
    periods = rng.integers(max(seq_len // 4, 2), seq_len // 2 + 1, size=count)
    tokens, in_copy = _repeat_blocks(rng, periods, seq_len, vocab_size)
    targets = np.roll(tokens, -1, axis=1)
    counted = np.roll(in_copy, -1, axis=1)
    counted[:, -1] = False
    # The first position of the second copy follows a token that has not repeated yet.
    counted &= np.arange(seq_len)[None, :] >= periods[:, None]
    return Batch(tokens, targets, counted)


def _agreement_batch(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """Filler words with one feminine and one masculine noun somewhere, and a pronoun at the
    end whose target is the noun of its gender: 'the queen met the king ... she' -> queen."""
    rows = np.arange(count)
    tokens = rng.integers(_FIRST_FILLER, vocab_size, size=(count, seq_len))
    # Two distinct places for the nouns among the first seq_len - 1 positions.
    places = np.argsort(rng.random((count, seq_len - 1)), axis=1)[:, :2]
    feminine = _FIRST_NOUN + rng.integers(0, len(_FEMININE), size=count)
    masculine = _FIRST_NOUN + len(_FEMININE) + rng.integers(0, len(_MASCULINE), size=count)
    tokens[rows, places[:, 0]] = feminine
    tokens[rows, places[:, 1]] = masculine
    pronoun = rng.integers(0, len(_PRONOUNS), size=count)
    tokens[:, -1] = pronoun
    targets = np.zeros_like(tokens)
    targets[:, -1] = np.where(pronoun == 0, feminine, masculine)
    counted = np.zeros(tokens.shape, dtype=bool)
    counted[:, -1] = True
    return Batch(tokens, targets, counted)


def token_names(task: str, vocab_size: int) -> list[str]:
    """A readable name for every id: words for the agreement task, ``t<id>`` otherwise."""
    _check_choice(task, "task", TASKS)
    if task != "agreement":
        return [f"t{i}" for i in range(vocab_size)]
    words = [*_PRONOUNS, *_FEMININE, *_MASCULINE]
    return words + [f"w{i}" for i in range(len(words), vocab_size)]


# ----------------------------------------------------------------------------------------------
# The model: forward and backward


def _init_params(config: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Embeddings of unit size; projections of variance 1/fan-in (so a score ``q·k`` spreads
    like √d_k, which is what the scale is there to undo)."""
    d, vocab, dtype = config.d_model, config.vocab_size, np.dtype(config.dtype)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(dtype)

    params = {
        "token_embedding": normal((vocab, d), 1.0),
        "position_embedding": normal((config.seq_len, d), 1.0),
    }
    for layer in range(config.num_layers):
        for name in ("w_q", "w_k", "w_v", "w_o"):
            params[f"{layer}.{name}"] = normal((d, d), 1.0 / math.sqrt(d))
        if config.mlp:
            params[f"{layer}.mlp_in"] = normal((d, 4 * d), 1.0 / math.sqrt(d))
            params[f"{layer}.mlp_in_bias"] = np.zeros(4 * d, dtype)
            params[f"{layer}.mlp_out"] = normal((4 * d, d), 1.0 / math.sqrt(4 * d))
            params[f"{layer}.mlp_out_bias"] = np.zeros(d, dtype)
    params["unembedding"] = normal((d, vocab), 1.0 / math.sqrt(d))
    return params


def _layer_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position scaled to zero mean and unit variance (no learned gain: the next matrix
    can learn any scale). Returns the result and 1/std for the backward."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + _LAYER_NORM_EPS)
    return centred * inv_std, inv_std.astype(x.dtype)


def _layer_norm_backward(grad: np.ndarray, normed: np.ndarray, inv_std: np.ndarray):
    mean_grad = grad.mean(axis=-1, keepdims=True)
    mean_grad_normed = (grad * normed).mean(axis=-1, keepdims=True)
    return inv_std * (grad - mean_grad - normed * mean_grad_normed)


def _split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """``(B, T, H·Dh)`` -> contiguous ``(B, H, T, Dh)``, the engine's layout."""
    batch, length, width = x.shape
    heads = x.reshape(batch, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(heads)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    batch, num_heads, length, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, num_heads * head_dim)


def _causal_attention(q, k, v, scale: float, keep_weights: bool):
    """Causal attention of ``(B, H, T, Dh)`` heads: ``(out, lse, weights or None)``, from the
    engine, or from the float64 reference when the compiled engine is missing."""
    sdpa = (
        scaled_dot_product_attention if core_available() else reference.scaled_dot_product_attention
    )
    results = sdpa(
        q, k, v, is_causal=True, scale=scale, return_weights=keep_weights, return_lse=True
    )
    results = tuple(np.asarray(r, dtype=q.dtype) for r in results)
    out, lse = results[0], results[-1]
    return out, lse, (results[1] if keep_weights else None)


def _causal_attention_backward(grad_out, q, k, v, out, lse, scale: float):
    """``(grad_q, grad_k, grad_v)`` of :func:`_causal_attention`, from the same implementation."""
    backward = (
        scaled_dot_product_attention_backward
        if core_available()
        else reference.scaled_dot_product_attention_backward
    )
    grads = backward(grad_out, q, k, v, out, lse, is_causal=True, scale=scale)
    return tuple(np.asarray(g, dtype=q.dtype) for g in grads)


def _normed(x: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    return _layer_norm(x) if config.layer_norm else (x, None)


def _normed_backward(grad, normed, inv_std):
    return grad if inv_std is None else _layer_norm_backward(grad, normed, inv_std)


def _forward(params, config: TrainConfig, tokens: np.ndarray, keep_weights: bool = False):
    """Logits ``(B, T, vocab)`` and what the backward needs (and, if asked, the attention
    weights ``(layers, B, heads, T, T)``)."""
    length = tokens.shape[1]
    x = params["token_embedding"][tokens] + params["position_embedding"][:length]
    saved, weights = [], []
    for layer in range(config.num_layers):
        p = {name: params[f"{layer}.{name}"] for name in ("w_q", "w_k", "w_v", "w_o")}
        normed, inv_std = _normed(x, config)
        q, k, v = (_split_heads(normed @ p[n], config.num_heads) for n in ("w_q", "w_k", "w_v"))
        out, lse, layer_weights = _causal_attention(q, k, v, config.attention_scale, keep_weights)
        weights.append(layer_weights)
        merged = _merge_heads(out)
        x = x + merged @ p["w_o"]
        saved.append(("attention", layer, normed, inv_std, q, k, v, out, lse, merged))
        if config.mlp:
            x, mlp_saved = _mlp_forward(params, layer, x, config)
            saved.append(mlp_saved)
    normed, inv_std = _normed(x, config)
    logits = normed @ params["unembedding"]
    saved.append(("final", normed, inv_std))
    return logits, saved, (np.stack(weights) if keep_weights else None)


def _mlp_forward(params, layer: int, x: np.ndarray, config: TrainConfig):
    normed, inv_std = _normed(x, config)
    hidden = np.maximum(normed @ params[f"{layer}.mlp_in"] + params[f"{layer}.mlp_in_bias"], 0)
    x = x + hidden @ params[f"{layer}.mlp_out"] + params[f"{layer}.mlp_out_bias"]
    return x, ("mlp", layer, normed, inv_std, hidden)


def _cross_entropy(logits: np.ndarray, batch: Batch):
    """Mean loss over the counted positions, its gradient w.r.t. the logits, and the
    per-position loss ``(B, T)`` (0 where not counted)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch.targets[..., None], axis=-1)[..., 0]
    per_position = np.where(batch.counted, -picked, 0.0)
    count = max(int(batch.counted.sum()), 1)
    grad = np.exp(log_probs)
    np.put_along_axis(
        grad,
        batch.targets[..., None],
        np.take_along_axis(grad, batch.targets[..., None], -1) - 1,
        -1,
    )
    grad *= (batch.counted / count)[..., None].astype(grad.dtype)
    return float(per_position.sum() / count), grad, per_position


def _backward(params, config: TrainConfig, tokens, saved, grad_logits) -> dict[str, np.ndarray]:
    """Gradients of the loss w.r.t. every parameter, given its gradient w.r.t. the logits."""
    grads = {}
    width = config.d_model
    _, normed, inv_std = saved[-1]
    grads["unembedding"] = normed.reshape(-1, width).T @ grad_logits.reshape(-1, config.vocab_size)
    grad_x = _normed_backward(grad_logits @ params["unembedding"].T, normed, inv_std)
    for entry in reversed(saved[:-1]):
        backward = _mlp_backward if entry[0] == "mlp" else _attention_backward_layer
        grad_x = grad_x + backward(params, entry, grad_x, grads, config)
    length = tokens.shape[1]
    grads["position_embedding"] = np.zeros_like(params["position_embedding"])
    grads["position_embedding"][:length] = grad_x.sum(axis=0)
    grads["token_embedding"] = np.zeros_like(params["token_embedding"])
    np.add.at(grads["token_embedding"], tokens.ravel(), grad_x.reshape(-1, width))
    return grads


def _attention_backward_layer(params, entry, grad_x, grads, config: TrainConfig):
    """Fills this layer's projection gradients; returns the gradient reaching its input."""
    _, layer, normed, inv_std, q, k, v, out, lse, merged = entry
    width = config.d_model
    rows = grad_x.reshape(-1, width)
    grads[f"{layer}.w_o"] = merged.reshape(-1, width).T @ rows
    grad_out = _split_heads(grad_x @ params[f"{layer}.w_o"].T, config.num_heads)
    grad_heads = _causal_attention_backward(grad_out, q, k, v, out, lse, config.attention_scale)
    flat_normed = normed.reshape(-1, width)
    grad_normed = np.zeros_like(normed)
    for name, grad in zip(("w_q", "w_k", "w_v"), grad_heads, strict=True):
        merged_grad = _merge_heads(grad)
        grads[f"{layer}.{name}"] = flat_normed.T @ merged_grad.reshape(-1, width)
        grad_normed += merged_grad @ params[f"{layer}.{name}"].T
    return _normed_backward(grad_normed, normed, inv_std)


def _mlp_backward(params, entry, grad_x, grads, config: TrainConfig):
    _, layer, normed, inv_std, hidden = entry
    width = config.d_model
    grads[f"{layer}.mlp_out"] = hidden.reshape(-1, 4 * width).T @ grad_x.reshape(-1, width)
    grads[f"{layer}.mlp_out_bias"] = grad_x.sum(axis=(0, 1))
    grad_hidden = (grad_x @ params[f"{layer}.mlp_out"].T) * (hidden > 0)
    grads[f"{layer}.mlp_in"] = normed.reshape(-1, width).T @ grad_hidden.reshape(-1, 4 * width)
    grads[f"{layer}.mlp_in_bias"] = grad_hidden.sum(axis=(0, 1))
    return _normed_backward(grad_hidden @ params[f"{layer}.mlp_in"].T, normed, inv_std)


# ----------------------------------------------------------------------------------------------
# Training and reports


@dataclass(frozen=True)
class Report:
    """Where training stands after `step` Adam steps, measured on held-out sequences.

    Attributes:
        step, steps: steps taken so far, and in all.
        loss, accuracy: cross-entropy (nats) and share of right argmax predictions on the
            task's held-out sequences, over the positions the task counts.
        train_loss: mean loss of the training batches since the previous report (None at 0).
        previous_token, induction, entropy: ``(layers, heads)``: mean attention to the token
            just before, mean induction score (attention to the token that followed the current
            one in the first copy) and mean row entropy in nats, on held-out sequences of random
            tokens repeated twice.
        first_copy_loss, second_copy_loss: loss of the model predicting the first and the
            second copy of those sequences: the second falls far below the first once the
            model copies from context.
        qk_grad_norm: ``(layers,)``: norm of the held-out loss's gradient w.r.t. W_Q and W_K
            together, per layer.
        maps: ``(layers, heads, T, T)`` attention weights on the first held-out task sequence.
        seconds: wall time since training started (the one field a rerun does not repeat).
        diverged: True on the last report of a run that diverged: a training loss, a weight
            or the model's outputs became NaN or infinite (a learning rate too large, most
            often). Training stops there; this report's measurements are NaN, its
            ``train_loss`` is what the last steps gave, and every earlier report is intact.
    """

    step: int
    steps: int
    loss: float
    accuracy: float
    train_loss: float | None
    previous_token: np.ndarray
    induction: np.ndarray
    entropy: np.ndarray
    first_copy_loss: float
    second_copy_loss: float
    qk_grad_norm: np.ndarray
    maps: np.ndarray
    seconds: float = field(compare=False)
    diverged: bool = False


def _seeds(config: TrainConfig) -> list[np.random.SeedSequence]:
    """Independent streams for the initial weights, the training batches and held-out data."""
    return np.random.SeedSequence(config.seed).spawn(3)


def held_out_data(config: TrainConfig) -> tuple[Batch, np.ndarray]:
    """The held-out task batch and the probe (random ids repeated twice) a run reports on:
    ``config.eval_size`` sequences each, fixed by the seed."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    rng = np.random.default_rng(_seeds(config)[2])
    shape = (config.eval_size, config.seq_len, config.vocab_size)
    return make_batch(config.task, rng, *shape), repeated_sequences(rng, *shape)


class Trainer:
    """One model, its Adam state and its held-out data; :meth:`run` trains and reports.

    The seed fixes three independent streams: the initial weights, the training batches and
    the held-out sequences, so the same config gives bitwise the same run.
    """

    def __init__(self, config: TrainConfig) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        init_seed, data_seed, _ = _seeds(config)
        self.params = _init_params(config, np.random.default_rng(init_seed))
        self._data = np.random.default_rng(data_seed)
        self.held_out, self.probe = held_out_data(config)
        self.step = 0
        self._first_moment = {name: np.zeros_like(p) for name, p in self.params.items()}
        self._second_moment = {name: np.zeros_like(p) for name, p in self.params.items()}

    def loss_and_gradients(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """The mean loss on `batch` and its gradient w.r.t. every parameter (``params`` keys)."""
        logits, saved, _ = _forward(self.params, self.config, batch.tokens)
        loss, grad_logits, _ = _cross_entropy(logits, batch)
        return loss, _backward(self.params, self.config, batch.tokens, saved, grad_logits)

    def attention_maps(self, tokens: np.ndarray) -> np.ndarray:
        """The model's attention weights ``(layers, B, heads, T, T)`` on ``tokens`` ``(B, T)``."""
        tokens = self._check_tokens(tokens)
        return _forward(self.params, self.config, tokens, keep_weights=True)[2]

    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.config.seq_len:
            raise ValueError(
                f"tokens must have shape (B, T) with 1 <= T <= {self.config.seq_len}, "
                f"got {tokens.shape}"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return tokens

    def weights_finite(self) -> bool:
        """Whether every parameter is finite (training has not diverged)."""
        return all(np.isfinite(param).all() for param in self.params.values())

    def train_step(self) -> float:
        """One Adam step on a fresh training batch; returns that batch's loss."""
        config = self.config
        batch = make_batch(
            config.task, self._data, config.batch_size, config.seq_len, config.vocab_size
        )
        loss, grads = self.loss_and_gradients(batch)
        self.apply_gradients(grads)
        return loss

    def apply_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """One Adam step with `grads` (as :meth:`loss_and_gradients` returns them)."""
        if not isinstance(grads, dict) or set(grads) != set(self.params):
            raise ValueError(
                "grads must be a dict with one array per parameter, named as in params"
            )
        # Checked before anything moves, so a refused call leaves the model as it was.
        for name, grad in grads.items():
            if np.shape(grad) != self.params[name].shape:
                raise ValueError(
                    f"grads[{name!r}] has shape {np.shape(grad)}, "
                    f"the parameter {self.params[name].shape}"
                )
        self.step += 1
        beta1, beta2 = _ADAM_BETAS
        step_size = (
            self.config.learning_rate * math.sqrt(1 - beta2**self.step) / (1 - beta1**self.step)
        )
        for name, grad in grads.items():
            first, second = self._first_moment[name], self._second_moment[name]
            first *= beta1
            first += (1 - beta1) * grad
            second *= beta2
            second += (1 - beta2) * grad * grad
            self.params[name] -= (step_size * first / (np.sqrt(second) + _ADAM_EPS)).astype(
                first.dtype
            )

    def report(
        self, train_loss: float | None = None, seconds: float = 0.0, steps: int | None = None
    ) -> Report:
        """Measure the model as it is now on the held-out and probe sequences (`steps`: the
        run's step count in all, the config's by default). A model whose weights or outputs
        are not finite gets a ``diverged`` report instead, its measurements NaN."""
        config = self.config
        steps = config.steps if steps is None else steps
        if not self.weights_finite():
            return self._diverged_report(train_loss, seconds, steps)
        logits, saved, maps = _forward(self.params, config, self.held_out.tokens, True)
        probe_logits, _, probe_maps = _forward(self.params, config, self.probe, True)
        if not all(np.isfinite(a).all() for a in (logits, maps, probe_logits, probe_maps)):
            return self._diverged_report(train_loss, seconds, steps)
        loss, grad_logits, _ = _cross_entropy(logits, self.held_out)
        grads = _backward(self.params, config, self.held_out.tokens, saved, grad_logits)
        right = (logits.argmax(axis=-1) == self.held_out.targets) & self.held_out.counted
        qk_norms = [
            math.sqrt(
                float((grads[f"{layer}.w_q"] ** 2).sum() + (grads[f"{layer}.w_k"] ** 2).sum())
            )
            for layer in range(config.num_layers)
        ]
        first_copy, second_copy = _copy_losses(probe_logits, self.probe)
        previous, induction, entropy = head_scores(probe_maps)
        return Report(
            step=self.step,
            steps=steps,
            loss=loss,
            accuracy=float(right.sum() / max(int(self.held_out.counted.sum()), 1)),
            train_loss=train_loss,
            previous_token=previous,
            induction=induction,
            entropy=entropy,
            first_copy_loss=first_copy,
            second_copy_loss=second_copy,
            qk_grad_norm=np.array(qk_norms),
            maps=maps[:, 0],
            seconds=seconds,
        )

    def _diverged_report(self, train_loss: float | None, seconds: float, steps: int) -> Report:
        """The report of a model that diverged: where and when, every measurement NaN."""
        shape = (self.config.num_layers, self.config.num_heads)
        length = self.held_out.tokens.shape[1]
        return Report(
            step=self.step,
            steps=steps,
            loss=math.nan,
            accuracy=math.nan,
            train_loss=train_loss,
            previous_token=np.full(shape, np.nan),
            induction=np.full(shape, np.nan),
            entropy=np.full(shape, np.nan),
            first_copy_loss=math.nan,
            second_copy_loss=math.nan,
            qk_grad_norm=np.full(self.config.num_layers, np.nan),
            maps=np.full((*shape, length, length), np.nan),
            seconds=seconds,
            diverged=True,
        )

    def run(self, steps: int | None = None) -> Iterator[Report]:
        """Train until ``steps`` steps in all (default: the config's), yielding a report now,
        after every ``report_every`` steps and at the end. A run that diverges (a loss or a
        weight turns NaN or infinite) stops at the step where it did, with a last report
        marked ``diverged``."""
        steps = self.config.steps if steps is None else steps
        _check_int(steps, "steps", self.step)
        started = time.perf_counter()
        with _one_blas_thread():
            report = self.report(seconds=0.0, steps=steps)
        yield report
        while self.step < steps and not report.diverged:
            # Train up to the next report with BLAS on one thread, and give the caller back
            # its threads while it looks at the report. Overflow is not warned about: a run
            # that diverges says so in its last report.
            with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
                losses = [self.train_step()]
                while (
                    self.step % self.config.report_every
                    and self.step < steps
                    and math.isfinite(losses[-1])
                ):
                    losses.append(self.train_step())
                seconds = time.perf_counter() - started
                report = self.report(float(np.mean(losses)), seconds, steps)
                if not math.isfinite(losses[-1]) and not report.diverged:
                    report = self._diverged_report(report.train_loss, seconds, steps)
            yield report


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """The trainer's matrices are tiny: a multithreaded BLAS's threads would only wait on each
    other and on the engine's, which on 2 busy cores makes a step several times slower. With
    threadpoolctl installed, BLAS runs on one thread while the trainer computes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def head_scores(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous-token score, induction score and mean row entropy (nats) of every head, each
    ``(layers, heads)``, from causal attention weights ``(layers, B, heads, T, T)`` on
    sequences whose first ``2 * (T // 2)`` tokens are a block repeated twice.

    The scores are those of :func:`attnscope.models.stats.head_stats`, averaged over the
    ``B`` sequences: mean ``A[i, i - 1]`` over rows ``i >= 1``, and mean ``A[i, i - P + 1]``
    over the second copy (``P = T // 2``).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 5 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] < 4:
        raise ValueError(
            f"maps must have shape (layers, B, heads, T, T) with T >= 4, got {maps.shape}"
        )
    num_layers, _, num_heads, length, _ = maps.shape
    # Both scores are linear in the maps, so the score of the mean map is the mean score.
    # Causal rows of the repeated part see only it: an odd sequence's last token is cut off.
    repeated = 2 * (length // 2)
    mean_maps = maps.mean(axis=1)[..., :repeated, :repeated]
    stats = head_stats(mean_maps, induction=mean_maps)
    shape = (num_layers, num_heads)
    previous = np.array([s["previous_token"] for s in stats]).reshape(shape)
    induction = np.array([s["induction"] for s in stats]).reshape(shape)
    return previous, induction, row_entropy(maps).mean(axis=(1, 3))


def _copy_losses(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """Mean loss predicting the tokens of the first copy (after its first) and of the second."""
    period = tokens.shape[1] // 2
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    next_tokens = tokens[:, 1 : 2 * period]
    losses = -np.take_along_axis(log_probs[:, : 2 * period - 1], next_tokens[..., None], -1)[..., 0]
    return float(losses[:, : period - 1].mean()), float(losses[:, period:].mean())


def training(config: TrainConfig) -> Iterator[Report]:
    """Train a fresh model for `config`, yielding a :class:`Report` at step 0, every
    ``config.report_every`` steps and at the end."""
    return Trainer(config).run()


def train(config: TrainConfig, on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Train a fresh model for `config` and return every report (each also given to
    `on_report` as it is made); a run that diverges ends with a report marked ``diverged``."""
    reports = []
    for report in training(config):
        if on_report is not None:
            on_report(report)
        reports.append(report)
    return reports
