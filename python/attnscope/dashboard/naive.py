"""The textbook attention in NumPy: build every score, softmax them, multiply by V.

It is the baseline that the cost page and the benchmarks time against the engine: it holds the
whole ``(..., L, S)`` score matrix in memory, which is what attention costs without tiling.
It needs NumPy only, so the benchmarks can import it without the dashboard's dependencies.
"""

from __future__ import annotations

import math

import numpy as np


def naive_attention(query, key, value, hidden=None) -> np.ndarray:
    """``softmax(Q·Kᵀ/√D) · V`` with the scores materialised, in the inputs' dtype.

    `hidden` is an ``(L, S)`` bool array, True where a key is masked out (callers build it
    outside any timed region). Leading dimensions broadcast as in :func:`numpy.matmul`.
    """
    dtype = query.dtype.type
    scores = np.matmul(query, np.swapaxes(key, -1, -2))
    scores *= dtype(1.0 / math.sqrt(query.shape[-1]))
    if hidden is not None:
        np.copyto(scores, dtype(-np.inf), where=hidden)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, value)
