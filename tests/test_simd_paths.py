"""Every instruction-set path of the kernel (AVX-512, AVX2+FMA, portable) against the reference.

The engine picks the best path at run time; forcing each one here keeps the fallbacks correct
on machines that would never pick them.
"""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from attnscope import _core, reference
from conftest import assert_close, random_qkv

CASES = [
    # (q shape, k shape, v shape, options)
    ((2, 3, 70, 24), (2, 3, 300, 24), (2, 3, 300, 40), {"is_causal": True}),
    ((1, 4, 65, 64), (1, 2, 65, 64), (1, 2, 65, 64), {"enable_gqa": True, "window": 9}),
    ((1, 2, 3000), (1, 2, 3000), (1, 2, 3000), {}),  # 3-D: heads of one key, D=3000
    ((1, 1, 1, 128), (1, 1, 5000, 128), (1, 1, 5000, 128), {"causal_alignment": "bottom_right"}),
    ((130, 17), (257, 17), (257, 33), {"window": (40, 2), "scale": 0.2}),
    # Decoding with grouped heads: the query heads of a kv group run as one block.
    (
        (2, 8, 1, 64),
        (2, 2, 3000, 64),
        (2, 2, 3000, 48),
        {"enable_gqa": True, "is_causal": True, "causal_alignment": "bottom_right", "window": 900},
    ),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda case: str(case[0]))
def test_each_level_matches_reference(simd_level, case, dtype):
    q_shape, k_shape, v_shape, options = case
    q, k, v = random_qkv(np.random.default_rng(3), q_shape, k_shape, v_shape, dtype)
    assert _core.simd_level() == simd_level
    for return_weights in (False, True):
        got = attnscope.scaled_dot_product_attention(
            q, k, v, return_weights=return_weights, **options
        )
        want = reference.scaled_dot_product_attention(
            q, k, v, return_weights=return_weights, **options
        )
        if return_weights:
            assert_close(got[0], want[0], dtype)
            assert_close(got[1], want[1], dtype)
        else:
            assert_close(got, want, dtype)


def test_each_level_hides_nan_behind_a_mask(simd_level):
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, (2, 90, 32), (2, 400, 32), (2, 400, 32))
    k[:, 17] = np.nan
    v[:, 17] = np.inf
    mask = np.ones((90, 400), dtype=bool)
    mask[:, 17] = False
    got = attnscope.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert np.isfinite(got).all()
    assert_close(got, want, np.float32)


def test_forcing_an_unknown_level_is_refused():
    with pytest.raises(ValueError, match="level"):
        _core.force_simd_level("sse9")


def test_grouped_decode_with_a_shared_mask(simd_level):
    rng = np.random.default_rng(9)
    q, k, v = random_qkv(rng, (3, 6, 1, 32), (3, 2, 2500, 32), (3, 2, 2500, 32))
    mask = rng.random((3, 1, 1, 2500)) > 0.3  # one row per batch, shared by every head
    k[:, :, ~mask[0, 0, 0]] = np.nan  # hidden keys of batch 0 hold NaN
    got = attnscope.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert np.isfinite(got[0]).all()
    assert_close(got, want, np.float32)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize(("num_heads", "queries"), [(2, 1), (8, 1), (8, 5)])
def test_each_level_reads_every_cache_storage_exactly(simd_level, storage, num_heads, queries):
    # The cache's own kernel widens stored rows per level. 2,503 keys span key chunks and a
    # remainder of value rows; head_dim 76 is three int8 blocks (the last one short), spans
    # several blocks in every vector loop, and leaves columns past the last vector.
    rng = np.random.default_rng(5)
    k, v = (rng.standard_normal((1, 2, 2503, 76)).astype(np.float32) for _ in range(2))
    cache = attnscope.KVCache(2, 76, storage=storage)
    cache.append(k, v)
    q = rng.standard_normal((1, num_heads, queries, 76)).astype(np.float32)
    assert _core.simd_level() == simd_level
    want = reference.scaled_dot_product_attention(
        q,
        reference.stored_values(k, storage),
        reference.stored_values(v, storage),
        is_causal=True,
        causal_alignment="bottom_right",
        enable_gqa=True,
    )
    assert_close(cache.attend(q, enable_gqa=num_heads != 2), want, np.float32)
