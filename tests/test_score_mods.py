"""Softcapping and ALiBi: against the float64 reference (which writes them plainly), combined
with masks, alignments, GQA, weights and both dtypes; PyTorch for ALiBi as a float mask."""

from __future__ import annotations

import math

import attnscope as ats
import numpy as np
import pytest
from attnscope import masks as M
from attnscope import reference


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The ALiBi paper's geometric slopes for a power-of-two number of heads."""
    return np.array([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])


def tolerance(dtype):
    return {"rtol": 3e-5, "atol": 3e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


def inputs(rng, dtype, batch=(2,), heads=(4, 2), num_queries=70, num_keys=90, depth=16):
    q = rng.standard_normal((*batch, heads[0], num_queries, depth)) * 2
    k = rng.standard_normal((*batch, heads[1], num_keys, depth)) * 2
    v = rng.standard_normal((*batch, heads[1], num_keys, depth))
    return [x.astype(dtype) for x in (q, k, v)]


CASES = [
    {"softcap": 5.0},
    {"softcap": 0.3},
    {"alibi_slopes": alibi_slopes(4)},
    {"alibi_slopes": alibi_slopes(4), "causal_alignment": "bottom_right", "is_causal": True},
    {"softcap": 2.0, "alibi_slopes": -alibi_slopes(4), "window": 9},
    {"softcap": 1.5, "attn_mask": M.causal() & (M.window(10, 0) | M.sinks(3))},
    {"alibi_slopes": alibi_slopes(4), "attn_mask": "float"},
    {"softcap": 50.0, "return_weights": True, "is_causal": True},
    {"alibi_slopes": alibi_slopes(4), "return_weights": True, "window": (5, None)},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("num_queries", [3, 70])
def test_matches_reference(dtype, case, num_queries):
    rng = np.random.default_rng(case)
    q, k, v = inputs(rng, dtype, num_queries=num_queries)
    options = dict(CASES[case], enable_gqa=True)
    if isinstance(options.get("attn_mask"), str):
        float_mask = rng.standard_normal((num_queries, 90)).astype(dtype)
        float_mask[rng.random(float_mask.shape) < 0.3] = -np.inf
        options["attn_mask"] = float_mask
    got = ats.scaled_dot_product_attention(q, k, v, **options)
    expected = reference.scaled_dot_product_attention(q, k, v, **options)
    if not options.get("return_weights"):
        got, expected = (got,), (expected,)
    for mine, spec in zip(got, expected, strict=True):
        assert mine.dtype == dtype
        np.testing.assert_allclose(mine, spec, **tolerance(dtype))


def test_softcap_changes_the_result_and_a_huge_cap_changes_almost_nothing():
    rng = np.random.default_rng(1)
    q, k, v = inputs(rng, np.float64)
    plain = ats.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    capped = ats.scaled_dot_product_attention(q, k, v, enable_gqa=True, softcap=1.0)
    wide = ats.scaled_dot_product_attention(q, k, v, enable_gqa=True, softcap=1e6)
    assert np.abs(capped - plain).max() > 1e-2
    np.testing.assert_allclose(wide, plain, rtol=1e-8, atol=1e-9)


def test_alibi_on_a_2d_call_takes_one_slope():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((40, 8)).astype(np.float32)
    got = ats.scaled_dot_product_attention(q, q, q, alibi_slopes=[0.5], is_causal=True)
    expected = reference.scaled_dot_product_attention(q, q, q, alibi_slopes=[0.5], is_causal=True)
    np.testing.assert_allclose(got, expected, rtol=3e-5, atol=3e-6)


def test_bitwise_identical_for_every_thread_count():
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, np.float32, batch=(1,), heads=(4, 4), num_queries=600, num_keys=800)
    options = {"softcap": 3.0, "alibi_slopes": alibi_slopes(4), "is_causal": True}
    results = []
    for threads in (1, 2, 3):
        with ats.threads(threads):
            results.append(
                (
                    ats.scaled_dot_product_attention(q, k, v, **options),
                    ats.scaled_dot_product_attention(q[:, :, :2], k, v, **options),
                )
            )
    for result in results[1:]:
        for mine, first in zip(result, results[0], strict=True):
            np.testing.assert_array_equal(mine, first)


def test_torch_with_alibi_as_a_float_mask():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer")
    rng = np.random.default_rng(4)
    q, k, v = inputs(rng, np.float32, batch=(1,), heads=(4, 4), num_queries=50, num_keys=80)
    slopes = alibi_slopes(4)
    diagonal = np.arange(50)[:, None] + 30
    bias = slopes[:, None, None] * (np.arange(80)[None, :] - diagonal)
    bias = np.where(np.arange(80)[None, :] <= diagonal, bias, -np.inf).astype(np.float32)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x) for x in (q, k, v)), attn_mask=torch.from_numpy(bias)
    ).numpy()
    got = ats.scaled_dot_product_attention(
        q, k, v, alibi_slopes=slopes, is_causal=True, causal_alignment="bottom_right"
    )
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"softcap": 0.0}, ValueError, "softcap.*> 0"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"softcap": math.inf}, ValueError, "softcap"),
        ({"softcap": math.nan}, ValueError, "softcap"),
        ({"softcap": "3"}, TypeError, "softcap"),
        ({"softcap": True}, TypeError, "softcap"),
        ({"alibi_slopes": [0.5, 0.25]}, ValueError, "alibi_slopes.*\\(4,\\)"),
        ({"alibi_slopes": np.ones((4, 1))}, ValueError, "alibi_slopes.*shape"),
        ({"alibi_slopes": [0.5, np.nan, 0.1, 0.1]}, ValueError, "alibi_slopes.*finite"),
        ({"alibi_slopes": [0.5, np.inf, 0.1, 0.1]}, ValueError, "alibi_slopes.*finite"),
        ({"alibi_slopes": ["a", "b", "c", "d"]}, TypeError, "alibi_slopes"),
        ({"alibi_slopes": [True] * 4}, TypeError, "alibi_slopes"),
        ({"alibi_slopes": 0.5}, ValueError, "alibi_slopes"),
    ],
)
def test_bad_arguments_are_named(options, error, match):
    q = np.zeros((1, 4, 5, 8), dtype=np.float32)
    with pytest.raises(error, match=match):
        ats.scaled_dot_product_attention(q, q, q, **options)
