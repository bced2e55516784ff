"""Bad input to `scaled_dot_product_attention` is a ValueError or TypeError naming the argument.

`pytest.raises` with one exception type lets anything else through, so a pyo3 PanicException
(a BaseException) or a segfault-free wrong exception fails these tests.
"""

from __future__ import annotations

import math
import re

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import assert_close, run_python

sdpa = attnscope.scaled_dot_product_attention


def zeros(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def shape_pattern(shape) -> str:
    """A regex for a shape however it is printed: (7, 3), [7, 3], 7x3."""
    return r"\D{1,3}".join(str(size) for size in shape)


# (query, key, value, kwargs, words the message must contain)
SHAPE_ERRORS = [
    pytest.param(zeros(8), zeros(8), zeros(8), {}, "query", id="1-D"),
    pytest.param(zeros(4, 8), zeros(8), zeros(5, 8), {}, "key", id="1-D-key"),
    pytest.param(zeros(4, 8), zeros(5, 8), zeros(5), {}, "value", id="1-D-value"),
    pytest.param(zeros(2, 4, 8), zeros(5, 8), zeros(5, 8), {}, "key", id="rank-key"),
    pytest.param(zeros(1, 2, 4, 8), zeros(2, 5, 8), zeros(2, 5, 8), {}, "key", id="rank-4-vs-3"),
    pytest.param(zeros(2, 4, 8), zeros(2, 5, 8), zeros(1, 2, 5, 8), {}, "value", id="rank-value"),
    pytest.param(zeros(2, 4, 8), zeros(2, 5, 7), zeros(2, 5, 8), {}, "key", id="head-dim"),
    pytest.param(zeros(2, 4, 8), zeros(2, 5, 8), zeros(2, 6, 8), {}, "value", id="keys-vs-values"),
    pytest.param(
        zeros(3, 2, 4, 8), zeros(2, 2, 5, 8), zeros(2, 2, 5, 8), {}, "key", id="batch-key"
    ),
    pytest.param(
        zeros(3, 2, 4, 8), zeros(3, 2, 5, 8), zeros(2, 2, 5, 8), {}, "value", id="batch-value"
    ),
    pytest.param(
        zeros(2, 3, 2, 4, 8),
        zeros(2, 1, 2, 5, 8),
        zeros(2, 1, 2, 5, 8),
        {},
        "key",
        id="inner-batch-key",
    ),
    pytest.param(zeros(2, 4, 8), zeros(2, 5, 8), zeros(1, 5, 8), {}, "value", id="heads-value"),
    pytest.param(
        zeros(4, 3, 8), zeros(2, 5, 8), zeros(2, 5, 8), {}, "enable_gqa", id="heads-without-gqa"
    ),
]


@pytest.mark.parametrize(("query", "key", "value", "kwargs", "word"), SHAPE_ERRORS)
def test_shape_errors_are_value_errors_naming_the_argument(query, key, value, kwargs, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        sdpa(query, key, value, **kwargs)


@pytest.mark.parametrize(
    ("query_heads", "kv_heads"),
    [(5, 2), (2, 4)],
    ids=["heads-not-a-multiple", "more-kv-heads-than-query-heads"],
)
def test_grouped_heads_that_do_not_divide_are_value_errors_naming_the_heads(query_heads, kv_heads):
    key = zeros(kv_heads, 5, 8)
    with pytest.raises(ValueError, match="head"):
        sdpa(zeros(query_heads, 3, 8), key, key.copy(), enable_gqa=True)


@pytest.mark.parametrize(
    "mask_shape",
    [(7, 3), (2, 4, 6), (3, 1, 1), (2, 2, 4, 5), (4, 6, 1)],
    ids=["wrong-last-two", "wrong-keys", "wrong-heads", "extra-leading-dim", "trailing-1"],
)
@pytest.mark.parametrize("mask_dtype", [np.bool_, np.float32])
def test_mask_that_does_not_broadcast_names_attn_mask_and_shapes(mask_shape, mask_dtype):
    query, key, value = zeros(2, 4, 8), zeros(2, 5, 8), zeros(2, 5, 8)
    with pytest.raises(ValueError, match="attn_mask") as error:
        sdpa(query, key, value, np.zeros(mask_shape, dtype=mask_dtype))
    assert re.search(shape_pattern(mask_shape), str(error.value)), str(error.value)


@pytest.mark.parametrize(
    ("query", "key", "value", "word"),
    [
        pytest.param(zeros(4, 8, dtype=np.int32), zeros(5, 8), zeros(5, 8), "query", id="int-q"),
        pytest.param(zeros(4, 8), zeros(5, 8, dtype=np.float16), zeros(5, 8), "key", id="f16-k"),
        pytest.param(zeros(4, 8), zeros(5, 8), zeros(5, 8, dtype=np.int64), "value", id="int-v"),
        pytest.param(zeros(4, 8, dtype=np.bool_), zeros(5, 8), zeros(5, 8), "query", id="bool-q"),
        pytest.param(
            zeros(4, 8, dtype=np.complex64), zeros(5, 8), zeros(5, 8), "query", id="complex-q"
        ),
        pytest.param(
            zeros(4, 8),
            zeros(5, 8, dtype=np.float64),
            zeros(5, 8, dtype=np.float64),
            "dtype",
            id="mixed-f32-f64",
        ),
        pytest.param(
            zeros(4, 8, dtype=np.float64),
            zeros(5, 8, dtype=np.float64),
            zeros(5, 8),
            "dtype",
            id="mixed-value",
        ),
        pytest.param([[0.0] * 8] * 4, zeros(5, 8), zeros(5, 8), "query", id="list-q"),
        pytest.param(zeros(4, 8), ((0.0,) * 8,) * 5, zeros(5, 8), "key", id="tuple-k"),
        pytest.param(zeros(4, 8), zeros(5, 8), 1.0, "value", id="scalar-v"),
    ],
)
def test_unsupported_inputs_are_type_errors(query, key, value, word):
    with pytest.raises(TypeError, match=re.escape(word)):
        sdpa(query, key, value)


def test_mask_sized_for_kv_heads_does_not_broadcast_to_query_heads():
    """With GQA the mask follows the query heads (Hq = 4), not the kv heads (Hkv = 2)."""
    query, key, value = zeros(4, 3, 8), zeros(2, 5, 8), zeros(2, 5, 8)
    with pytest.raises(ValueError, match="attn_mask") as error:
        sdpa(query, key, value, np.ones((2, 3, 5), dtype=bool), enable_gqa=True)
    assert re.search(shape_pattern((2, 3, 5)), str(error.value)), str(error.value)
    assert sdpa(query, key, value, np.ones((4, 3, 5), dtype=bool), enable_gqa=True).shape == (
        4,
        3,
        8,
    )


@pytest.mark.parametrize(
    "mask",
    [
        np.ones((4, 5), dtype=np.int64),
        np.ones((4, 5), dtype=np.uint8),
        np.ones((4, 5), dtype=np.complex128),
        [[True] * 5] * 4,
    ],
    ids=["int64", "uint8", "complex", "list"],
)
def test_mask_of_unsupported_type_is_a_type_error(mask):
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(zeros(4, 8), zeros(5, 8), zeros(5, 8), mask)


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        (dict(causal_alignment="bottom-right"), ValueError, "causal_alignment"),
        (dict(causal_alignment="TOP_LEFT"), ValueError, "causal_alignment"),
        (dict(causal_alignment=None), ValueError, "causal_alignment"),
        (dict(window=0), ValueError, "window"),
        (dict(window=-2), ValueError, "window"),
        (dict(window=np.int64(0)), ValueError, "window"),
        (dict(window=(-1, 2)), ValueError, "window"),
        (dict(window=(3, -1)), ValueError, "window"),
        (dict(window=(None, -5)), ValueError, "window"),
        (dict(window="3"), TypeError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(window=True), TypeError, "window"),
        (dict(window=(1, 2, 3)), TypeError, "window"),
        (dict(window=(1.5, 2)), TypeError, "window"),
        (dict(window=(1, True)), TypeError, "window"),
        (dict(scale=math.nan), ValueError, "scale"),
        (dict(scale=math.inf), ValueError, "scale"),
        (dict(scale=-math.inf), ValueError, "scale"),
        (dict(scale=np.float32("nan")), ValueError, "scale"),
        (dict(scale="0.5"), TypeError, "scale"),
        (dict(scale=True), TypeError, "scale"),
        (dict(scale=1j), TypeError, "scale"),
        (dict(is_causal=1), TypeError, "is_causal"),
        (dict(is_causal="yes"), TypeError, "is_causal"),
        (dict(is_causal=None), TypeError, "is_causal"),
        (dict(enable_gqa=1), TypeError, "enable_gqa"),
        (dict(enable_gqa=None), TypeError, "enable_gqa"),
        (dict(return_weights=1), TypeError, "return_weights"),
        (dict(return_weights="no"), TypeError, "return_weights"),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else None,
)
def test_bad_options_name_the_option(kwargs, error, word):
    with pytest.raises(error, match=re.escape(word)):
        sdpa(zeros(2, 4, 8), zeros(2, 5, 8), zeros(2, 5, 8), **kwargs)


def test_numpy_bool_flags_are_accepted():
    query = np.random.default_rng(0).standard_normal((3, 8))
    plain = sdpa(query, query, query, is_causal=True)
    np.testing.assert_array_equal(sdpa(query, query, query, is_causal=np.bool_(True)), plain)


# --- the weights memory limit ---------------------------------------------------------------


def test_weights_memory_limit_round_trips(restore_weights_limit):
    assert isinstance(restore_weights_limit, int) and restore_weights_limit > 0
    attnscope.set_weights_memory_limit(12345)
    assert attnscope.get_weights_memory_limit() == 12345
    attnscope.set_weights_memory_limit(0)
    assert attnscope.get_weights_memory_limit() == 0


@pytest.mark.parametrize(
    ("value", "limit"), [("abc", None), ("-1", None), ("1e9", None), (" 4096 ", 4096)]
)
def test_the_weights_limit_variable_is_read_or_refused(value, limit):
    """ATTNSCOPE_WEIGHTS_LIMIT_BYTES follows ATTNSCOPE_NUM_THREADS' rule: a value that is not a
    whole number of bytes is reported at first use, not ignored, and the setter still works."""
    script = f"""
import numpy as np, attnscope
q = np.ones((1, 4, 4), np.float32)
calls = (
    attnscope.get_weights_memory_limit,
    lambda: attnscope.scaled_dot_product_attention(q, q, q, return_weights=True),
)
for call in calls:
    try:
        got = call()
    except ValueError as error:
        assert {limit!r} is None, error
        assert "ATTNSCOPE_WEIGHTS_LIMIT_BYTES" in str(error) and "whole number" in str(error), error
    else:
        assert {limit!r} is not None, "no error"
assert {limit!r} is None or attnscope.get_weights_memory_limit() == {limit!r}
attnscope.set_weights_memory_limit(1 << 20)
assert attnscope.get_weights_memory_limit() == 1 << 20
attnscope.scaled_dot_product_attention(q, q, q, return_weights=True)
print("ok")
"""
    assert run_python(script, env={"ATTNSCOPE_WEIGHTS_LIMIT_BYTES": value}) == "ok"


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("9", TypeError)]
)
def test_bad_weights_memory_limit_is_rejected(restore_weights_limit, value, error):
    with pytest.raises(error, match="num_bytes"):
        attnscope.set_weights_memory_limit(value)
    assert attnscope.get_weights_memory_limit() == restore_weights_limit


def test_weights_memory_limit_beyond_64_bits_is_not_an_overflow(restore_weights_limit):
    """A limit too large to store means "no limit" or a ValueError, never an OverflowError."""
    try:
        attnscope.set_weights_memory_limit(2**70)
    except ValueError as error:
        assert "num_bytes" in str(error)
    else:
        assert attnscope.get_weights_memory_limit() >= 2**63  # far beyond any real array


@pytest.mark.parametrize(("dtype", "itemsize"), [(np.float32, 4), (np.float64, 8)])
def test_weights_over_the_limit_are_refused(restore_weights_limit, dtype, itemsize):
    query = np.ones((2, 4, 20, 8), dtype=dtype)
    key = np.ones((2, 4, 30, 8), dtype=dtype)
    value = np.ones((2, 4, 30, 3), dtype=dtype)
    weights_bytes = 2 * 4 * 20 * 30 * itemsize

    attnscope.set_weights_memory_limit(weights_bytes)
    out, weights = sdpa(query, key, value, return_weights=True)  # exactly at the limit: fine
    assert weights.nbytes == weights_bytes

    attnscope.set_weights_memory_limit(weights_bytes - 1)
    with pytest.raises(ValueError, match="(?i)limit"):
        sdpa(query, key, value, return_weights=True)
    # Only the weights count: the output alone is still computed.
    assert_close(sdpa(query, key, value), out.astype(np.float64), dtype)


def test_weights_limit_is_checked_before_allocating(restore_weights_limit):
    """64 GiB of weights from 512 KiB of input: refused at once, not a MemoryError or abort."""
    length = 1 << 17
    query = np.broadcast_to(zeros(1, 1), (length, 1))
    attnscope.set_weights_memory_limit(1 << 20)
    with pytest.raises(ValueError, match="(?i)limit"):
        sdpa(query, query, query, return_weights=True)


def test_weights_that_cannot_fit_in_memory_are_refused_by_default():
    """4 TiB of weights is more than any machine this runs on: the default limit refuses it."""
    length = 1 << 20
    query = np.broadcast_to(zeros(1, 1), (length, 1))
    with pytest.raises(ValueError, match="(?i)limit|memory"):
        sdpa(query, query, query, return_weights=True)


def test_inputs_too_large_to_copy_are_refused_not_fatal():
    # A broadcast view describes 64 GiB while storing 4 bytes; making it contiguous must fail
    # cleanly with an error naming the argument instead of aborting the process.
    small = np.ones((1, 1, 1, 1), dtype=np.float32)
    huge = np.broadcast_to(np.ones(1, dtype=np.float32), (1, 1, 1 << 34, 1))
    with pytest.raises(ValueError, match="query"):
        attnscope.scaled_dot_product_attention(huge, small, small)
    with pytest.raises(ValueError, match="key"):
        attnscope.scaled_dot_product_attention(small, huge, huge)


def test_a_panic_in_the_core_is_a_runtime_error():
    """The last line of defence: whatever bug panics inside the core reaches Python as a
    RuntimeError saying it is an internal error (never a PanicException, which `except
    Exception` would not catch)."""
    from attnscope import _core

    with pytest.raises(RuntimeError, match="internal error.*a deliberate panic"):
        _core._panic_for_tests()


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", ">f8"])
def test_either_byte_order_is_computed(dtype):
    rng = np.random.default_rng(0)
    native = rng.standard_normal((2, 3, 9, 8))
    swapped = native.astype(dtype)
    mask = np.where(rng.random((9, 9)) < 0.8, 0.0, -np.inf)
    out = attnscope.scaled_dot_product_attention(swapped, swapped, swapped, mask.astype(dtype))
    expected = reference.scaled_dot_product_attention(native, native, native, mask)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    assert_close(out, expected, out.dtype)
