"""Inputs at the edges of what the engine accepts: exact answers where it accepts them, a
ValueError naming the argument where it cannot carry them, never NaN, a hang or a crash."""

import re

import attnscope
import numpy as np
import pytest
from attnscope import masks, reference

_core = pytest.importorskip("attnscope._core", reason="the compiled engine is not built")


def random_qkv(rng, dtype, queries=9, keys=37, depth=16, heads=2):
    shapes = [(heads, n, depth) for n in (queries, keys, keys)]
    return tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)


@pytest.mark.parametrize("cap", [0.5, 3.0, 1e4, 1e6, 1e8, 1e20, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softcap_stays_exact_for_large_caps(rng, dtype, cap):
    """A large cap barely bends the scores; written with exponentials, tanh cancels once
    s / cap is small and a cap of 1e8 flattened float32 attention to uniform."""
    q, k, v = random_qkv(rng, dtype)
    got = attnscope.scaled_dot_product_attention(q, k, v, softcap=cap, is_causal=True)
    want = reference.scaled_dot_product_attention(q, k, v, softcap=cap, is_causal=True)
    tolerance = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)


def test_softcaps_and_slopes_the_dtype_cannot_carry_are_refused(rng):
    q, k, v = random_qkv(rng, np.float32)
    for cap in (1e39, 1e-39):
        with pytest.raises(ValueError, match=r"^softcap: .* out of range for float32"):
            attnscope.scaled_dot_product_attention(q, k, v, softcap=cap)
    with pytest.raises(ValueError, match=r"^alibi_slopes: 1e38 is too large for float32"):
        attnscope.scaled_dot_product_attention(q, k, v, alibi_slopes=np.array([0.5, 1e38]))
    # float64 carries them, and agrees with the reference.
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    slopes = np.array([0.5, 1e38])
    got = attnscope.scaled_dot_product_attention(q64, k64, v64, alibi_slopes=slopes)
    want = reference.scaled_dot_product_attention(q64, k64, v64, alibi_slopes=slopes)
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize(
    ("sizes", "block", "message"),
    [
        ((2**40, 2**40), 2**20, "more than a layout can count"),
        ((2**31, 2**31), 1, "tiles"),
        ((2**31, 2**31), 2**28, "partial tiles"),
        ((2**63 - 1, 8), 64, "at most"),
    ],
)
def test_layouts_too_large_to_hold_are_refused(sizes, block, message):
    with pytest.raises(ValueError, match=message):
        masks.causal().layout(*sizes, block=block)


def test_a_fixed_summary_wider_than_the_keys_returns_at_once():
    dense = masks.fixed(2**40, 2**40).to_dense(3, 8)
    assert dense.all() and dense.shape == (3, 8)


@pytest.mark.parametrize(
    ("storage", "bad"), [("int8", np.nan), ("int8", -np.inf), ("float16", 7e4)]
)
def test_compressed_storage_refuses_values_it_cannot_keep(rng, storage, bad):
    """int8 shares a scale per block of 32 values (an inf or NaN would spread over them);
    float16 cannot hold finite values past 65,504. A refused append keeps nothing."""
    cache = attnscope.KVCache(2, 64, storage=storage)
    k = rng.standard_normal((1, 2, 5, 64)).astype(np.float32)
    cache.append(k, k)
    held = cache.nbytes, len(cache)
    for name in ("k", "v"):
        poisoned = k.copy()
        poisoned[0, 1, 3, 40] = bad
        pair = (poisoned, k) if name == "k" else (k, poisoned)
        with pytest.raises(ValueError, match=rf"^{name}: holds .*{storage}"):
            cache.append(*pair)
        assert (cache.nbytes, len(cache)) == held


def test_a_backward_dtype_mismatch_reads_cleanly(rng):
    q, k, v = random_qkv(rng, np.float32)
    out, lse = attnscope.scaled_dot_product_attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError) as error:
        attnscope.scaled_dot_product_attention_backward(out.astype(np.float64), q, k, v, out, lse)
    text = str(error.value)
    assert "  " not in text, text
    assert re.search(r"computes in the forward's dtype: convert \w+ with \.astype\(\)$", text)
