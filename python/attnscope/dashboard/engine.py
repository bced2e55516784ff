"""The one door through which every dashboard page computes attention.

It uses the compiled attnscope engine when it can be imported and otherwise the readable NumPy
reference (same arguments, slow but exact), and says which one ran so a page can show a banner.
"""

from __future__ import annotations

import numpy as np

import attnscope
from attnscope import reference

COMPILED_NAME = "attnscope (Rust engine)"
FALLBACK_NAME = "attnscope.reference (NumPy fallback)"


def compiled_available() -> bool:
    """True when the Rust engine can be imported; False means the pages use the reference."""
    return attnscope.core_available()


def engine_name() -> str:
    """A label for charts and banners saying which implementation computed the numbers."""
    return COMPILED_NAME if compiled_available() else FALLBACK_NAME


def fallback_message() -> str | None:
    """The banner text when the compiled engine is missing, or None when it is present."""
    if compiled_available():
        return None
    return (
        "The compiled attnscope engine could not be imported, so every number on this page "
        "comes from `attnscope.reference`, the slow float64 NumPy specification. The pictures "
        "are identical; the cost page is slower. Build the engine with `make build`."
    )


def attention(q, k, v, **options) -> tuple[np.ndarray, np.ndarray]:
    """Run scaled dot-product attention and return ``(output, weights)``.

    Takes exactly the arguments of :func:`attnscope.scaled_dot_product_attention` except
    ``return_weights``, which is always on. Float64 inputs give float64 results on both paths.
    """
    sdpa = (
        attnscope.scaled_dot_product_attention
        if compiled_available()
        else reference.scaled_dot_product_attention
    )
    out, weights = sdpa(q, k, v, return_weights=True, **options)
    return np.asarray(out), np.asarray(weights)


def attention_with_lse(q, k, v, **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`attention`, plus each query row's log-sum-exp of its scaled scores
    (natural log, ``-inf`` for a row that sees no key): ``(output, weights, lse)``."""
    sdpa = (
        attnscope.scaled_dot_product_attention
        if compiled_available()
        else reference.scaled_dot_product_attention
    )
    out, weights, lse = sdpa(q, k, v, return_weights=True, return_lse=True, **options)
    return np.asarray(out), np.asarray(weights), np.asarray(lse)


def attention_output(q, k, v, **options) -> np.ndarray:
    """Scaled dot-product attention without the weights (what the cost page times)."""
    if compiled_available():
        return attnscope.scaled_dot_product_attention(q, k, v, **options)
    return reference.scaled_dot_product_attention(q, k, v, **options)


def get_threads() -> int:
    """The engine's thread count (1 for the single-threaded reference)."""
    return attnscope.get_num_threads() if compiled_available() else 1
