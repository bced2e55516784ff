"""One attention head step by step, and what the √d_k factor is for.

``Q = x·W_Q``, ``K = x·W_K``, ``V = x·W_V``, scores ``Q·Kᵀ``, scaled, softmaxed, mixed — each
step returned so the page can show it, with the softmax and output taken from the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnscope.models.stats import row_entropy
from attnscope.reference import visibility

from . import engine
from .text import SentenceRule, word_vector

MODEL_DIM = 4
SENTENCE = SentenceRule(
    8,  # every matrix of the page stays readable
    empty="Type a few words to follow them through the head.",
    shortened="This page follows the first {limit} tokens so that every matrix stays readable.",
)


@dataclass(frozen=True)
class Steps:
    """Every intermediate of one head on a tiny sentence."""

    x: np.ndarray  # (n, MODEL_DIM) embeddings
    w_q: np.ndarray  # (MODEL_DIM, d_k)
    w_k: np.ndarray
    w_v: np.ndarray
    q: np.ndarray  # (n, d_k)
    k: np.ndarray
    v: np.ndarray
    scores: np.ndarray  # (n, n) Q·Kᵀ
    scale: float
    scaled: np.ndarray  # scores · scale
    weights: np.ndarray  # softmax, from the engine
    output: np.ndarray  # weights · V, from the engine
    visible: np.ndarray  # (n, n) the causal mask: True where a query may see a key

    def hide_future(self, matrix: np.ndarray) -> np.ndarray:
        """`matrix` with the cells the causal mask removes set to 0, for display."""
        return np.where(self.visible, matrix, 0.0)


def one_head(words: list[str], d_k: int, scaled: bool = True, seed: int = 4) -> Steps:
    """Run one head on `words` with key width `d_k`, dividing by √d_k when `scaled`."""
    # Two decimals: the embeddings are printed on the page and should read as plain numbers.
    x = np.stack([np.round(word_vector(w, MODEL_DIM), 2) for w in words])
    rng = np.random.default_rng(seed)
    # Weights of variance 1/MODEL_DIM keep each entry of Q and K near unit size, so a score
    # Q·Kᵀ, a sum of d_k such products, spreads like √d_k: exactly what 1/√d_k undoes.
    w_q, w_k, w_v = (
        np.round(rng.standard_normal((MODEL_DIM, d_k)) / math.sqrt(MODEL_DIM), 2) for _ in range(3)
    )
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    scale = 1.0 / math.sqrt(d_k) if scaled else 1.0
    output, weights = engine.attention(q, k, v, is_causal=True, scale=scale)
    scores = q @ k.T
    visible = visibility(len(words), len(words), is_causal=True)
    return Steps(x, w_q, w_k, w_v, q, k, v, scores, scale, scores * scale, weights, output, visible)


def softmax_by_hand(steps: Steps, row: int, key_labels: list[str]) -> pd.DataFrame:
    """Query `row`'s softmax worked out step by step over the keys it sees, next to the
    engine's weights: the scaled scores, exp(score − max), and exp over the row's sum."""
    seen = np.flatnonzero(steps.visible[row])
    scaled = steps.scaled[row, seen]
    exps = np.exp(scaled - scaled.max())
    return pd.DataFrame(
        {
            "key": [key_labels[j] for j in seen],
            "scaled score": scaled,
            "exp(score − max)": exps,
            "weight = exp / sum": exps / exps.sum(),
            "engine weight": steps.weights[row, seen],
        }
    )


def softmax_gradient_norm(weights: np.ndarray) -> np.ndarray:
    """Per row, the Frobenius norm of softmax's Jacobian ``diag(p) - p·pᵀ``.

    It is what backpropagation multiplies the incoming gradient by; it tends to 0 as a row
    becomes one-hot, which is how a saturated softmax stops learning.
    """
    p = np.asarray(weights, dtype=float)
    jacobian = -p[..., :, None] * p[..., None, :]
    diagonal = np.arange(p.shape[-1])
    jacobian[..., diagonal, diagonal] += p
    return np.sqrt((jacobian**2).sum(axis=(-2, -1)))


def saturation(
    d_values: tuple[int, ...], num_keys: int = 16, num_queries: int = 32, seed: int = 0
) -> pd.DataFrame:
    """Max weight, entropy and softmax gradient vs d_k, with and without the 1/√d_k factor.

    Queries and keys have unit-variance entries (as after a normalisation layer), so an
    unscaled score has standard deviation √d_k. Every weight comes from the engine.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for d_k in d_values:
        q = rng.standard_normal((num_queries, d_k))
        k = rng.standard_normal((num_keys, d_k))
        v = np.zeros((num_keys, 1))
        for label, scale in (("÷ √d_k", 1.0 / math.sqrt(d_k)), ("no scaling", 1.0)):
            _, weights = engine.attention(q, k, v, scale=scale)
            rows.append(
                {
                    "d_k": d_k,
                    "scaling": label,
                    "max weight": float(weights.max(axis=-1).mean()),
                    "entropy (nats)": float(row_entropy(weights).mean()),
                    "softmax gradient": float(softmax_gradient_norm(weights).mean()),
                    "score std": float((q @ k.T * scale).std()),
                }
            )
    return pd.DataFrame(rows)


def saturation_at(curves: pd.DataFrame, d_k: int) -> pd.DataFrame:
    """The rows of :func:`saturation` at width `d_k`, indexed by scaling ("÷ √d_k", "no
    scaling")."""
    return curves[curves["d_k"] == d_k].set_index("scaling")
