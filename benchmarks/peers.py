"""The peers attnscope is timed against, and the float64 check every benchmark row passes.

* NumPy naive: float32 attention that materialises the whole ``(B, H, L, S)`` score matrix and
  its softmax, which is what attention costs without tiling (the same function the
  dashboard's cost page times, :func:`attnscope.reference.naive_attention`).
* torch: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` on the CPU, used only
  when torch is importable.

The float64 check is :mod:`attnscope.reference` on a sample of heads and query rows. That way
it stays cheap at sizes where the full float64 score matrix would not fit in memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from attnscope import masks, reference
from attnscope.reference import naive_attention

__all__ = [
    "ERROR_TOLERANCE",
    "load_torch",
    "max_relative_error",
    "naive_attention",
    "naive_bytes",
    "naive_multi_head_attention",
    "torch_mha_call",
    "torch_sdpa_call",
    "visible_pairs",
    "visible_rows",
]

# Largest allowed |attnscope - float64 reference|, relative to the largest reference output.
ERROR_TOLERANCE = 2e-5


def load_torch():
    """The torch module, or None when it is not installed (every torch column then says so)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _row_bounds(rows, num_queries, num_keys, is_causal, causal_alignment, window):
    """First and last visible key of each query row (``last < first`` means none).

    This is the same rule as :func:`attnscope.reference.visibility`, but computed for any
    subset of rows, so it also works at sizes where the full L x S matrix would not fit.
    """
    rows = np.asarray(rows, dtype=np.int64)
    offset = 0 if causal_alignment == "top_left" else num_keys - num_queries
    diagonal = rows + offset
    first = np.zeros_like(rows)
    last = np.full_like(rows, num_keys - 1)
    if is_causal:
        last = np.minimum(last, diagonal)
    bounds = reference.normalize_window(window)
    if bounds is not None:
        left, right = bounds
        if left is not None:
            first = np.maximum(first, diagonal - left)
        if right is not None:
            last = np.minimum(last, diagonal + right)
    return first, last


def visible_rows(
    rows, num_queries, num_keys, *, is_causal=False, causal_alignment="top_left", window=None
) -> np.ndarray:
    """The ``(len(rows), S)`` bool visibility of the given query rows (True = may attend)."""
    first, last = _row_bounds(rows, num_queries, num_keys, is_causal, causal_alignment, window)
    keys = np.arange(num_keys)[None, :]
    return (keys >= first[:, None]) & (keys <= last[:, None])


def visible_pairs(
    num_queries, num_keys, *, is_causal=False, causal_alignment="top_left", window=None
) -> int:
    """How many (query, key) pairs are visible: the work an exact kernel cannot skip."""
    rows = np.arange(num_queries)
    first, last = _row_bounds(rows, num_queries, num_keys, is_causal, causal_alignment, window)
    return int(np.maximum(last - first + 1, 0).sum())


def naive_bytes(batch, heads, num_queries, num_keys, masked) -> int:
    """Memory :func:`naive_attention` needs: the float32 score matrix, plus the bool mask."""
    return batch * heads * num_queries * num_keys * 4 + (num_queries * num_keys if masked else 0)


def naive_multi_head_attention(x, weights, num_heads) -> np.ndarray:
    """Self-attention with projections ``Q = x·W_Q + b_Q`` and so on, using :func:`naive_attention`.

    `weights` maps ``w_q, w_k, w_v, w_o`` (``(E, E)``, applied as ``x @ w``) and ``b_q, b_k,
    b_v, b_o`` (or None) to arrays of x's dtype, the same layout attnscope's module uses.
    """
    batch, length, embed = x.shape
    head_dim = embed // num_heads

    def project(name):
        out = x @ weights[f"w_{name}"]
        if weights.get(f"b_{name}") is not None:
            out += weights[f"b_{name}"]
        return out.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)

    heads = naive_attention(project("q"), project("k"), project("v"))
    merged = heads.transpose(0, 2, 1, 3).reshape(batch, length, embed)
    out = merged @ weights["w_o"]
    if weights.get("b_o") is not None:
        out += weights["b_o"]
    return out


def torch_sdpa_call(torch, query, key, value, *, is_causal=False, attn_mask=None):
    """A zero-argument call of torch's SDPA on views of the NumPy inputs, plus its backend name.

    The inputs stay 4-D and contiguous and dropout is 0, so torch can take its fused CPU
    (flash) kernel. Fewer key heads than query heads are passed as grouped-query attention.
    The backend name is torch's own choice for exactly these arguments.
    """
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (query, key, value)]
    mask = None if attn_mask is None else torch.from_numpy(attn_mask)
    if any(t.dim() != 4 or not t.is_contiguous() for t in tensors):
        raise ValueError("torch SDPA inputs must be 4-D and contiguous to take the flash path")
    options = {"attn_mask": mask, "dropout_p": 0.0, "is_causal": is_causal}
    if query.shape[1] != key.shape[1]:
        options["enable_gqa"] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call():
        with torch.inference_mode():
            return sdpa(*tensors, **options)

    return call, _torch_backend(torch, tensors, options)


def torch_sdpa_backward_call(torch, query, key, value, grad_out, *, is_causal=False):
    """A zero-argument call of torch's SDPA forward and its backward through autograd."""
    tensors = [
        torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in (query, key, value)
    ]
    grad = torch.from_numpy(np.ascontiguousarray(grad_out))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call():
        out = sdpa(*tensors, dropout_p=0.0, is_causal=is_causal)
        return torch.autograd.grad(out, tensors, grad)

    return call


def _torch_backend(torch, tensors, options) -> str:
    """Which SDPA kernel torch picks for these inputs ("flash_attention", "math", ...)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(*tensors, **options)
        return SDPBackend(choice).name.lower()
    except (AttributeError, ImportError, RuntimeError, TypeError, ValueError):
        return "unknown"


def torch_mha_call(torch, module, x) -> Callable[[], object]:
    """A zero-argument self-attention call of an ``nn.MultiheadAttention(batch_first=True)``.

    It runs in eval mode under inference_mode with ``need_weights=False``, which are the
    conditions for torch's fused fast path.
    """
    module.eval()
    tensor = torch.from_numpy(x)

    def call():
        with torch.inference_mode():
            return module(tensor, tensor, tensor, need_weights=False)[0]

    return call


def _spread(count, limit) -> np.ndarray:
    """Up to `limit` indices spread evenly over ``range(count)``, first and last included."""
    return np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(np.int64))


def max_relative_error(
    out,
    query,
    key,
    value,
    *,
    is_causal=False,
    causal_alignment="top_left",
    window=None,
    max_rows=64,
    max_heads=8,
) -> float:
    """``max |out - float64 reference| / max |reference|`` over sampled heads and query rows.

    Inputs are ``(B, H, L, D)``; with fewer key heads than query heads, query head ``h`` reads
    key head ``h // (Hq // Hkv)``. The sample always contains the first and last query row
    and head.
    """
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    heads = _spread(query.shape[1], max_heads)
    kv_heads = heads // (query.shape[1] // key.shape[1])
    rows = _spread(num_queries, max_rows)
    visible = visible_rows(
        rows,
        num_queries,
        num_keys,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        window=window,
    )
    expected = reference.scaled_dot_product_attention(
        query[:, heads][:, :, rows], key[:, kv_heads], value[:, kv_heads], attn_mask=visible
    )
    got = np.asarray(out)[:, heads][:, :, rows]
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-300))


def _longformer(length: int):
    return masks.causal() & (masks.window(511, 0) | masks.global_tokens(range(16)))


def _packed_documents(length: int):
    return masks.document(np.arange(length) // 2048) & masks.causal()


def _bigbird(length: int):
    """Block 64: 3 random blocks, a window of 3 blocks (the query's and one each side),
    2 global blocks (the first 128 tokens)."""
    return (
        masks.random_blocks(64, 3, seed=0) | masks.window(64 + 63) | masks.global_tokens(range(128))
    )


#: Mask expressions of the sparse rows, by name, as functions of L = S.
MASK_PATTERNS = {
    "longformer": _longformer,
    "sinks_window": lambda length: masks.causal() & (masks.sinks(4) | masks.window(1023, 0)),
    "documents": _packed_documents,
    "bigbird": _bigbird,
}


def max_relative_error_masked(out, query, key, value, mask, max_rows=64, max_heads=4, **rules):
    """:func:`max_relative_error` under a mask expression, on sampled heads and query rows
    (only those rows of its dense matrix are built)."""
    num_queries, num_keys = query.shape[-2], key.shape[-2]
    heads = _spread(query.shape[1], max_heads)
    rows = _spread(num_queries, max_rows)
    visible = mask.dense_rows(num_queries, num_keys, rows)
    expected = reference.scaled_dot_product_attention(
        query[:, heads][:, :, rows], key[:, heads], value[:, heads], attn_mask=visible, **rules
    )
    got = np.asarray(out)[:, heads][:, :, rows]
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-300))
