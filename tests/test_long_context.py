"""float32 accuracy against the float64 reference when a query block reads hundreds of thousands
of keys: the running sums must not lose precision as S grows (PyTorch float32 stays near 1e-6)."""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from attnscope import reference

NUM_KEYS = 262_144
# Largest |error| over the largest |output|; one block of queries sums over all NUM_KEYS keys.
RELATIVE_ERROR = 5e-6


@pytest.fixture(scope="module")
def long_case():
    """65 queries (a full query block and one more row) against 262,144 keys, D = 16."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((1, n, 16)).astype(np.float32) for n in (65, NUM_KEYS, NUM_KEYS))
    return q, k, v, reference.scaled_dot_product_attention(q, k, v)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("num_queries", [64, 65], ids=["split-keys", "one-pass"])
def test_long_context_float32_error_stays_small(simd_level, long_case, num_queries):
    q, k, v, want = long_case
    q, want = q[:, :num_queries], want[:, :num_queries]
    out = attnscope.scaled_dot_product_attention(q, k, v)
    assert relative_error(out, want) <= RELATIVE_ERROR
    out, weights = attnscope.scaled_dot_product_attention(q, k, v, return_weights=True)
    assert relative_error(out, want) <= RELATIVE_ERROR
    np.testing.assert_allclose(weights.sum(axis=-1, dtype=np.float64), 1.0, rtol=0, atol=1e-5)
