"""`scaled_dot_product_attention` and the thread controls. The Rust core checks shapes and
values; this layer keeps what the core cannot express (arrays, not lists; no bool where a number
is meant; `window=w` as its two sides) and picks the thread count of the calling context."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np

from ._checks import is_whole_number, whole_number
from ._engine import core
from .masks import Mask

try:  # bound once: tiny calls are dominated by fixed costs
    from ._core import scaled_dot_product_attention as _core_sdpa
    from ._core import scaled_dot_product_attention_backward as _core_backward
except ImportError:  # pragma: no cover - the call below then raises core()'s ImportError
    _core_sdpa = None
    _core_backward = None

# A window side wider than any sequence means "unbounded"; this one still fits the core's usize.
_WIDEST_SIDE = 2**63 - 1
# The thread count `threads(n)` set for this context (None: the engine-wide count).
_CONTEXT_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "attnscope_threads", default=None
)


def check_window(window) -> tuple[int | None, int | None] | None:
    """`w` (int >= 1) becomes `(w - 1, w - 1)`; `(left, right)` sides are ints >= 0 or None."""
    if window is None:
        return None
    if is_whole_number(window):
        if window < 1:
            raise ValueError(f"window must be >= 1 (the number of keys seen), got {window}")
        side = min(int(window) - 1, _WIDEST_SIDE)
        return (side, side)
    if isinstance(window, tuple | list) and len(window) == 2:
        sides = []
        for side, label in zip(window, ("left", "right"), strict=True):
            if side is None:
                sides.append(None)
            elif is_whole_number(side):
                if side < 0:
                    raise ValueError(f"window {label} side must be >= 0 or None, got {side}")
                sides.append(min(int(side), _WIDEST_SIDE))
            else:
                raise TypeError(f"window {label} side must be an int or None, got {side!r}")
        return (sides[0], sides[1])
    raise TypeError(f"window must be an int >= 1 or a (left, right) tuple, got {window!r}")


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    causal_alignment="top_left",
    window=None,
    return_weights=False,
    softcap=None,
    alibi_slopes=None,
    return_lse=False,
):
    """Exact attention ``softmax(Q·Kᵀ·scale + mask)·V`` on the CPU, with PyTorch's arguments.

    Args:
        query: ``(..., Hq, L, D)``; ``(L, D)`` and ``(H, L, D)`` work too.
        key: ``(..., Hkv, S, D)``; leading dims must equal the query's.
        value: ``(..., Hkv, S, Dv)``.
        attn_mask: bool (True = takes part) or float (added to the scaled scores, ``-inf``
            hides a key), broadcastable to ``(..., Hq, L, S)``; or an :mod:`attnscope.masks`
            expression, evaluated a tile at a time (the same for every batch and head).
        is_causal: key ``j`` is visible to query ``i`` only if ``j <= c(i)``.
        scale: multiplies ``Q·Kᵀ``; defaults to ``1/sqrt(D)``.
        enable_gqa: allow ``Hq`` to be a multiple of ``Hkv`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        causal_alignment: ``"top_left"`` (``c(i) = i``, PyTorch) or ``"bottom_right"``
            (``c(i) = i + S - L``, what a KV cache needs).
        window: ``w`` keeps keys with ``|j - c(i)| < w``; ``(left, right)`` keeps
            ``c(i) - left <= j <= c(i) + right`` (``None`` = unbounded side).
        return_weights: also return the ``(..., Hq, L, S)`` attention weights.
        softcap: ``c > 0``: each score ``s = scale·q·k`` becomes ``c·tanh(s / c)`` before
            anything is added to it (Gemma 2, Grok).
        alibi_slopes: ``(Hq,)`` finite slopes: query head ``h`` adds
            ``slope[h]·(j - c(i))`` to its (capped) scores, on ``causal_alignment``'s diagonal
            (ALiBi as FlashAttention defines it), before the mask.
        return_lse: also return the log-sum-exp of every query row, ``(..., Hq, L)``: the
            natural log of ``sum(exp(s))`` over the row's visible scaled, masked scores
            (``-inf`` for a row that sees no key). It is what
            :func:`scaled_dot_product_attention_backward` needs.

    Returns:
        The output ``(..., Hq, L, Dv)`` in the input dtype; ``(output, weights)`` with
        ``return_weights``; ``(output, lse)`` with ``return_lse``; ``(output, weights, lse)``
        with both. A query with no visible key gets zeros.

    Raises:
        TypeError: non-array input, unsupported or mixed dtypes.
        ValueError: shapes that do not fit together, bad option values, weights too large
            for the limit set by :func:`set_weights_memory_limit`.
    """
    # Written for speed: tiny calls are dominated by fixed costs, and the core checks the rest.
    return (_core_sdpa or core().scaled_dot_product_attention)(
        query,
        key,
        value,
        attn_mask._expr if isinstance(attn_mask, Mask) else attn_mask,
        is_causal,
        scale,
        enable_gqa,
        causal_alignment,
        None if window is None else check_window(window),
        return_weights,
        _CONTEXT_THREADS.get(),
        softcap,
        None if alibi_slopes is None else _slopes(alibi_slopes),
        return_lse,
    )


def scaled_dot_product_attention_backward(
    grad_out,
    query,
    key,
    value,
    out,
    lse,
    attn_mask=None,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    causal_alignment="top_left",
    window=None,
    softcap=None,
    alibi_slopes=None,
):
    """The gradients of :func:`scaled_dot_product_attention` with respect to query, key and value.

    FlashAttention-2's backward: the weights are recomputed a tile at a time from ``lse``, so
    the ``(L, S)`` matrices never exist (memory beyond the gradients grows with ``L + S``).
    Results are bitwise identical for every thread count.

    Args:
        grad_out: the gradient of the loss with respect to the output, ``(..., Hq, L, Dv)``.
        query, key, value: the forward's inputs.
        out: the forward's output, ``(..., Hq, L, Dv)``.
        lse: the forward's log-sum-exp, ``(..., Hq, L)``, from ``return_lse=True``.
        attn_mask, is_causal, scale, enable_gqa, causal_alignment, window, softcap,
            alibi_slopes: the forward's options, which must be the ones ``out`` and ``lse``
            were computed with. A float mask and ALiBi's slopes are constants: they get no
            gradient. With a softcap, each score's gradient passes through the cap's
            derivative ``1 - tanh²(s / softcap)``.

    Returns:
        ``(grad_query, grad_key, grad_value)`` in the shapes and dtype of query, key and value.
        With grouped-query attention, a kv head's gradients sum those of its query heads. A
        query row that sees no key contributes nothing (its ``grad_query`` is zero).

    Raises:
        TypeError: non-array input, unsupported dtypes, or arrays not all in the query's dtype.
        ValueError: shapes that do not fit together (``grad_out`` and ``out`` must have the
            output's shape, ``lse`` ``(..., Hq, L)``), bad option values.
    """
    return (_core_backward or core().scaled_dot_product_attention_backward)(
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        attn_mask._expr if isinstance(attn_mask, Mask) else attn_mask,
        is_causal,
        scale,
        enable_gqa,
        causal_alignment,
        None if window is None else check_window(window),
        _CONTEXT_THREADS.get(),
        softcap,
        None if alibi_slopes is None else _slopes(alibi_slopes),
    )


def _slopes(alibi_slopes) -> np.ndarray:
    """ALiBi slopes as a 1-D float64 array (the core checks their number and values)."""
    array = np.asarray(alibi_slopes)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"alibi_slopes must hold real numbers, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise TypeError("alibi_slopes must hold real numbers, got complex values")
    if array.ndim != 1:
        raise ValueError(f"alibi_slopes must have shape (Hq,), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float64)


def context_threads() -> int | None:
    """The thread count set by :func:`threads` for the calling context, or None."""
    return _CONTEXT_THREADS.get()


def set_num_threads(num_threads: int) -> None:
    """Use `num_threads` worker threads for every later call (1 = run serially), in every
    thread and context that has not chosen its own count with :func:`threads`."""
    core().set_num_threads(whole_number(num_threads, "num_threads"))


def get_num_threads() -> int:
    """The worker threads a call made here would use: the count of the enclosing
    :func:`threads` block, else the engine-wide one (``set_num_threads``, else
    ``ATTNSCOPE_NUM_THREADS``, else the CPU count).

    Raises:
        ValueError: ``ATTNSCOPE_NUM_THREADS`` is not a whole number from 1 to the maximum.
    """
    chosen = _CONTEXT_THREADS.get()
    return core().get_num_threads() if chosen is None else chosen


@contextlib.contextmanager
def threads(num_threads: int) -> Iterator[None]:
    """Run the engine calls made inside the block on `num_threads` worker threads.

    The choice belongs to the current Python thread (and asyncio task, through
    :mod:`contextvars`): other threads, and the engine-wide count of
    :func:`set_num_threads`, are not touched. Blocks nest; the innermost wins.

    Example::

        with attnscope.threads(1):
            out = attnscope.scaled_dot_product_attention(q, k, v)
    """
    token = _CONTEXT_THREADS.set(core().check_num_threads(whole_number(num_threads, "num_threads")))
    try:
        yield
    finally:
        _CONTEXT_THREADS.reset(token)


def set_weights_memory_limit(num_bytes: int) -> None:
    """Refuse ``return_weights=True`` when the weights array would exceed `num_bytes`."""
    num_bytes = whole_number(num_bytes, "num_bytes", low=0)
    core().set_weights_memory_limit(min(num_bytes, 2**64 - 1))


def get_weights_memory_limit() -> int:
    """The largest weights array, in bytes, that ``return_weights=True`` may allocate."""
    return core().get_weights_memory_limit()
