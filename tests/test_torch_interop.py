"""attnscope's backward against torch.autograd through
`torch.nn.functional.scaled_dot_product_attention` with the equivalent dense mask, and the
`attnscope.torch` autograd wrapper (skipped when torch is not installed). Every row keeps at
least one visible key: PyTorch's gradients are NaN for a fully masked row."""

from __future__ import annotations

import math

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import assert_close

torch = pytest.importorskip("torch", reason="torch is an optional peer; these tests need it")
functional = pytest.importorskip("torch.nn.functional")
atorch = pytest.importorskip("attnscope.torch")

GRAD_TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}


def _dense_mask(num_queries, num_keys, mask, options):
    """The bool or float (L, S)-broadcastable mask PyTorch needs for the same visibility."""
    visible = reference.visibility(
        num_queries,
        num_keys,
        is_causal=options.get("is_causal", False),
        causal_alignment=options.get("causal_alignment", "top_left"),
        window=options.get("window"),
    )
    if mask is None:
        return visible
    if mask.dtype == bool:
        return mask & visible
    return np.where(visible, mask, -np.inf)


def _torch_grads(q, k, v, grad_out, dense_mask, options):
    tensors = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = functional.scaled_dot_product_attention(
        *tensors,
        attn_mask=torch.tensor(dense_mask),
        scale=options.get("scale"),
        enable_gqa=options.get("enable_gqa", False),
    )
    out.backward(torch.tensor(grad_out))
    return [tensor.grad.numpy().astype(np.float64) for tensor in tensors]


def _case(seed):
    """Random shapes and an option mix in which every query row sees at least one key."""
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    batch, kv_heads, group = (int(x) for x in rng.integers(1, 3, size=3))
    length, s = (int(x) for x in rng.integers(2, 160, size=2))
    d, dv = int(rng.choice([8, 16, 32])), int(rng.choice([8, 16, 24]))
    alignment = ("top_left", "bottom_right")[seed % 3 == 0]
    options = dict(
        enable_gqa=group > 1,
        is_causal=bool(rng.integers(2)),
        causal_alignment=alignment,
        scale=None if rng.integers(2) else float(rng.uniform(0.1, 1.0)),
        window=None if rng.integers(2) else (int(rng.integers(0, 50)), None),
    )
    kind = ("none", "bool", "float")[seed % 3]
    mask = None
    if kind == "bool":
        mask = rng.random((length, s)) < 0.7
    elif kind == "float":
        mask = rng.standard_normal((batch, 1, length, s))
        mask[rng.random(mask.shape) < 0.2] = -np.inf
    dense = _dense_mask(length, s, mask, options)
    # Keep a visible key in every row (PyTorch gives NaN gradients for an empty row).
    needs_key = ~np.any(dense if dense.dtype == bool else np.isfinite(dense), axis=-1)
    if needs_key.any():
        options["is_causal"], options["window"] = False, None
        options["causal_alignment"] = "top_left"
        if mask is not None:
            if mask.dtype == bool:
                mask[..., 0] = True
            else:
                mask[..., 0] = 0.0
        dense = _dense_mask(length, s, mask, options)
    rng_data = np.random.default_rng(seed + 1)
    q = rng_data.standard_normal((batch, kv_heads * group, length, d)).astype(dtype)
    k = rng_data.standard_normal((batch, kv_heads, s, d)).astype(dtype)
    v = rng_data.standard_normal((batch, kv_heads, s, dv)).astype(dtype)
    grad_out = rng_data.standard_normal((batch, kv_heads * group, length, dv)).astype(dtype)
    if dense.dtype != bool:
        dense = dense.astype(dtype)
    return q, k, v, grad_out, mask, dense, options


@pytest.mark.parametrize("seed", range(12))
def test_backward_matches_torch_autograd(seed):
    q, k, v, grad_out, mask, dense, options = _case(seed)
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, mask, **options, return_lse=True)
    grads = attnscope.scaled_dot_product_attention_backward(
        grad_out, q, k, v, out, lse, mask, **options
    )
    expected = _torch_grads(q, k, v, grad_out, dense, options)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, q.dtype, GRAD_TOLERANCE[q.dtype.type])


@pytest.mark.parametrize("seed", range(6))
def test_wrapper_gradients_match_torch_sdpa(seed):
    q, k, v, grad_out, mask, dense, options = _case(100 + seed)
    ours = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = atorch.scaled_dot_product_attention(
        *ours, None if mask is None else torch.tensor(mask), **options
    )
    out.backward(torch.tensor(grad_out))
    theirs = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    expected_out = functional.scaled_dot_product_attention(
        *theirs,
        attn_mask=torch.tensor(dense),
        scale=options["scale"],
        enable_gqa=options["enable_gqa"],
    )
    expected_out.backward(torch.tensor(grad_out))
    tolerance = GRAD_TOLERANCE[q.dtype.type]
    assert_close(out.detach().numpy(), expected_out.detach().numpy().astype(np.float64), q.dtype)
    for mine, reference_tensor in zip(ours, theirs, strict=True):
        assert_close(
            mine.grad.numpy(), reference_tensor.grad.numpy().astype(np.float64), q.dtype, tolerance
        )


def test_gradcheck_passes_in_float64():
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    q, k, v = tensor(1, 4, 7, 5), tensor(1, 2, 9, 5), tensor(1, 2, 9, 3)
    mask = torch.randn(7, 9, dtype=torch.float64, generator=generator)

    def attention(q, k, v):
        return atorch.scaled_dot_product_attention(
            q, k, v, mask, is_causal=True, causal_alignment="bottom_right", enable_gqa=True
        )

    assert torch.autograd.gradcheck(attention, (q, k, v), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(
        lambda q, k, v: atorch.scaled_dot_product_attention(q, k, v, window=3, scale=0.4),
        (tensor(2, 6, 4), tensor(2, 8, 4), tensor(2, 8, 4)),
    )


def _explicit_modded_attention(q, k, v, visible, options):
    """Softcapping and ALiBi written out in PyTorch, in the order of a score's life:
    ``s = scale·q·k``, then ``c·tanh(s / c)``, then ``+ slope[h]·(j − c(i))``, then the mask."""
    group = q.shape[-3] // k.shape[-3]
    k, v = (x.repeat_interleave(group, dim=-3) for x in (k, v))
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    scale = options.get("scale") or 1 / math.sqrt(q.shape[-1])
    scores = scale * q @ k.transpose(-1, -2)
    if options.get("softcap") is not None:
        scores = options["softcap"] * torch.tanh(scores / options["softcap"])
    if options.get("alibi_slopes") is not None:
        offset = num_keys - num_queries if options["causal_alignment"] == "bottom_right" else 0
        diagonal = torch.arange(num_queries, dtype=q.dtype)[:, None] + offset
        distance = torch.arange(num_keys, dtype=q.dtype)[None, :] - diagonal
        slopes = torch.tensor(options["alibi_slopes"], dtype=q.dtype)[:, None, None]
        scores = scores + slopes * distance
    scores = scores.masked_fill(~torch.tensor(visible), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("seed", range(8))
def test_score_modifier_gradients_match_torch_autograd(seed):
    """The engine's backward and the wrapper against autograd through explicit PyTorch."""
    rng = np.random.default_rng(500 + seed)
    dtype = (np.float32, np.float64)[seed % 2]
    kv_heads, group = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    length, s = (int(x) for x in rng.integers(2, 120, size=2))
    heads = kv_heads * group
    options = dict(
        enable_gqa=group > 1,
        is_causal=seed % 4 == 1,
        causal_alignment=("top_left", "bottom_right")[seed % 2],
        scale=None if seed % 3 else 0.5,
        softcap=None if seed % 4 == 3 else float(rng.uniform(0.5, 5.0)),
        alibi_slopes=None if seed % 4 == 2 else rng.uniform(-0.3, 0.3, heads),
    )
    q = (2 * rng.standard_normal((2, heads, length, 16))).astype(dtype)
    k = rng.standard_normal((2, kv_heads, s, 16)).astype(dtype)
    v = rng.standard_normal((2, kv_heads, s, 8)).astype(dtype)
    grad_out = rng.standard_normal((2, heads, length, 8)).astype(dtype)
    if options["is_causal"] and length > s:  # bottom-right would leave rows with no key
        options["causal_alignment"] = "top_left"
    visible = reference.visibility(
        length, s, is_causal=options["is_causal"], causal_alignment=options["causal_alignment"]
    )

    theirs = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    expected_out = _explicit_modded_attention(*theirs, visible, options)
    expected_out.backward(torch.tensor(grad_out))
    expected = [x.grad.numpy().astype(np.float64) for x in theirs]
    tolerance = GRAD_TOLERANCE[dtype]

    out, lse = attnscope.scaled_dot_product_attention(q, k, v, **options, return_lse=True)
    assert_close(out, expected_out.detach().numpy().astype(np.float64), dtype)
    grads = attnscope.scaled_dot_product_attention_backward(grad_out, q, k, v, out, lse, **options)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, dtype, tolerance)

    ours = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    wrapper_options = dict(options)
    if wrapper_options["alibi_slopes"] is not None:  # the wrapper also takes a tensor
        wrapper_options["alibi_slopes"] = torch.tensor(wrapper_options["alibi_slopes"])
    atorch.scaled_dot_product_attention(*ours, **wrapper_options).backward(torch.tensor(grad_out))
    for mine, want in zip(ours, expected, strict=True):
        assert_close(mine.grad.numpy(), want, dtype, tolerance)


def test_gradcheck_passes_with_softcap_and_alibi_in_float64():
    generator = torch.Generator().manual_seed(1)

    def tensor(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    def attention(q, k, v):
        return atorch.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            causal_alignment="bottom_right",
            enable_gqa=True,
            softcap=0.8,
            alibi_slopes=[0.5, 0.25, -0.125, 0.0625],
        )

    inputs = (tensor(1, 4, 7, 5) * 3, tensor(1, 2, 9, 5), tensor(1, 2, 9, 3))
    inputs = tuple(x.detach().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(attention, inputs, eps=1e-6, atol=1e-7)


def test_wrapper_trains_a_parameter(rng):
    """A model that uses the wrapper learns: its loss falls under plain gradient descent."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 16)
    weight = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
    target = torch.randn(2, 12, 16)
    losses = []
    for _ in range(20):
        h = x @ weight
        out = atorch.scaled_dot_product_attention(h, h, x, is_causal=True)
        loss = ((out - target) ** 2).mean()
        weight.grad = None
        loss.backward()
        with torch.no_grad():
            weight -= 0.5 * weight.grad
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_wrapper_refuses_other_devices_and_dtypes():
    q = torch.randn(3, 4)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        atorch.scaled_dot_product_attention(q.half(), q.half(), q.half())
    with pytest.raises(TypeError, match="share one dtype"):
        atorch.scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        atorch.scaled_dot_product_attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="on meta"):
        meta = torch.empty(3, 4, device="meta")
        atorch.scaled_dot_product_attention(meta, meta, meta)
    with pytest.raises(ValueError, match="key"):
        atorch.scaled_dot_product_attention(q, torch.randn(3, 5), torch.randn(3, 5))


def _wrapper_grads(q, k, v, grad_out, **options):
    tensors = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = atorch.scaled_dot_product_attention(*tensors, **options)
    out.backward(grad_out)
    return [t.grad for t in tensors]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.float64])
def test_editing_the_mask_before_backward_raises_torchs_in_place_error(mask_dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 8, generator=generator, requires_grad=True) for _ in range(3))
    visible = torch.rand(6, 6, generator=generator) < 0.7
    visible[:, 0] = True
    mask = visible if mask_dtype == torch.bool else torch.where(visible, 0.0, -1e4)
    mask = mask.to(mask_dtype)
    edited = mask.clone()
    out = atorch.scaled_dot_product_attention(q, k, v, attn_mask=edited)
    if mask_dtype == torch.bool:
        edited.logical_not_()
    else:
        edited.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # Untouched, the gradient is torch's.
    grad_out = torch.randn(2, 6, 8, generator=generator)
    ours = _wrapper_grads(q, k, v, grad_out, attn_mask=mask)
    tensors = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    torch_mask = mask if mask_dtype == torch.bool else mask.float()  # torch wants q's dtype
    functional.scaled_dot_product_attention(*tensors, attn_mask=torch_mask).backward(grad_out)
    for mine, theirs in zip(ours, (t.grad for t in tensors), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("container", ["tensor", "array"])
def test_editing_the_alibi_slopes_before_backward_changes_nothing(container):
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 7, 8, generator=generator) for _ in range(3))
    grad_out = torch.randn(1, 4, 7, 8, generator=generator)
    original = [0.5, 0.25, 0.125, 0.0625]
    untouched = _wrapper_grads(q, k, v, grad_out, alibi_slopes=original, is_causal=True)
    slopes = torch.tensor(original) if container == "tensor" else np.array(original)
    tensors = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = atorch.scaled_dot_product_attention(*tensors, alibi_slopes=slopes, is_causal=True)
    slopes[:] = 8.0  # the caller reuses its buffer before backward
    out.backward(grad_out)
    for mine, expected in zip((t.grad for t in tensors), untouched, strict=True):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0)


@pytest.mark.parametrize("grad_out_needs_grad", [False, True])
def test_double_backward_raises_in_every_case(grad_out_needs_grad):
    q, k, v = (torch.randn(5, 8, requires_grad=True) for _ in range(3))
    out = atorch.scaled_dot_product_attention(q, k, v, is_causal=True)
    # sum(): the first gradient's output does not require grad; squares: it does.
    loss = (out**2).sum() if grad_out_needs_grad else out.sum()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, q, create_graph=True)
    # A gradient penalty, as torch computes it: refused, never silently zero.
    out = atorch.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), (q, k), create_graph=True)
    # Without create_graph the same gradient is torch's.
    (dq,) = torch.autograd.grad(atorch.scaled_dot_product_attention(q, k, v).sum(), q)
    (expected,) = torch.autograd.grad(functional.scaled_dot_product_attention(q, k, v).sum(), q)
    torch.testing.assert_close(dq, expected, rtol=1e-4, atol=1e-5)
