"""One attention head step by step, and what the √d_k factor is for.

``Q = x·W_Q``, ``K = x·W_K``, ``V = x·W_V``, scores ``Q·Kᵀ``, scaled, softmaxed, mixed — each
step returned so the page can show it, with the softmax and output taken from the engine.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import engine

MODEL_DIM = 4


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


def _word_embedding(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.lower().encode(), digest_size=8).digest(), "big")
    return np.round(np.random.default_rng(seed).standard_normal(MODEL_DIM), 2)


def one_head(words: list[str], d_k: int, scaled: bool = True, seed: int = 4) -> Steps:
    """Run one head on `words` with key width `d_k`, dividing by √d_k when `scaled`."""
    x = np.stack([_word_embedding(w) for w in words])
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
    return Steps(x, w_q, w_k, w_v, q, k, v, scores, scale, scores * scale, weights, output)


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


def entropy(weights: np.ndarray) -> np.ndarray:
    """Per row, the entropy of the weights in nats (0 = all weight on one key)."""
    p = np.asarray(weights, dtype=float)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=-1)


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
                    "entropy (nats)": float(entropy(weights).mean()),
                    "softmax gradient": float(softmax_gradient_norm(weights).mean()),
                    "score std": float((q @ k.T * scale).std()),
                }
            )
    return pd.DataFrame(rows)
