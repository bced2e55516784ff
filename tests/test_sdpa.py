"""`scaled_dot_product_attention` against the float64 reference: the hypothesis-generated space
of shapes and options, fully masked rows, masked NaN/inf, empty sequences and memory layouts."""

from __future__ import annotations

import math

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import FLOAT_DTYPES, assert_close, random_qkv, tolerance_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sdpa = attnscope.scaled_dot_product_attention

# Lengths around a 64-wide tile edge are where tiled kernels go wrong, so they are drawn often.
LENGTHS = st.one_of(st.integers(1, 70), st.sampled_from([0, 1, 2, 63, 64, 65]))
WINDOW_SIDES = st.one_of(st.none(), st.integers(0, 70))
WINDOWS = st.one_of(
    st.none(),
    st.integers(1, 80),
    st.tuples(WINDOW_SIDES, WINDOW_SIDES),
)


def repeat_kv_heads(array: np.ndarray, num_query_heads: int) -> np.ndarray:
    """Key/value heads repeated so query head h lines up with kv head h // group."""
    if array.ndim < 3 or array.shape[-3] == num_query_heads:
        return array
    return np.repeat(array, num_query_heads // array.shape[-3], axis=-3)


@st.composite
def attention_cases(draw):
    """Arrays and keyword arguments for one call: rank 2-5, GQA, masks that broadcast, options."""
    rank = draw(st.sampled_from([4, 3, 5, 2]))
    batch = tuple(
        draw(st.lists(st.integers(1, 2), min_size=max(rank - 3, 0), max_size=max(rank - 3, 0)))
    )
    if rank >= 3:
        kv_heads = draw(st.integers(1, 3))
        group = draw(st.integers(1, 3))
        q_heads, k_heads = (kv_heads * group,), (kv_heads,)
        enable_gqa = group > 1 or draw(st.booleans())
    else:
        q_heads = k_heads = ()
        enable_gqa = draw(st.booleans())
    num_queries, num_keys = draw(LENGTHS), draw(LENGTHS)
    head_dim, value_dim = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    query, key, value = random_qkv(
        rng,
        batch + q_heads + (num_queries, head_dim),
        batch + k_heads + (num_keys, head_dim),
        batch + k_heads + (num_keys, value_dim),
        dtype,
    )

    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    attn_mask = None
    if mask_kind is not None:
        scores_shape = batch + q_heads + (num_queries, num_keys)
        # Any dim may be 1 and leading dims may be missing: both broadcast.
        shape = tuple(size if draw(st.booleans()) else 1 for size in scores_shape)
        shape = shape[draw(st.integers(0, len(shape) - 1)) :]
        if mask_kind == "bool":
            attn_mask = rng.random(shape) < draw(st.sampled_from([0.3, 0.8, 1.0]))
        else:
            attn_mask = rng.standard_normal(shape).astype(draw(st.sampled_from(FLOAT_DTYPES)))
            attn_mask[rng.random(shape) < draw(st.sampled_from([0.0, 0.3]))] = -np.inf

    kwargs = dict(
        attn_mask=attn_mask,
        is_causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(-1.0, 1.5))),
        enable_gqa=enable_gqa,
        causal_alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(WINDOWS),
    )
    return query, key, value, kwargs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases(), return_weights=st.booleans())
def test_matches_reference(case, return_weights):
    query, key, value, kwargs = case
    expected_out, expected_weights = reference.scaled_dot_product_attention(
        query, key, value, **kwargs, return_weights=True
    )
    result = sdpa(query, key, value, **kwargs, return_weights=return_weights)

    if not return_weights:
        assert_close(result, expected_out, query.dtype)
        return
    assert isinstance(result, tuple) and len(result) == 2
    out, weights = result
    assert_close(out, expected_out, query.dtype)
    assert_close(weights, expected_weights, query.dtype)
    # The weights are the ones the output was made from.
    value64 = repeat_kv_heads(value.astype(np.float64), query.shape[-3] if query.ndim > 2 else 1)
    assert_close(out, weights.astype(np.float64) @ value64, query.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("num_queries", "num_keys", "head_dim", "value_dim"),
    [
        (1, 1, 1, 1),
        (1, 300, 64, 64),
        (1, 3000, 32, 16),
        (257, 130, 128, 80),
        (129, 129, 96, 8),
        (200, 3, 7, 130),
        (5, 9, 300, 513),
    ],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_larger_shapes_cross_several_tiles(
    rng, dtype, num_queries, num_keys, head_dim, value_dim, is_causal
):
    query, key, value = random_qkv(
        rng, (2, num_queries, head_dim), (2, num_keys, head_dim), (2, num_keys, value_dim), dtype
    )
    for alignment in ("top_left", "bottom_right"):
        kwargs = dict(is_causal=is_causal, causal_alignment=alignment)
        expected = reference.scaled_dot_product_attention(query, key, value, **kwargs)
        assert_close(sdpa(query, key, value, **kwargs), expected, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_default_scale_is_one_over_sqrt_head_dim(rng, dtype):
    query, key, value = random_qkv(rng, (3, 9, 20), (3, 11, 20), (3, 11, 5), dtype)
    default = sdpa(query, key, value)
    explicit = sdpa(query, key, value, scale=1 / math.sqrt(20))
    assert_close(default, explicit.astype(np.float64), dtype)
    other = sdpa(query, key, value, scale=1.0)
    assert not np.allclose(default, other)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gqa_query_head_reads_kv_head_h_over_group(rng, dtype):
    """Hq = 6, Hkv = 2: query heads 0-2 read kv head 0 and 3-5 read kv head 1."""
    query, key, value = random_qkv(rng, (2, 6, 13, 8), (2, 2, 17, 8), (2, 2, 17, 4), dtype)
    grouped = sdpa(query, key, value, enable_gqa=True, is_causal=True)
    repeated = sdpa(query, np.repeat(key, 3, axis=1), np.repeat(value, 3, axis=1), is_causal=True)
    assert_close(grouped, repeated.astype(np.float64), dtype)
    # A head layout that interleaves (h % Hkv) instead would differ.
    interleaved = sdpa(
        query, np.tile(key, (1, 3, 1, 1)), np.tile(value, (1, 3, 1, 1)), is_causal=True
    )
    assert not np.allclose(grouped, interleaved)


def test_window_int_is_symmetric_and_causal_window_keeps_the_w_most_recent_keys(rng):
    """Checks the window rules by hand, independently of reference.visibility."""
    num_queries, num_keys, width = 12, 20, 3
    query, key, value = random_qkv(rng, (num_queries, 8), (num_keys, 8), (num_keys, 8), np.float64)
    rows = np.arange(num_queries)[:, None]
    cols = np.arange(num_keys)[None, :]
    diagonal = rows + num_keys - num_queries  # bottom_right
    recent = (cols <= diagonal) & (cols > diagonal - width)
    expected = reference.scaled_dot_product_attention(query, key, value, attn_mask=recent)
    actual = sdpa(query, key, value, is_causal=True, causal_alignment="bottom_right", window=width)
    assert_close(actual, expected, np.float64)

    symmetric = sdpa(query, key, value, window=width)
    as_tuple = sdpa(query, key, value, window=(width - 1, width - 1))
    band = np.abs(cols - rows) < width
    assert_close(
        symmetric, reference.scaled_dot_product_attention(query, key, value, band), np.float64
    )
    np.testing.assert_array_equal(symmetric, as_tuple)


@pytest.mark.parametrize(
    "window", [10**6, 2**63, 2**64, (2**64, None), (None, 10**30), (2**70, 2**70)]
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_window_wider_than_any_sequence_changes_nothing(rng, window, is_causal):
    query, key, value = random_qkv(rng, (2, 30, 8), (2, 40, 8), (2, 40, 8))
    for alignment in ("top_left", "bottom_right"):
        kwargs = dict(is_causal=is_causal, causal_alignment=alignment)
        np.testing.assert_array_equal(
            sdpa(query, key, value, window=window, **kwargs), sdpa(query, key, value, **kwargs)
        )


def test_bottom_right_equals_top_left_when_lengths_match(rng):
    query, key, value = random_qkv(rng, (2, 40, 16), (2, 40, 16), (2, 40, 16))
    top_left = sdpa(query, key, value, is_causal=True, window=(5, 2))
    bottom_right = sdpa(
        query, key, value, is_causal=True, window=(5, 2), causal_alignment="bottom_right"
    )
    np.testing.assert_array_equal(top_left, bottom_right)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_dim_mask_broadcasts(rng, dtype):
    query, key, value = random_qkv(rng, (2, 5, 4), (2, 6, 4), (2, 6, 3), dtype)
    plain = sdpa(query, key, value)
    assert_close(sdpa(query, key, value, np.array(True)), plain.astype(np.float64), dtype)
    np.testing.assert_array_equal(sdpa(query, key, value, np.array(False)), 0)
    shifted = sdpa(query, key, value, np.array(2.5, dtype=dtype))
    assert_close(shifted, plain.astype(np.float64), dtype)


def test_float_mask_of_another_float_dtype_is_accepted(rng):
    query, key, value = random_qkv(rng, (3, 7, 8), (3, 9, 8), (3, 9, 8), np.float32)
    mask = rng.standard_normal((7, 9))
    for mask_dtype in (np.float16, np.float64):
        cast = mask.astype(mask_dtype)
        expected = reference.scaled_dot_product_attention(query, key, value, cast)
        assert_close(sdpa(query, key, value, cast), expected, np.float32)


def test_large_scores_stay_stable(rng):
    """Scores of +-1e4 need the running max subtracted; float64 must still be accurate."""
    query, key, value = random_qkv(rng, (2, 70, 16), (2, 90, 16), (2, 90, 16), np.float64)
    for dtype, relative in ((np.float64, 1e-10), (np.float32, 0.1)):
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        expected = reference.scaled_dot_product_attention(q, k, v, scale=1000.0, is_causal=True)
        actual = sdpa(q, k, v, scale=1000.0, is_causal=True)
        assert np.isfinite(actual).all()
        assert_close(actual, expected, dtype, relative)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_huge_finite_mask_values_are_not_hidden_keys(rng, dtype):
    """-1e30 is a very small weight, not -inf: a row of it alone is a uniform average."""
    query, key, value = random_qkv(rng, (4, 10), (6, 10), (6, 3), dtype)
    mask = np.full((4, 6), -1e30, dtype=dtype)
    out = sdpa(query, key, value, mask)
    expected = np.broadcast_to(value.astype(np.float64).mean(axis=0), (4, 3))
    assert_close(out, expected, dtype)


# --- rows that see no key -------------------------------------------------------------------


def _fully_masked_cases():
    hidden_rows = [1, 3]
    bool_mask = np.ones((6, 9), dtype=bool)
    bool_mask[hidden_rows] = False
    float_mask = np.zeros((6, 9))
    float_mask[hidden_rows] = -np.inf
    only_future_key = np.zeros((6, 9), dtype=bool)
    only_future_key[:, 5] = True  # causal hides key 5 from rows 0-4
    return [
        pytest.param(6, 9, dict(attn_mask=bool_mask), hidden_rows, id="bool-mask"),
        pytest.param(6, 9, dict(attn_mask=float_mask), hidden_rows, id="float-mask"),
        pytest.param(
            6,
            3,
            dict(is_causal=True, causal_alignment="bottom_right"),
            [0, 1, 2],
            id="causal-bottom-right-L-gt-S",
        ),
        pytest.param(
            6, 3, dict(window=(0, 0), causal_alignment="bottom_right"), [0, 1, 2], id="window"
        ),
        pytest.param(
            6,
            9,
            dict(window=(None, 0), causal_alignment="bottom_right", attn_mask=~bool_mask),
            [0, 2, 4, 5],
            id="window-and-mask",
        ),
        pytest.param(
            6, 9, dict(is_causal=True, attn_mask=only_future_key), [0, 1, 2, 3, 4], id="causal+mask"
        ),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("num_queries", "num_keys", "kwargs", "hidden_rows"), _fully_masked_cases()
)
def test_fully_masked_rows_are_zero(rng, dtype, num_queries, num_keys, kwargs, hidden_rows):
    query, key, value = random_qkv(
        rng, (2, num_queries, 8), (2, num_keys, 8), (2, num_keys, 5), dtype
    )
    out, weights = sdpa(query, key, value, **kwargs, return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    np.testing.assert_array_equal(out[:, hidden_rows], 0)
    np.testing.assert_array_equal(weights[:, hidden_rows], 0)
    expected_out, expected_weights = reference.scaled_dot_product_attention(
        query, key, value, **kwargs, return_weights=True
    )
    assert_close(out, expected_out, dtype)
    assert_close(weights, expected_weights, dtype)
    # The weights-free path must agree.
    np.testing.assert_array_equal(sdpa(query, key, value, **kwargs)[:, hidden_rows], 0)


# --- non-finite values at hidden keys -------------------------------------------------------


def _hidden_key_cases():
    """(L, S, kwargs, keys no query may see)."""
    num_queries, num_keys = 5, 70
    hidden = [0, 33, 64, 69]
    bool_mask = np.ones((num_queries, num_keys), dtype=bool)
    bool_mask[:, hidden] = False
    float_mask = np.random.default_rng(3).standard_normal((num_queries, num_keys))
    float_mask[:, hidden] = -np.inf
    return [
        pytest.param(num_queries, num_keys, dict(attn_mask=bool_mask), hidden, id="bool-mask"),
        pytest.param(num_queries, num_keys, dict(attn_mask=float_mask), hidden, id="float-mask"),
        pytest.param(
            num_queries, num_keys, dict(is_causal=True), [5, 40, 64, 69], id="causal-top-left"
        ),
        pytest.param(
            num_queries,
            num_keys,
            dict(is_causal=True, causal_alignment="bottom_right", window=3),
            [0, 31, 62],
            id="causal-window-bottom-right",
        ),
        pytest.param(num_queries, num_keys, dict(window=(2, 1)), [6, 64, 69], id="window-tuple"),
        pytest.param(
            3,
            num_keys,
            dict(window=(0, None), causal_alignment="bottom_right"),
            [0, 40, 66],
            id="window-left-side",
        ),
    ]


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["key", "value", "both"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("num_queries", "num_keys", "kwargs", "hidden_keys"), _hidden_key_cases())
def test_nonfinite_values_at_hidden_keys_never_reach_the_output(
    rng, poison, where, dtype, num_queries, num_keys, kwargs, hidden_keys
):
    query, key, value = random_qkv(
        rng, (2, num_queries, 8), (2, num_keys, 8), (2, num_keys, 6), dtype
    )
    expected_out, expected_weights = reference.scaled_dot_product_attention(
        query, key, value, **kwargs, return_weights=True
    )
    poisoned_key, poisoned_value = key.copy(), value.copy()
    if where in ("key", "both"):
        poisoned_key[:, hidden_keys, 3] = poison
    if where in ("value", "both"):
        poisoned_value[:, hidden_keys, 2] = poison
    for return_weights in (False, True):
        result = sdpa(query, poisoned_key, poisoned_value, **kwargs, return_weights=return_weights)
        out = result[0] if return_weights else result
        assert np.isfinite(out).all()
        assert_close(out, expected_out, dtype)
        if return_weights:
            assert np.isfinite(result[1]).all()
            assert_close(result[1], expected_weights, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mechanism", ["causal", "float-mask", "bool-mask"])
def test_nan_key_stays_out_of_rows_that_do_not_see_it(rng, dtype, mechanism):
    """Key 40 is hidden from rows 0-39 only, inside a tile that straddles the diagonal."""
    size, poisoned_key = 70, 40
    query, key, value = random_qkv(rng, (2, size, 8), (2, size, 8), (2, size, 8), dtype)
    if mechanism == "causal":
        kwargs = dict(is_causal=True)
    else:
        sees = np.arange(size)[:, None] >= poisoned_key
        sees = sees | (np.arange(size)[None, :] != poisoned_key)
        kwargs = dict(attn_mask=sees if mechanism == "bool-mask" else np.where(sees, 0.0, -np.inf))
    expected = reference.scaled_dot_product_attention(query, key, value, **kwargs)
    key[:, poisoned_key] = np.nan
    value[:, poisoned_key] = np.nan
    out = sdpa(query, key, value, **kwargs)
    clean_rows = slice(0, poisoned_key)
    assert np.isfinite(out[:, clean_rows]).all()
    assert_close(out[:, clean_rows], expected[:, clean_rows], dtype)


# --- empty sequences ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_no_queries_gives_an_empty_output(dtype, is_causal):
    query = np.zeros((2, 3, 0, 8), dtype)
    key = np.ones((2, 3, 5, 8), dtype)
    value = np.ones((2, 3, 5, 4), dtype)
    out, weights = sdpa(query, key, value, is_causal=is_causal, return_weights=True)
    assert out.shape == (2, 3, 0, 4) and out.dtype == dtype
    assert weights.shape == (2, 3, 0, 5) and weights.dtype == dtype
    assert sdpa(query, key, value, is_causal=is_causal).shape == (2, 3, 0, 4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(is_causal=True, causal_alignment="bottom_right"),
        dict(attn_mask=np.zeros((6, 0))),
        dict(window=2),
    ],
)
def test_no_keys_gives_zeros(rng, dtype, kwargs):
    query = rng.standard_normal((2, 6, 8)).astype(dtype)
    key = np.zeros((2, 0, 8), dtype)
    value = np.zeros((2, 0, 3), dtype)
    out, weights = sdpa(query, key, value, **kwargs, return_weights=True)
    assert out.shape == (2, 6, 3) and out.dtype == dtype
    assert weights.shape == (2, 6, 0) and weights.dtype == dtype
    np.testing.assert_array_equal(out, 0)
    np.testing.assert_array_equal(sdpa(query, key, value, **kwargs), 0)


def test_no_queries_and_no_keys(rng):
    out = sdpa(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 2)))
    assert out.shape == (0, 2) and out.dtype == np.float64


# --- inputs are left alone; any memory layout works -----------------------------------------


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.float32, np.float64])
def test_inputs_are_never_modified(rng, mask_dtype):
    query, key, value = random_qkv(rng, (2, 4, 30, 8), (2, 2, 70, 8), (2, 2, 70, 8))
    mask = rng.random((30, 70)) < 0.7 if mask_dtype == np.bool_ else rng.standard_normal((30, 70))
    mask = mask.astype(mask_dtype)
    mask[:, 3] = False if mask_dtype == np.bool_ else -np.inf
    key[:, :, 3] = np.nan  # hidden by the mask: a kernel must not "clean" it in place
    value[:, :, 3] = np.inf
    originals = [array.copy() for array in (query, key, value, mask)]
    out, weights = sdpa(
        query,
        key,
        value,
        mask,
        True,
        0.4,
        True,
        causal_alignment="bottom_right",
        window=(20, None),
        return_weights=True,
    )
    for array, original in zip((query, key, value, mask), originals, strict=True):
        np.testing.assert_array_equal(array, original)
        assert array.dtype == original.dtype
    assert np.isfinite(out).all()
    for result in (out, weights):
        assert result.flags.writeable
        assert not any(np.shares_memory(result, x) for x in (query, key, value, mask))


def _layouts():
    """Ways to present the same values: (name, function from a C-contiguous array to a view)."""

    def strided(array):
        storage = np.zeros(
            array.shape[:-2] + (2 * array.shape[-2], 3 * array.shape[-1]), array.dtype
        )
        storage[..., ::2, ::3] = array
        return storage[..., ::2, ::3]

    def transposed(array):
        return np.ascontiguousarray(np.swapaxes(array, -1, -2)).swapaxes(-1, -2)

    def reversed_rows(array):
        return np.ascontiguousarray(array[..., ::-1, :])[..., ::-1, :]

    def heads_outermost(array):
        return np.ascontiguousarray(np.moveaxis(array, -3, 0)).transpose(1, 0, 2, 3)

    def read_only(array):
        copy = array.copy()
        copy.flags.writeable = False
        return copy

    return {
        "strided": strided,
        "transposed": transposed,
        "fortran": np.asfortranarray,
        "reversed": reversed_rows,
        "heads-outermost": heads_outermost,
        "read-only": read_only,
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mask_kind", ["float", "bool"])
@pytest.mark.parametrize("layout", list(_layouts()))
def test_any_memory_layout_gives_the_contiguous_result(rng, dtype, mask_kind, layout):
    query, key, value = random_qkv(rng, (2, 3, 37, 24), (2, 3, 45, 24), (2, 3, 45, 12), dtype)
    mask = rng.standard_normal((2, 3, 37, 45)).astype(dtype)
    mask[rng.random(mask.shape) < 0.2] = -np.inf
    if mask_kind == "bool":
        mask = mask > -0.5
    kwargs = dict(is_causal=True, causal_alignment="bottom_right", return_weights=True)
    expected_out, expected_weights = sdpa(query, key, value, mask, **kwargs)

    view = _layouts()[layout]
    arrays = [view(x) for x in (query, key, value, mask)]
    for array, original in zip(arrays, (query, key, value, mask), strict=True):
        np.testing.assert_array_equal(array, original)
    if layout != "read-only":
        assert not arrays[0].flags.c_contiguous
    out, weights = sdpa(*arrays, **kwargs)
    tight = 1e-6 if dtype == np.float32 else 1e-13
    assert_close(out, expected_out.astype(np.float64), dtype, tight)
    assert_close(weights, expected_weights.astype(np.float64), dtype, tight)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_broadcast_views_with_zero_strides(rng, dtype):
    """np.broadcast_to gives read-only arrays whose repeated dims have stride 0."""
    query = rng.standard_normal((2, 4, 11, 8)).astype(dtype)
    key = np.broadcast_to(rng.standard_normal((13, 8)).astype(dtype), (2, 4, 13, 8))
    value = np.broadcast_to(rng.standard_normal((1, 4, 13, 5)).astype(dtype), (2, 4, 13, 5))
    mask = np.broadcast_to(rng.random((11, 1)) < 0.5, (2, 4, 11, 13))
    out = sdpa(query, key, value, mask)
    expected = sdpa(query, key.copy(), value.copy(), mask.copy())
    tight = 1e-6 if dtype == np.float32 else 1e-13
    assert_close(out, expected.astype(np.float64), dtype, tight)
    assert_close(out, reference.scaled_dot_product_attention(query, key, value, mask), dtype)


def test_output_dtype_follows_the_inputs(rng):
    for dtype in FLOAT_DTYPES:
        query, key, value = random_qkv(rng, (4, 8), (5, 8), (5, 8), dtype)
        out, weights = sdpa(query, key, value, np.zeros((4, 5)), return_weights=True)
        assert out.dtype == dtype and weights.dtype == dtype


def test_tolerance_helper_can_fail():
    """Guards the helpers every test leans on: a float32-sized error fails a float64 check."""
    expected = np.linspace(-3, 3, 10)
    with pytest.raises(AssertionError):
        assert_close((expected + 1e-7).astype(np.float64), expected, np.float64)
    with pytest.raises(AssertionError):
        assert_close(expected.astype(np.float32), expected, np.float64)
    assert tolerance_for(expected, np.float32) == pytest.approx(3e-5)
