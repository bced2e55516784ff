"""The log-sum-exp out of the forward and the backward pass, against the float64 reference
(`attnscope.reference`) and against finite differences of the engine's own forward."""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from attnscope import masks as M
from attnscope import reference
from attnscope._engine import core
from conftest import FLOAT_DTYPES, assert_close, random_qkv, supported_simd_levels

# Gradients are sums of many products: float32 keeps them to about 1e-6 of their size.
GRAD_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def case(name, q_shape, k_shape, v_shape=None, mask=None, **options):
    """A row of the tables below: the value shape defaults to the key's; `mask` is a builder
    and its shape (built by `_mask`), or None; `options` go to the forward and the backward."""
    return pytest.param(q_shape, k_shape, v_shape or k_shape, mask, options, id=name)


CASE_FIELDS = ("q_shape", "k_shape", "v_shape", "mask_spec", "options")
# Causal on the bottom-right diagonal, as a KV cache's queries are.
BOTTOM_RIGHT = dict(is_causal=True, causal_alignment="bottom_right")

# Each exercises one path of the engine.
LSE_PATHS = [
    case("tiled", (2, 3, 70, 16), (2, 3, 300, 16), (2, 3, 300, 8)),
    case("split-kv", (1, 2, 3, 16), (1, 2, 5000, 16)),
    case("row-layout", (2, 4, 2, 8), (2, 4, 40, 8)),
    case("grouped-decode", (2, 8, 1, 16), (2, 2, 600, 16), enable_gqa=True),
    case(
        "grouped-decode-window",
        (2, 8, 1, 16),
        (2, 2, 600, 16),
        enable_gqa=True,
        **BOTTOM_RIGHT,
        window=100,
    ),
    case("causal", (3, 50, 16), (3, 90, 16), is_causal=True, window=(20, 3)),
    case("2-D", (40, 8), (60, 8), scale=0.3),
]


def _bool_mask(rng, shape, empty_row=True):
    mask = rng.random(shape) < 0.5
    if empty_row:
        mask[..., 1, :] = False  # a row that sees no key
    return mask


def _float_mask(rng, shape):
    mask = rng.standard_normal(shape)
    mask[rng.random(shape) < 0.3] = -np.inf
    return mask


def _mask(rng, mask_spec):
    """The mask a table row asks for, or None."""
    return None if mask_spec is None else mask_spec[0](rng, mask_spec[1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize(CASE_FIELDS, LSE_PATHS)
def test_lse_matches_reference_on_every_path(
    rng, dtype, return_weights, q_shape, k_shape, v_shape, mask_spec, options
):
    q, k, v = random_qkv(rng, q_shape, k_shape, v_shape, dtype)
    mask = _mask(rng, mask_spec)
    results = attnscope.scaled_dot_product_attention(
        q, k, v, mask, **options, return_weights=return_weights, return_lse=True
    )
    expected = reference.scaled_dot_product_attention(
        q, k, v, mask, **options, return_weights=True, return_lse=True
    )
    assert len(results) == (3 if return_weights else 2)
    assert_close(results[0], expected[0], dtype)
    if return_weights:  # the documented order: (out, weights, lse)
        assert_close(results[1], expected[1], dtype)
    assert_close(results[-1], expected[2], dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("return_weights", [False, True])
def test_lse_with_masks_is_minus_infinity_for_rows_that_see_no_key(rng, dtype, return_weights):
    q, k, v = random_qkv(rng, (2, 2, 30, 8), (2, 2, 70, 8), (2, 2, 70, 8), dtype)
    for mask in (_bool_mask(rng, (2, 1, 30, 70)), _float_mask(rng, (30, 70))):
        mask[..., 1, :] = False if mask.dtype == bool else -np.inf
        results = attnscope.scaled_dot_product_attention(
            q, k, v, mask, return_weights=return_weights, return_lse=True
        )
        _, _, lse = reference.scaled_dot_product_attention(
            q, k, v, mask, return_weights=True, return_lse=True
        )
        assert np.all(results[-1][..., 1] == -np.inf)
        assert_close(results[-1], lse, dtype)


def test_lse_is_the_same_at_every_simd_level_and_thread_count(rng):
    q, k, v = random_qkv(rng, (2, 4, 150, 32), (2, 4, 300, 32), (2, 4, 300, 32))
    levels = supported_simd_levels()
    _, expected = reference.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    try:
        for level in levels:
            core().force_simd_level(level)
            results = []
            for threads in (1, 2, 3):
                with attnscope.threads(threads):
                    results.append(
                        attnscope.scaled_dot_product_attention(
                            q, k, v, is_causal=True, return_lse=True
                        )[1]
                    )
            assert_close(results[0], expected, np.float32)
            for other in results[1:]:
                np.testing.assert_array_equal(other, results[0])
    finally:
        core().force_simd_level(None)


def _forward_backward(q, k, v, grad_out, mask=None, **options):
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, mask, **options, return_lse=True)
    return attnscope.scaled_dot_product_attention_backward(
        grad_out.astype(q.dtype), q, k, v, out, lse, mask, **options
    )


def _assert_grads_close(grads, expected, dtype):
    for got, want, name in zip(
        grads, expected, ("grad_query", "grad_key", "grad_value"), strict=True
    ):
        assert np.all(np.isfinite(got)), name
        assert_close(got, want, dtype, GRAD_TOLERANCE[np.dtype(dtype)])


def _assert_backward_matches_reference(q, k, v, grad_out, mask=None, **options):
    """The engine's gradients, from its own forward's output and log-sum-exp, against the
    reference's (which reads a mask expression as its dense matrix)."""
    grads = _forward_backward(q, k, v, grad_out, mask, **options)
    expected = reference.scaled_dot_product_attention_backward(
        grad_out, q, k, v, None, None, mask, **options
    )
    _assert_grads_close(grads, expected, q.dtype)


def _assert_matches_finite_differences(rng, q, k, v, grad_out, mask=None, **options):
    """d/dε of ⟨dO, attention(x + ε·t)⟩ at ε = 0 is ⟨grad_x, t⟩, for x each of q, k, v."""
    grads = _forward_backward(q, k, v, grad_out, mask, **options)
    step = 1e-6
    for index, grad in enumerate(grads):
        direction = rng.standard_normal(grad.shape)

        def loss(epsilon, index=index, direction=direction):
            inputs = [q, k, v]
            inputs[index] = inputs[index] + epsilon * direction
            out = attnscope.scaled_dot_product_attention(*inputs, mask, **options)
            return float((grad_out * out).sum())

        numeric = (loss(step) - loss(-step)) / (2 * step)
        analytic = float((grad * direction).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (index, numeric, analytic)


def _assert_same_for_every_thread_count(q, k, v, grad_out, mask=None, **options):
    results = []
    for threads in (1, 2, 3, 5):
        with attnscope.threads(threads):
            results.append(_forward_backward(q, k, v, grad_out, mask, **options))
    for other in results[1:]:
        for got, want in zip(other, results[0], strict=True):
            np.testing.assert_array_equal(got, want)


def _assert_close_at_every_simd_level(q, k, v, grad_out, **options):
    expected = reference.scaled_dot_product_attention_backward(grad_out, q, k, v, **options)
    levels = supported_simd_levels()
    try:
        for level in levels:
            core().force_simd_level(level)
            grads = _forward_backward(q, k, v, grad_out, **options)
            _assert_grads_close(grads, expected, np.float32)
    finally:
        core().force_simd_level(None)


GRAD_CASES = [
    case("plain", (2, 3, 70, 16), (2, 3, 90, 16), (2, 3, 90, 8)),
    case("causal", (1, 2, 130, 32), (1, 2, 130, 32), is_causal=True),
    case("causal-bottom-right", (2, 2, 40, 8), (2, 2, 100, 8), **BOTTOM_RIGHT),
    case("bottom-right-empty-rows", (2, 2, 100, 8), (2, 2, 40, 8), **BOTTOM_RIGHT),
    case("window", (1, 2, 150, 16), (1, 2, 150, 16), window=17),
    case(
        "causal-window-scale",
        (1, 2, 90, 16),
        (1, 2, 90, 16),
        is_causal=True,
        window=(30, None),
        scale=0.7,
    ),
    case("gqa", (2, 6, 50, 16), (2, 2, 80, 16), (2, 2, 80, 24), enable_gqa=True, is_causal=True),
    case("bool", (2, 3, 40, 16), (2, 3, 70, 16), mask=(_bool_mask, (2, 1, 40, 70))),
    case(
        "float-causal", (2, 3, 40, 16), (2, 3, 70, 16), mask=(_float_mask, (40, 70)), is_causal=True
    ),
    case("leading-dims", (2, 2, 3, 2, 16, 8), (2, 2, 3, 1, 20, 8), enable_gqa=True),
    case("2-D", (33, 8), (21, 8), (21, 5)),
    # From 8 (batch, kv head) pairs on, a task per kv head computes all three gradients.
    case("per-kv-head", (2, 4, 150, 16), (2, 4, 90, 16), (2, 4, 90, 8), window=(40, 5)),
    case(
        "per-kv-head-gqa",
        (2, 8, 70, 16),
        (2, 4, 130, 16),
        mask=(_float_mask, (2, 1, 70, 130)),
        enable_gqa=True,
        **BOTTOM_RIGHT,
    ),
    case("one-query", (2, 4, 1, 16), (2, 4, 300, 16)),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(CASE_FIELDS, GRAD_CASES)
def test_backward_matches_reference(rng, dtype, q_shape, k_shape, v_shape, mask_spec, options):
    q, k, v = random_qkv(rng, q_shape, k_shape, v_shape, dtype)
    mask = _mask(rng, mask_spec)
    grad_out = rng.standard_normal((*q_shape[:-1], v_shape[-1]))
    _assert_backward_matches_reference(q, k, v, grad_out, mask, **options)


@pytest.mark.parametrize("seed", range(6))
def test_backward_on_random_shapes_and_options(seed):
    rng = np.random.default_rng(1000 + seed)
    dtype = (np.float32, np.float64)[seed % 2]
    batch, kv_heads, group = rng.integers(1, 3), rng.integers(1, 3), rng.integers(1, 4)
    length, s, d, dv = (int(x) for x in rng.integers(1, 140, size=2).tolist() + [8, 12])
    q_shape, k_shape = (batch, kv_heads * group, length, d), (batch, kv_heads, s, d)
    q, k, v = random_qkv(rng, q_shape, k_shape, (batch, kv_heads, s, dv), dtype)
    options = dict(
        enable_gqa=True,
        is_causal=bool(rng.integers(2)),
        causal_alignment=("top_left", "bottom_right")[rng.integers(2)],
        window=None if rng.integers(2) else int(rng.integers(1, 40)),
        scale=None if rng.integers(2) else float(rng.uniform(0.05, 1.0)),
    )
    mask = _bool_mask(rng, (length, s), empty_row=False) if length > 1 and rng.integers(2) else None
    grad_out = rng.standard_normal((*q_shape[:-1], dv))
    _assert_backward_matches_reference(q, k, v, grad_out, mask, **options)


def test_backward_matches_finite_differences_of_the_forward(rng):
    """d/dε of ⟨dO, attention(x + ε·t)⟩ at ε = 0 is ⟨grad_x, t⟩, for x each of q, k, v."""
    q, k, v = random_qkv(rng, (1, 4, 23, 8), (1, 2, 31, 8), (1, 2, 31, 6), np.float64)
    mask = _float_mask(rng, (23, 31))
    mask[:, 0] = 0.0
    options = dict(enable_gqa=True, is_causal=True, causal_alignment="bottom_right", scale=0.6)
    grad_out = rng.standard_normal((1, 4, 23, 6))
    _assert_matches_finite_differences(rng, q, k, v, grad_out, mask, **options)


@pytest.mark.parametrize("kv_heads", [2, 8])  # two passes; a task per kv head
def test_backward_is_bitwise_identical_for_every_thread_count(rng, kv_heads):
    q, k, v = random_qkv(
        rng, (2, 4, 300, 32), (2, kv_heads // 2, 400, 32), (2, kv_heads // 2, 400, 32)
    )
    grad_out = rng.standard_normal((2, 4, 300, 32))
    mask = _bool_mask(rng, (300, 400), empty_row=False)
    _assert_same_for_every_thread_count(q, k, v, grad_out, mask, enable_gqa=True)


def test_backward_at_every_simd_level(rng):
    q, k, v = random_qkv(rng, (1, 2, 90, 24), (1, 2, 130, 24), (1, 2, 130, 24))
    grad_out = rng.standard_normal((1, 2, 90, 24))
    _assert_close_at_every_simd_level(q, k, v, grad_out, is_causal=True, window=40)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rows_that_see_no_key_get_zero_gradients(rng, dtype):
    q, k, v = random_qkv(rng, (1, 2, 20, 8), (1, 2, 30, 8), (1, 2, 30, 8), dtype)
    mask = np.ones((20, 30), dtype=bool)
    mask[3] = False
    mask[:, 7] = False  # a key no row sees
    grad_out = rng.standard_normal((1, 2, 20, 8))
    grad_q, grad_k, grad_v = _forward_backward(q, k, v, grad_out, mask)
    for grad in (grad_q, grad_k, grad_v):
        assert np.all(np.isfinite(grad))
    assert np.all(grad_q[..., 3, :] == 0)
    assert np.all(grad_k[..., 7, :] == 0) and np.all(grad_v[..., 7, :] == 0)
    all_hidden = np.zeros((20, 30), dtype=bool)
    for grad in _forward_backward(q, k, v, grad_out, all_hidden):
        assert np.all(grad == 0)


def test_backward_reads_non_contiguous_inputs_and_leaves_them_unchanged(rng):
    q, k, v = random_qkv(rng, (2, 40, 3, 16), (2, 50, 3, 16), (2, 50, 3, 16))
    q, k, v = (np.swapaxes(x, 1, 2) for x in (q, k, v))  # (2, 3, L, 16), strided
    grad_out = np.asfortranarray(rng.standard_normal((2, 3, 40, 16)).astype(np.float32))
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    copies = [x.copy() for x in (grad_out, q, k, v, out, lse)]
    grads = attnscope.scaled_dot_product_attention_backward(
        grad_out, q, k, v, out, lse, is_causal=True
    )
    for before, after in zip(copies, (grad_out, q, k, v, out, lse), strict=True):
        np.testing.assert_array_equal(before, after)
    expected = reference.scaled_dot_product_attention_backward(grad_out, q, k, v, is_causal=True)
    _assert_grads_close(grads, expected, np.float32)


def test_empty_inputs_give_empty_or_zero_gradients(rng):
    q, k, v = random_qkv(rng, (2, 0, 8), (2, 5, 8), (2, 5, 4))
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 0)
    grad_q, grad_k, grad_v = attnscope.scaled_dot_product_attention_backward(
        np.zeros_like(out), q, k, v, out, lse
    )
    assert grad_q.shape == (2, 0, 8) and grad_k.shape == (2, 5, 8) and grad_v.shape == (2, 5, 4)
    assert np.all(grad_k == 0) and np.all(grad_v == 0)


# Softcapping and ALiBi on each path of the backward (two passes; a task per kv head), with
# the rules and masks they meet.
SCORE_MOD_CASES = [
    case("plain", (2, 3, 70, 16), (2, 3, 90, 16), (2, 3, 90, 8)),
    case("causal", (1, 2, 130, 32), (1, 2, 130, 32), is_causal=True),
    case("bottom-right-window", (2, 2, 40, 8), (2, 2, 100, 8), **BOTTOM_RIGHT, window=(30, 4)),
    case("gqa", (2, 6, 50, 16), (2, 2, 80, 16), (2, 2, 80, 24), enable_gqa=True),
    case("per-kv-head-gqa", (2, 8, 70, 16), (2, 4, 130, 16), enable_gqa=True, **BOTTOM_RIGHT),
    case("2-D", (33, 8), (21, 8), (21, 5), scale=0.9),
    case("split-kv", (1, 2, 3, 16), (1, 2, 5000, 16)),
    case("decode-gqa", (2, 8, 1, 16), (2, 2, 600, 16), enable_gqa=True, **BOTTOM_RIGHT),
]

# (softcap, whether to pass ALiBi slopes)
SCORE_MODS = [
    pytest.param(1.5, False, id="softcap"),
    pytest.param(None, True, id="alibi"),
    pytest.param(4.0, True, id="softcap-alibi"),
]


def _alibi_slopes(num_heads):
    """Slopes of both signs (the forward accepts any finite slope)."""
    return np.linspace(0.4, -0.2, num_heads)


def _mods(q_shape, k_shape, softcap, alibi):
    heads = q_shape[-3] if len(q_shape) > 2 else 1
    # Slopes shrink with many keys: a bias of slope·(j − c(i)) in the thousands leaves float32
    # scores only ~1e-4 absolute precision, in the forward as much as in the backward.
    slopes = _alibi_slopes(heads) * min(1.0, 200 / k_shape[-2])
    return dict(softcap=softcap, alibi_slopes=slopes if alibi else None)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("softcap", "alibi"), SCORE_MODS)
@pytest.mark.parametrize(CASE_FIELDS, SCORE_MOD_CASES)
def test_score_modifiers_match_reference(
    rng, dtype, softcap, alibi, q_shape, k_shape, v_shape, mask_spec, options
):
    # Scores of size ~3 against caps of 1.5 and 4: tanh is well into its bend.
    q, k, v = random_qkv(rng, q_shape, k_shape, v_shape, dtype)
    q = (q * 2).astype(dtype)
    options = {**options, **_mods(q_shape, k_shape, softcap, alibi)}
    grad_out = rng.standard_normal((*q_shape[:-1], v_shape[-1]))
    _assert_backward_matches_reference(q, k, v, grad_out, _mask(rng, mask_spec), **options)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_score_modifiers_with_masks_and_mask_expressions(rng, dtype):
    q, k, v = random_qkv(rng, (2, 4, 60, 16), (2, 2, 90, 16), (2, 2, 90, 16), dtype)
    grad_out = rng.standard_normal((2, 4, 60, 16))
    mods = dict(enable_gqa=True, softcap=2.0, alibi_slopes=_alibi_slopes(4))
    masks = [
        _bool_mask(rng, (2, 1, 60, 90)),
        _float_mask(rng, (60, 90)),
        M.causal("bottom_right")
        & M.document(np.repeat(np.arange(6), 10), kv_ids=np.repeat(np.arange(6), 15)),
        M.sinks(2) | M.window(10, alignment="bottom_right"),
    ]
    for mask in masks:
        _assert_backward_matches_reference(q, k, v, grad_out, mask, **mods)


def test_score_modifiers_match_finite_differences_of_the_forward(rng):
    """d/dε of ⟨dO, attention(x + ε·t)⟩ at ε = 0 is ⟨grad_x, t⟩, through the cap and ALiBi."""
    q, k, v = random_qkv(rng, (1, 4, 23, 8), (1, 2, 31, 8), (1, 2, 31, 6), np.float64)
    q = q * 3  # scores well past the cap, where tanh bends most
    options = dict(
        enable_gqa=True,
        is_causal=True,
        causal_alignment="bottom_right",
        scale=0.6,
        softcap=1.2,
        alibi_slopes=_alibi_slopes(4),
    )
    grad_out = rng.standard_normal((1, 4, 23, 6))
    _assert_matches_finite_differences(rng, q, k, v, grad_out, **options)


@pytest.mark.parametrize("kv_heads", [2, 8])  # two passes; a task per kv head
def test_score_modifiers_are_bitwise_identical_for_every_thread_count(rng, kv_heads):
    q, k, v = random_qkv(
        rng, (2, 4, 300, 32), (2, kv_heads // 2, 400, 32), (2, kv_heads // 2, 400, 32)
    )
    grad_out = rng.standard_normal((2, 4, 300, 32))
    mods = dict(enable_gqa=True, is_causal=True, softcap=3.0, alibi_slopes=_alibi_slopes(4))
    _assert_same_for_every_thread_count(q, k, v, grad_out, **mods)


def test_score_modifiers_at_every_simd_level(rng):
    q, k, v = random_qkv(rng, (1, 2, 90, 24), (1, 2, 130, 24), (1, 2, 130, 24))
    q = q * 2
    grad_out = rng.standard_normal((1, 2, 90, 24))
    options = dict(is_causal=True, window=40, softcap=1.5, alibi_slopes=[0.25, -0.1])
    _assert_close_at_every_simd_level(q, k, v, grad_out, **options)


def test_score_modifiers_give_zero_gradients_for_rows_that_see_no_key(rng):
    q, k, v = random_qkv(rng, (1, 2, 20, 8), (1, 2, 30, 8), (1, 2, 30, 8), np.float64)
    mask = np.ones((20, 30), dtype=bool)
    mask[3] = False
    grad_out = rng.standard_normal((1, 2, 20, 8))
    mods = dict(softcap=1.0, alibi_slopes=[0.5, 0.1])
    grad_q, grad_k, grad_v = _forward_backward(q, k, v, grad_out, mask, **mods)
    for grad in (grad_q, grad_k, grad_v):
        assert np.all(np.isfinite(grad))
    assert np.all(grad_q[..., 3, :] == 0)


def test_bad_score_modifiers_are_refused(rng):
    call = _valid_call(rng)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            attnscope.scaled_dot_product_attention_backward(**call, softcap=bad)
    for bad in (True, "2", [1.0]):
        with pytest.raises(TypeError, match="softcap"):
            attnscope.scaled_dot_product_attention_backward(**call, softcap=bad)
    with pytest.raises(ValueError, match="alibi_slopes"):
        attnscope.scaled_dot_product_attention_backward(**call, alibi_slopes=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="alibi_slopes"):
        attnscope.scaled_dot_product_attention_backward(**call, alibi_slopes=[0.1, np.inf])
    with pytest.raises(ValueError, match="alibi_slopes"):
        attnscope.scaled_dot_product_attention_backward(**call, alibi_slopes=[[0.1, 0.2]])
    with pytest.raises(TypeError, match="alibi_slopes"):
        attnscope.scaled_dot_product_attention_backward(**call, alibi_slopes=["a", "b"])


def _valid_call(rng, dtype=np.float32):
    q, k, v = random_qkv(rng, (2, 10, 8), (2, 12, 8), (2, 12, 4), dtype)
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, return_lse=True)
    return dict(grad_out=np.ones_like(out), query=q, key=k, value=v, out=out, lse=lse)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("grad_out", np.ones((2, 10, 5), np.float32), "grad_out"),
        ("out", np.ones((2, 11, 4), np.float32), "out"),
        ("lse", np.ones((2, 10, 1), np.float32), "lse"),
        ("lse", np.ones((2, 12), np.float32), "lse"),
    ],
)
def test_mismatched_shapes_name_the_argument(rng, name, bad, message):
    call = _valid_call(rng)
    call[name] = bad
    with pytest.raises(ValueError, match=message):
        attnscope.scaled_dot_product_attention_backward(**call)


@pytest.mark.parametrize("name", ["grad_out", "out", "lse"])
def test_wrong_dtypes_are_type_errors_naming_the_argument(rng, name):
    call = _valid_call(rng)
    call[name] = call[name].astype(np.float64)
    with pytest.raises(TypeError, match=f"{name} has dtype float64 but query has float32"):
        attnscope.scaled_dot_product_attention_backward(**call)
    call[name] = call[name].astype(np.int32)
    with pytest.raises(TypeError, match=name):
        attnscope.scaled_dot_product_attention_backward(**call)
    call[name] = [1.0]
    with pytest.raises(TypeError, match=f"{name} must be a numpy.ndarray"):
        attnscope.scaled_dot_product_attention_backward(**call)


def test_bad_options_are_refused(rng):
    call = _valid_call(rng)
    with pytest.raises(ValueError, match="causal_alignment"):
        attnscope.scaled_dot_product_attention_backward(**call, causal_alignment="middle")
    with pytest.raises(TypeError, match="is_causal"):
        attnscope.scaled_dot_product_attention_backward(**call, is_causal="yes")
    with pytest.raises(ValueError, match="scale"):
        attnscope.scaled_dot_product_attention_backward(**call, scale=float("nan"))
    with pytest.raises(ValueError, match="attn_mask"):
        attnscope.scaled_dot_product_attention_backward(**call, attn_mask=np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="return_lse"):
        attnscope.scaled_dot_product_attention(
            call["query"], call["key"], call["value"], return_lse="no"
        )
