"""The executable specification of attnscope's attention, in plain float64 NumPy.

Every fast path is tested against these functions. They materialise the full L x S score
matrix and favour being obviously right over being fast or frugal. ``naive_attention`` is the
same textbook computation in the inputs' dtype: the baseline the dashboard and the benchmarks
time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "log_sum_exp",
    "naive_attention",
    "normalize_window",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "softmax",
    "visibility",
]


def normalize_window(window) -> tuple[int | None, int | None] | None:
    """`window=w` means `(w - 1, w - 1)`; `(left, right)` is kept; `None` stays `None`."""
    if window is None:
        return None
    if isinstance(window, tuple | list):
        left, right = window
        return (None if left is None else int(left), None if right is None else int(right))
    return (int(window) - 1, int(window) - 1)


def diagonals(num_queries: int, num_keys: int, causal_alignment: str = "top_left") -> np.ndarray:
    """Column ``(L, 1)`` of each query's diagonal ``c(i)``: ``i`` top-left, ``i + S - L``
    bottom-right. The causal rule, windows and ALiBi all measure from it."""
    rows = np.arange(num_queries)[:, None]
    return rows if causal_alignment == "top_left" else rows + (num_keys - num_queries)


def visibility(
    num_queries: int,
    num_keys: int,
    *,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    window=None,
) -> np.ndarray:
    """The (L, S) boolean matrix of which key each query may see under causal/window rules."""
    cols = np.arange(num_keys)[None, :]
    diagonal = diagonals(num_queries, num_keys, causal_alignment)
    visible = np.ones((num_queries, num_keys), dtype=bool)
    if is_causal:
        visible &= cols <= diagonal
    bounds = normalize_window(window)
    if bounds is not None:
        left, right = bounds
        if left is not None:
            visible &= cols >= diagonal - left
        if right is not None:
            visible &= cols <= diagonal + right
    return visible


def softmax(scores: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, restricted to `visible`, as PyTorch computes it.

    A row with nothing to weigh (no visible key, or only scores of -inf) is all zeros. A NaN or
    +inf among a row's visible scores makes the whole row NaN (+inf - +inf is NaN).
    """
    masked = np.where(visible, scores, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True, initial=-np.inf)  # NaN if any score is NaN
    empty = row_max == -np.inf
    with np.errstate(invalid="ignore"):
        exps = np.exp(masked - np.where(empty, 0.0, row_max))
        total = exps.sum(axis=-1, keepdims=True)
        return np.where(empty, 0.0, exps / np.where(empty, 1.0, total))


def log_sum_exp(scores: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """``log(sum(exp(s)))`` over each row's visible scores; ``-inf`` for a row that sees none."""
    masked = np.where(visible, scores, -np.inf)
    row_max = masked.max(axis=-1, initial=-np.inf)
    shift = np.where(np.isfinite(row_max), row_max, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.exp(masked - shift[..., None]).sum(axis=-1)) + shift


class _Scores(NamedTuple):
    """One call's scores, as :func:`_scores` builds them for the forward and the backward."""

    query: np.ndarray  # float64
    key: np.ndarray  # float64, each kv head repeated for its query heads
    value: np.ndarray  # float64, likewise
    scores: np.ndarray  # scaled, capped, biased and masked: (..., Hq, L, S)
    visible: np.ndarray  # which scores take part, broadcast to the scores' shape
    scale: float
    cap_slope: np.ndarray | float  # d(score) / d(scale·q·k): 1 without a softcap


def _scores(
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
    softcap=None,
    alibi_slopes=None,
) -> _Scores:
    """The scores of one call, with the engine's arguments.

    A score's life: ``s = scale·q·k``, then ``softcap·tanh(s / softcap)``, then
    ``+ slope[h]·(j - c(i))`` (ALiBi), then the float mask is added / hidden keys dropped. An
    :mod:`attnscope.masks` expression is used as its dense ``(L, S)`` matrix.
    """
    q = np.asarray(query, dtype=np.float64)
    k = np.asarray(key, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(
            f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}"
        )
    num_queries, num_keys, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]

    # Grouped-query attention: query head h reads kv head h // group.
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        if not enable_gqa or q.shape[-3] % k.shape[-3] != 0:
            raise ValueError(
                f"query heads {q.shape[-3]} vs key heads {k.shape[-3]} need enable_gqa"
            )
        group = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    cap_slope = 1.0
    if softcap is not None:
        capped = np.tanh(scores / softcap)
        scores, cap_slope = softcap * capped, 1.0 - capped**2
    if alibi_slopes is not None:
        distance = np.arange(num_keys)[None, :] - diagonals(num_queries, num_keys, causal_alignment)
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        bias = slopes[:, None, None] * distance  # (Hq, L, S); a 2-D call is one head
        scores = scores + (bias if scores.ndim >= 3 else bias[0])
    if attn_mask is not None and hasattr(attn_mask, "to_dense"):
        attn_mask = attn_mask.to_dense(num_queries, num_keys)

    visible = visibility(
        num_queries,
        num_keys,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        window=window,
    )
    visible = np.broadcast_to(visible, scores.shape)
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        if mask.dtype == np.bool_:
            visible = visible & mask
        else:
            mask = mask.astype(np.float64)
            visible = visible & (mask != -np.inf)
            scores = scores + mask
    return _Scores(q, k, v, scores, visible, scale, cap_slope)


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
    return_lse=False,
    softcap=None,
    alibi_slopes=None,
):
    """softmax(Q·Kᵀ·scale + mask) · V in float64, with the same arguments as the engine's
    :func:`attnscope.scaled_dot_product_attention` (see ``_scores`` for the order they act in).

    Shapes: query (..., Hq, L, D), key (..., Hkv, S, D), value (..., Hkv, S, Dv); 2-D inputs
    are a single head. Returns float64 output (..., Hq, L, Dv) and, if asked, the weights and
    the log-sum-exp (..., Hq, L), in that order.
    """
    call = _scores(
        query,
        key,
        value,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        causal_alignment=causal_alignment,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    weights = softmax(call.scores, call.visible)
    # A masked-out value must not reach the output even when it is NaN or inf, and 0 * NaN is
    # NaN, so non-finite values take the exact (slow) road of summing only visible keys.
    if np.isfinite(call.value).all():
        out = weights @ call.value
    else:
        with np.errstate(invalid="ignore"):  # 0 * inf at hidden keys, discarded just below
            picked = weights[..., None] * call.value[..., None, :, :]
            picked = np.where(call.visible[..., None], picked, 0.0)
        out = picked.sum(axis=-2)
    results = (out,) + ((weights,) if return_weights else ())
    results += (log_sum_exp(call.scores, call.visible),) if return_lse else ()
    return results if len(results) > 1 else out


def scaled_dot_product_attention_backward(
    grad_out,
    query,
    key,
    value,
    out=None,
    lse=None,
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
    """The gradients ``(grad_query, grad_key, grad_value)`` of the attention above, in float64,
    with the arguments of the engine's :func:`attnscope.scaled_dot_product_attention_backward`.

    The textbook chain rule through the full weights ``P``: ``dV = Pᵀ·dO``,
    ``dS = P ∘ (dO·Vᵀ - rowsum(P ∘ dO·Vᵀ))``, ``dQ = scale·dS·K``, ``dK = scale·dSᵀ·Q``. A
    float mask is a constant. ``out`` and ``lse`` are accepted for the engine's signature and
    not needed: the weights are computed again here. A softcap multiplies ``dS`` by
    ``1 - tanh(s / softcap)²``; ALiBi's bias is a constant.
    """
    call = _scores(
        query,
        key,
        value,
        attn_mask,
        is_causal,
        scale,
        enable_gqa,
        causal_alignment=causal_alignment,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    weights = softmax(call.scores, call.visible)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    grad_value = np.swapaxes(weights, -1, -2) @ grad_out
    grad_weights = grad_out @ np.swapaxes(call.value, -1, -2)
    grad_scores = weights * (grad_weights - (weights * grad_weights).sum(axis=-1, keepdims=True))
    grad_scores = grad_scores * call.cap_slope
    grad_query = call.scale * grad_scores @ call.key
    grad_key = call.scale * np.swapaxes(grad_scores, -1, -2) @ call.query
    key_shape = np.shape(key)
    if grad_key.shape != key_shape:  # grouped heads: sum each kv head's query heads
        group = grad_key.shape[-3] // key_shape[-3]
        regroup = (*key_shape[:-2], group, *grad_key.shape[-2:])
        grad_key = grad_key.reshape(regroup).sum(axis=-3)
        grad_value = grad_value.reshape((*regroup[:-1], grad_value.shape[-1])).sum(axis=-3)
    return grad_query, grad_key, grad_value


def naive_attention(query, key, value, hidden=None) -> np.ndarray:
    """The textbook attention ``softmax(Q·Kᵀ/√D) · V`` in the inputs' dtype, with the whole
    ``(..., L, S)`` score matrix in memory: what attention costs without tiling, the baseline
    the benchmarks and the dashboard's cost page time the engine against (not a specification:
    the functions above are).

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


def stored_values(x: np.ndarray, storage: str) -> np.ndarray:
    """`x` (float32, last axis = head_dim) rounded as a ``KVCache(storage=...)`` keeps it,
    back in float32: what attention over a compressed cache must equal. (The cache refuses
    what a storage cannot keep: inf or NaN for int8, finite values past ±65504 for float16.)"""
    x = np.asarray(x, dtype=np.float32)
    if storage == "float32":
        return x
    if storage == "float16":
        return x.astype(np.float16).astype(np.float32)
    if storage == "bfloat16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16  # nearest, ties to even
        return rounded.astype(np.uint32).view(np.float32)
    # int8: blocks of 32 along the last axis, scale = max|x| / 127, round half away from 0.
    depth = x.shape[-1]
    padded = np.zeros(x.shape[:-1] + (-(-depth // 32) * 32,), dtype=np.float32)
    padded[..., :depth] = x
    blocks = padded.reshape(x.shape[:-1] + (-1, 32))
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = largest / np.float32(127)
    inverse = np.where(largest > 0, np.float32(127) / np.where(largest > 0, largest, 1), 0)
    scaled = blocks * inverse.astype(np.float32)
    q = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), -127, 127)
    return (q.astype(np.float32) * scale).reshape(padded.shape)[..., :depth]
