"""Perplexity of a text, read in chunks through a KV cache (optionally a sliding window with
attention sinks, or a compressed cache storage)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import attnscope

from .._checks import whole_number
from ._generate import _check_kv_storage

_PERPLEXITY_CHUNK = 256  # tokens read per step when no window bounds the cache


@dataclass(frozen=True)
class Perplexity:
    """Mean negative log-likelihood (nats per token), its exponential, and the tokens scored
    (every token of the text but the first, which has nothing before it)."""

    nll: float
    ppl: float
    tokens: int


def visible_keys(queries: np.ndarray, keys: np.ndarray, window: int | None, sinks: int):
    """Which key positions each query position sees: causal, then at most the `window` most
    recent keys, plus the first `sinks` tokens. ``(len(queries), len(keys))`` bool."""
    seen = keys[None, :] <= queries[:, None]
    if window is not None:
        seen &= (keys[None, :] > queries[:, None] - window) | (keys[None, :] < sinks)
    return seen


def perplexity(model, text, *, window=None, sinks=0, kv_storage=None) -> Perplexity:
    """Perplexity of `text`, reading it in chunks through a KV cache that keeps, when `window`
    is set, only the first `sinks` tokens and the most recent keys (older ones are evicted).
    With `kv_storage` (and no window) the chunks attend over an :class:`attnscope.KVCache`
    storing its keys and values that way."""
    if window is not None:
        window = whole_number(window, "window", low=1)
    sinks = whole_number(sinks, "sinks", low=0)
    storage = _check_kv_storage(model, kv_storage)
    if storage is not None and window is not None:
        raise ValueError("kv_storage works with window=None (the whole text kept)")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _, ids = model.tokenize(text)
    if ids.size < 2:
        raise ValueError("text must give at least two tokens: the first one is not predicted")
    if ids.size > model.context_length:
        raise ValueError(
            f"text is {ids.size} tokens long but {model.name} reads at most "
            f"{model.context_length} tokens (its context window); shorten the text"
        )
    # A window as long as the text hides nothing (any larger one, 10**30 included, is the
    # same), and sinks past the text's end are all of it.
    if window is not None and window >= ids.size:
        window = None
    sinks = min(sinks, ids.size)
    if storage is not None:
        return _perplexity_through_caches(model, ids, storage)
    chunk = window or _PERPLEXITY_CHUNK
    cache = [None] * model.num_layers  # per layer: (keys, values, positions) kept so far
    total = 0.0
    for start in range(0, ids.size - 1, chunk):
        stop = min(start + chunk, ids.size - 1)
        positions = np.arange(start, stop)

        def attend(layer, q, k, v, positions=positions):
            if cache[layer] is None:
                keys, values, kept = k, v, positions
            else:
                old_keys, old_values, old_positions = cache[layer]
                keys = np.concatenate([old_keys, k], axis=1)
                values = np.concatenate([old_values, v], axis=1)
                kept = np.concatenate([old_positions, positions])
            mask = visible_keys(positions, kept, window, sinks)
            context = attnscope.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=True
            )
            # Evict what no later query can see.
            if window is not None:
                keep = (kept < sinks) | (kept > positions[-1] - window + 1)
                keys, values, kept = keys[:, keep], values[:, keep], kept[keep]
            cache[layer] = (keys, values, kept)
            return context

        logits = model.logits(model.blocks(ids[start:stop], start, attend))
        total += _negative_log_likelihood(logits, ids[start + 1 : stop + 1])
    scored = ids.size - 1
    nll = total / scored
    return Perplexity(nll=nll, ppl=math.exp(nll), tokens=scored)


def read_through_caches(model, ids: np.ndarray, storage: str | None) -> tuple[float, np.ndarray]:
    """Reads `ids` in chunks, every chunk attending over per-layer :class:`attnscope.KVCache`
    objects in `storage` (None: the model's dtype). Returns the summed negative
    log-likelihood of ``ids[1:]`` and the model's likeliest next token after each of
    ``ids[:-1]``."""
    caches = [
        attnscope.KVCache(
            model.num_kv_heads,
            model.head_dim,
            dtype=model.dtype,
            capacity=ids.size,
            storage=storage,
        )
        for _ in range(model.num_layers)
    ]

    def attend(layer, q, k, v):
        caches[layer].append(k[None], v[None])
        return caches[layer].attend(q[None], enable_gqa=True)[0]

    total, predictions = 0.0, []
    for start in range(0, ids.size - 1, _PERPLEXITY_CHUNK):
        stop = min(start + _PERPLEXITY_CHUNK, ids.size - 1)
        logits = model.logits(model.blocks(ids[start:stop], start, attend))
        total += _negative_log_likelihood(logits, ids[start + 1 : stop + 1])
        predictions.append(logits.argmax(axis=1))
    return total, np.concatenate(predictions)


def _perplexity_through_caches(model, ids: np.ndarray, storage: str) -> Perplexity:
    """Perplexity with every chunk attending over a per-layer KVCache in `storage`."""
    nll = read_through_caches(model, ids, storage)[0] / (ids.size - 1)
    return Perplexity(nll=nll, ppl=math.exp(nll), tokens=ids.size - 1)


def _negative_log_likelihood(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of ``-log softmax(logits[i])[targets[i]]``."""
    top = logits.max(axis=1, keepdims=True)
    log_sums = np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64)) + top[:, 0]
    picked = logits[np.arange(targets.size), targets].astype(np.float64)
    return float((log_sums - picked).sum())
