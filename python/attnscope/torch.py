"""attnscope's attention as a differentiable PyTorch operation on CPU tensors.

``attnscope.torch.scaled_dot_product_attention`` takes PyTorch's arguments and returns a
tensor that autograd differentiates with attnscope's exact backward pass, so a PyTorch model
can train with the engine's kernels::

    import attnscope.torch as atorch
    out = atorch.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()

Only this module imports torch; the rest of attnscope never needs it.
"""

from __future__ import annotations

import numpy as np
import torch

from ._attention import (
    scaled_dot_product_attention as _forward,
)
from ._attention import (
    scaled_dot_product_attention_backward as _backward,
)

__all__ = ["scaled_dot_product_attention"]

_DTYPES = (torch.float32, torch.float64)


def _check_tensor(tensor, name: str, dtype=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"{name} is on {tensor.device}; attnscope computes on the CPU: move it with "
            f"{name}.cpu()"
        )
    if tensor.dtype not in _DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; attnscope computes in torch.float32 or "
            f"torch.float64: convert with {name}.float()"
        )
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(
            f"query, key and value must share one dtype, got {dtype} and {tensor.dtype} for {name}"
        )


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's data (no copy, no autograd history)."""
    return tensor.detach().numpy()


def _mask_tensor(attn_mask) -> torch.Tensor | None:
    """The mask as the engine reads it: the caller's tensor (saved for backward, so editing it
    in place before backward raises torch's in-place error), or a float32 copy of a 16-bit one."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device.type != "cpu":
        raise ValueError(f"attn_mask is on {attn_mask.device}; move it with attn_mask.cpu()")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(
            f"attn_mask has dtype {attn_mask.dtype}; use a bool mask (True = may attend) or a "
            "float mask added to the scores"
        )
    if attn_mask.dtype in (torch.float16, torch.bfloat16):
        attn_mask = attn_mask.float()
    return attn_mask.detach()


def _slopes_array(alibi_slopes):
    """ALiBi slopes as NumPy reads them, copied (a tensor is detached and brought to the CPU):
    editing the caller's slopes between forward and backward cannot change the gradient."""
    if isinstance(alibi_slopes, torch.Tensor):
        return alibi_slopes.detach().cpu().numpy().copy()
    if isinstance(alibi_slopes, np.ndarray):
        return alibi_slopes.copy()
    return alibi_slopes


class _Attention(torch.autograd.Function):
    """Forward keeps the output and its log-sum-exp; backward runs the engine's backward.

    Every tensor backward reads (query, key, value and the mask) is saved with
    ``save_for_backward``, so torch raises its in-place-modification error if one is edited
    between forward and backward instead of the gradient changing silently."""

    @staticmethod
    def forward(ctx, query, key, value, mask, options):
        arrays = [_array(tensor) for tensor in (query, key, value)]
        mask_array = None if mask is None else _array(mask)
        out, lse = _forward(*arrays, mask_array, **options, return_lse=True)
        out_tensor, lse_tensor = torch.from_numpy(out), torch.from_numpy(lse)
        ctx.has_mask = mask is not None
        saved = (query, key, value, out_tensor, lse_tensor)
        ctx.save_for_backward(*saved, *((mask,) if ctx.has_mask else ()))
        ctx.options = options
        return out_tensor

    @staticmethod
    def backward(ctx, grad_out):
        # Autograd runs backward with grad mode on exactly when a graph of the gradient is
        # wanted (create_graph=True). There is no second derivative: refuse it every time,
        # rather than hand back a gradient whose own gradient would be silently zero.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "attnscope.torch.scaled_dot_product_attention has no second derivative: "
                "backward with create_graph=True (double backward, gradient penalties) is "
                "not supported; use torch.nn.functional.scaled_dot_product_attention for it"
            )
        query, key, value, out, lse, *mask = ctx.saved_tensors
        grad_out = grad_out.to(out.dtype)
        grads = _backward(
            _array(grad_out),
            *(_array(tensor) for tensor in (query, key, value, out, lse)),
            _array(mask[0]) if ctx.has_mask else None,
            **ctx.options,
        )
        needed = ctx.needs_input_grad[:3]
        return (
            *(
                torch.from_numpy(grad) if need else None
                for grad, need in zip(grads, needed, strict=True)
            ),
            None,
            None,
        )


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
    softcap=None,
    alibi_slopes=None,
):
    """:func:`attnscope.scaled_dot_product_attention` on CPU tensors, differentiable.

    Arguments and shapes are those of :func:`attnscope.scaled_dot_product_attention` (and of
    ``torch.nn.functional.scaled_dot_product_attention``, without dropout). Gradients flow to
    query, key and value through attnscope's backward pass; a mask and ALiBi's slopes (a
    sequence, array or tensor of ``Hq`` numbers) are constants and get no gradient. The slopes
    are copied; the mask is kept, so editing it in place before ``backward`` raises torch's
    in-place-modification error, as torch's own attention does. There is no second
    derivative: a backward with ``create_graph=True`` raises ``RuntimeError``.

    Raises:
        TypeError: a non-tensor, a dtype other than float32/float64, or mixed dtypes.
        ValueError: a tensor not on the CPU, and every check of the NumPy function.
    """
    _check_tensor(query, "query")
    _check_tensor(key, "key", query.dtype)
    _check_tensor(value, "value", query.dtype)
    options = dict(
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        causal_alignment=causal_alignment,
        window=window,
        softcap=softcap,
        alibi_slopes=_slopes_array(alibi_slopes),
    )
    return _Attention.apply(query, key, value, _mask_tensor(attn_mask), options)
