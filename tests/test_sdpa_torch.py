"""attnscope agrees with `torch.nn.functional.scaled_dot_product_attention` where PyTorch has the
same option (skipped when torch is not installed). Every row keeps at least one visible key:
PyTorch returns NaN for a fully masked row where attnscope returns zeros."""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from conftest import assert_close, random_qkv

torch = pytest.importorskip("torch")
functional = pytest.importorskip("torch.nn.functional")


def _bool_mask(rng, shape):
    mask = rng.random(shape) < 0.6
    mask[..., 0] = True  # no fully masked row
    return mask


def _float_mask(rng, shape):
    mask = rng.standard_normal(shape)
    mask[rng.random(shape) < 0.3] = -np.inf
    mask[..., -1] = 0.5  # no fully masked row
    return mask


def case(name, q_shape, k_shape, v_shape=None, mask=None, **options):
    """A row of CASES: the value shape defaults to the key's; `mask` is a builder and its
    shape, or None; `options` go to both functions."""
    return pytest.param(q_shape, k_shape, v_shape or k_shape, mask, options, id=name)


CASES = [
    case("plain", (2, 4, 33, 16), (2, 4, 47, 16)),
    case("dv-differs", (1, 2, 70, 8), (1, 2, 65, 8), (1, 2, 65, 24)),
    case("3-D", (3, 20, 12), (3, 20, 12)),
    case("bool-LS", (2, 3, 40, 16), (2, 3, 50, 16), mask=(_bool_mask, (40, 50))),
    case("bool-B1LS", (2, 3, 40, 16), (2, 3, 50, 16), mask=(_bool_mask, (2, 1, 40, 50))),
    case("float-BH1S", (2, 3, 40, 16), (2, 3, 50, 16), mask=(_float_mask, (2, 3, 1, 50))),
    case("float-scale", (2, 3, 40, 16), (2, 3, 50, 16), mask=(_float_mask, (40, 50)), scale=0.37),
    case("causal", (2, 2, 64, 32), (2, 2, 64, 32), is_causal=True),
    case("causal-L<S", (1, 2, 30, 16), (1, 2, 90, 16), is_causal=True),
    case(
        "gqa-causal", (2, 6, 45, 16), (2, 2, 45, 16), (2, 2, 45, 8), enable_gqa=True, is_causal=True
    ),
    case(
        "gqa-mask-scale",
        (1, 8, 17, 16),
        (1, 2, 70, 16),
        mask=(_bool_mask, (8, 17, 70)),
        enable_gqa=True,
        scale=0.2,
    ),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape", "mask_spec", "options"), CASES)
def test_matches_torch(rng, dtype, q_shape, k_shape, v_shape, mask_spec, options):
    query, key, value = random_qkv(rng, q_shape, k_shape, v_shape, dtype)
    mask = None
    if mask_spec is not None:
        build, shape = mask_spec
        mask = build(rng, shape)
        if mask.dtype != np.bool_:
            mask = mask.astype(dtype)

    with torch.no_grad():
        expected = functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in (query, key, value)),
            attn_mask=None if mask is None else torch.from_numpy(mask),
            **options,
        ).numpy()
    actual = attnscope.scaled_dot_product_attention(query, key, value, mask, **options)
    assert_close(actual, expected.astype(np.float64), dtype)
