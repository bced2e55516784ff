"""Causal vs bidirectional attention and the other masking regimes, on one small random model.

Every token gets a fixed random embedding (seeded by the word itself, so editing one word
changes only that token's embedding) plus a sinusoidal position; fixed random ``W_Q, W_K, W_V``
turn those into ``Q, K, V``. The same ``Q, K, V`` then go through each regime in the engine.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from attnscope.reference import visibility

from . import engine
from .text import InputError, SentenceRule, word_vector

MODEL_DIM = 16
HEAD_DIM = 8
MAX_WORDS = 24
SEED = 2017
REGIMES = ("causal", "bidirectional")
SENTENCE = SentenceRule(
    MAX_WORDS,
    empty="Type a sentence with at least one word.",
    shortened="Only the first {limit} tokens are used on this page.",
)


def embeddings(words: list[str]) -> np.ndarray:
    """``(n, MODEL_DIM)``: a word vector plus a sinusoidal position code, per token."""
    n = len(words)
    positions = np.arange(n)[:, None]
    rates = 1.0 / 100.0 ** (np.arange(0, MODEL_DIM, 2) / MODEL_DIM)
    position_code = np.zeros((n, MODEL_DIM))
    position_code[:, 0::2] = np.sin(positions * rates)
    position_code[:, 1::2] = np.cos(positions * rates)
    words_code = (
        np.stack([word_vector(w, MODEL_DIM) for w in words]) if words else np.zeros((0, MODEL_DIM))
    )
    return words_code + position_code


def projections(heads: int = 1, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed random ``W_Q, W_K, W_V``, each ``(heads, MODEL_DIM, HEAD_DIM)``."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / math.sqrt(MODEL_DIM)
    return tuple(rng.standard_normal((heads, MODEL_DIM, HEAD_DIM)) * scale for _ in range(3))


def qkv(words: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One head's ``Q, K, V`` (each ``(n, HEAD_DIM)``) for `words`."""
    x = embeddings(words)
    w_q, w_k, w_v = projections()
    return x @ w_q[0], x @ w_k[0], x @ w_v[0]


def both_regimes(words: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"causal": (out, weights), "bidirectional": (out, weights)}`` from the same Q, K, V."""
    q, k, v = qkv(words)
    return {regime: engine.attention(q, k, v, is_causal=regime == "causal") for regime in REGIMES}


def edit_effect(words: list[str], position: int, replacement: str) -> dict[str, np.ndarray]:
    """How much each output row moves when the word at `position` is replaced.

    Returns, per regime, the largest absolute change of each output row. Under the causal
    mask rows before `position` cannot see the edit, so their change is exactly zero.
    """
    if not 0 <= position < len(words):
        raise InputError(f"pick a position between 0 and {len(words) - 1}")
    edited = list(words)
    edited[position] = replacement or words[position]
    before, after = both_regimes(words), both_regimes(edited)
    return {regime: np.abs(after[regime][0] - before[regime][0]).max(axis=-1) for regime in before}


def change_frame(change: dict[str, np.ndarray], row_labels: list[str]) -> pd.DataFrame:
    """:func:`edit_effect`'s result as rows (row, regime, change) for a grouped bar chart."""
    return pd.concat(
        [
            pd.DataFrame({"row": row_labels, "regime": regime, "change": change[regime]})
            for regime in REGIMES
        ]
    )


def rows_changed(change: dict[str, np.ndarray], position: int) -> dict[str, int]:
    """How many rows moved at all: causal rows before `position` (0 whenever the mask holds),
    and bidirectional rows anywhere."""
    return {
        "causal before the edit": int((change["causal"][:position] != 0).sum()),
        "bidirectional": int((change["bidirectional"] != 0).sum()),
    }


def alignment_weights(
    words: list[str], num_queries: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The last `num_queries` tokens as queries against every token as a key, causal, under
    both diagonal alignments. Returns ``{alignment: (weights, visible)}``."""
    q, k, v = qkv(words)
    num_queries = max(1, min(num_queries, len(words)))
    result = {}
    for alignment in ("top_left", "bottom_right"):
        _, weights = engine.attention(
            q[-num_queries:], k, v, is_causal=True, causal_alignment=alignment
        )
        visible = visibility(num_queries, len(words), is_causal=True, causal_alignment=alignment)
        result[alignment] = (weights, visible)
    return result


def window_weights(words: list[str], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Causal sliding-window attention: each token sees itself and the `window - 1` before it."""
    q, k, v = qkv(words)
    _, weights = engine.attention(q, k, v, is_causal=True, window=window)
    return weights, visibility(len(words), len(words), is_causal=True, window=window)


def gqa_weights(words: list[str], query_heads: int, kv_heads: int) -> np.ndarray:
    """Causal grouped-query attention: `query_heads` heads share `kv_heads` key/value heads.

    Returns weights ``(query_heads, n, n)``; query head h reads kv head ``h // (Hq // Hkv)``.
    """
    if kv_heads < 1 or query_heads % kv_heads:
        raise InputError("the number of query heads must be a multiple of the kv heads")
    x = embeddings(words)
    w_q, _, _ = projections(heads=query_heads, seed=SEED + 1)
    _, w_k, w_v = projections(heads=kv_heads, seed=SEED + 2)
    q = np.einsum("nd,hde->hne", x, w_q)
    k = np.einsum("nd,hde->hne", x, w_k)
    v = np.einsum("nd,hde->hne", x, w_v)
    _, weights = engine.attention(q, k, v, is_causal=True, enable_gqa=kv_heads != query_heads)
    return weights


def kv_bytes_per_token(kv_heads: int, head_dim: int = HEAD_DIM, bytes_per_value: int = 4) -> int:
    """Bytes a KV cache stores per token and layer: a key and a value for each kv head."""
    return 2 * kv_heads * head_dim * bytes_per_value
