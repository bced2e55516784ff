"""`MultiHeadAttention` against a float64 layer built on `attnscope.reference`: projections,
grouped heads, masks, padding, causal, cross-attention, unbatched inputs and per-head weights."""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import FLOAT_DTYPES, assert_close, counting_while
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def reference_layer(
    layer, query, key=None, value=None, *, attn_mask=None, key_padding_mask=None, **options
):
    """The layer in float64 from its definition: x·W + b, heads, reference attention, ·W_O + b.
    `options` (``is_causal``, ``causal_alignment``) go to the reference attention.

    Batched inputs only. Returns (output (B, L, E), weights (B, Hq, L, S)).
    """
    key = query if key is None else key
    value = key if value is None else value

    def project(x, weight, bias):
        out = np.asarray(x, np.float64) @ np.asarray(weight, np.float64)
        return out if bias is None else out + np.asarray(bias, np.float64)

    def heads(x, count):
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, count, x.shape[-1] // count).transpose(0, 2, 1, 3)

    q = heads(project(query, layer.w_q, layer.b_q), layer.num_heads)
    k = heads(project(key, layer.w_k, layer.b_k), layer.num_kv_heads)
    v = heads(project(value, layer.w_v, layer.b_v), layer.num_kv_heads)
    mask = attn_mask
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        if mask is None:
            mask = keep
        elif mask.dtype == np.bool_:
            mask = mask & keep
        else:
            mask = np.where(keep, mask, -np.inf)
    out, weights = reference.scaled_dot_product_attention(
        q, k, v, mask, enable_gqa=True, return_weights=True, **options
    )
    batch, _, length, _ = out.shape
    joined = out.transpose(0, 2, 1, 3).reshape(batch, length, out.shape[1] * out.shape[3])
    return project(joined, layer.w_o, layer.b_o), weights


def random_layer(embed_dim, num_heads, *, num_kv_heads=None, dtype=np.float32, seed=0, **kw):
    """A layer with non-zero biases, so the bias path is checked too."""
    layer = attnscope.MultiHeadAttention(
        embed_dim, num_heads, num_kv_heads=num_kv_heads, seed=seed, dtype=dtype, **kw
    )
    rng = np.random.default_rng(seed + 1)
    for name in ("b_q", "b_k", "b_v", "b_o"):
        bias = getattr(layer, name)
        setattr(layer, name, rng.standard_normal(bias.shape).astype(dtype))
    return layer


def inputs(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_self_attention_matches_reference(rng, dtype, num_kv_heads, is_causal):
    layer = random_layer(32, 4, num_kv_heads=num_kv_heads, dtype=dtype)
    x = inputs(rng, 2, 37, 32, dtype=dtype)
    out, weights = layer(x, is_causal=is_causal, need_weights=True)
    expected, expected_weights = reference_layer(layer, x, is_causal=is_causal)
    assert_close(out, expected, dtype)
    assert_close(weights, expected_weights, dtype)
    assert_close(layer(x, is_causal=is_causal), expected, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cross_attention_with_other_widths(rng, dtype):
    layer = random_layer(24, 3, num_kv_heads=1, dtype=dtype, kdim=10, vdim=7)
    assert layer.w_k.shape == (10, 8) and layer.w_v.shape == (7, 8)
    query, key, value = (
        inputs(rng, 2, 5, 24, dtype=dtype),
        inputs(rng, 2, 70, 10, dtype=dtype),
        inputs(rng, 2, 70, 7, dtype=dtype),
    )
    out, weights = layer(query, key, value, need_weights=True)
    expected, expected_weights = reference_layer(layer, query, key, value)
    assert out.shape == (2, 5, 24) and weights.shape == (2, 3, 5, 70)
    assert_close(out, expected, dtype)
    assert_close(weights, expected_weights, dtype)


def test_value_defaults_to_key(rng):
    layer = random_layer(16, 2)
    query, memory = inputs(rng, 1, 4, 16), inputs(rng, 1, 9, 16)
    np.testing.assert_array_equal(layer(query, memory), layer(query, memory, memory))
    assert_close(layer(query, memory), reference_layer(layer, query, memory)[0], np.float32)


@pytest.mark.parametrize(
    "mask_shape", [(11, 13), (2, 4, 11, 13), (1, 4, 1, 13), (4, 11, 13)], ids=str
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_broadcasts_and_combines_with_padding(rng, mask_shape, kind):
    layer = random_layer(32, 4, num_kv_heads=2)
    query, memory = inputs(rng, 2, 11, 32), inputs(rng, 2, 13, 32)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.7
    else:
        mask = rng.standard_normal(mask_shape)
        mask[rng.random(mask_shape) < 0.3] = -np.inf
    padding = np.zeros((2, 13), dtype=bool)
    padding[0, -4:] = True
    padding[1, :2] = True
    for key_padding_mask in (None, padding):
        out, weights = layer(
            query, memory, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=True
        )
        expected, expected_weights = reference_layer(
            layer, query, memory, attn_mask=mask, key_padding_mask=key_padding_mask
        )
        assert_close(out, expected, np.float32)
        assert_close(weights, expected_weights, np.float32)
    assert np.all(weights[0, :, :, -4:] == 0) and np.all(weights[1, :, :, :2] == 0)


def test_padding_mask_hides_keys_even_when_they_are_nan(rng):
    layer = random_layer(16, 2)
    query, memory = inputs(rng, 1, 3, 16), inputs(rng, 1, 6, 16)
    poisoned = memory.copy()
    poisoned[0, 4:] = np.nan
    padding = np.array([[False] * 4 + [True] * 2])
    clean = layer(query, memory[:, :4])
    assert_close(layer(query, poisoned, key_padding_mask=padding), clean.astype(float), np.float32)


def test_fully_masked_query_gives_the_output_bias(rng):
    layer = random_layer(16, 4)
    x = inputs(rng, 1, 5, 16)
    mask = np.ones((5, 5), dtype=bool)
    mask[2] = False
    out, weights = layer(x, attn_mask=mask, need_weights=True)
    assert np.all(weights[0, :, 2] == 0)
    np.testing.assert_allclose(out[0, 2], layer.b_o, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_unbatched_equals_batch_of_one(rng, dtype):
    layer = random_layer(24, 6, num_kv_heads=3, dtype=dtype)
    query, memory = inputs(rng, 7, 24, dtype=dtype), inputs(rng, 9, 24, dtype=dtype)
    padding = np.zeros(9, dtype=bool)
    padding[3] = True
    out, weights = layer(query, memory, key_padding_mask=padding, need_weights=True)
    batched, batched_weights = layer(
        query[None], memory[None], key_padding_mask=padding[None], need_weights=True
    )
    assert out.shape == (7, 24) and weights.shape == (6, 7, 9)
    np.testing.assert_array_equal(out, batched[0])
    np.testing.assert_array_equal(weights, batched_weights[0])
    expected = reference_layer(layer, query[None], memory[None], key_padding_mask=padding[None])
    assert_close(out, expected[0][0], dtype)
    assert np.all(weights[:, :, 3] == 0)


def test_strided_inputs_and_weights(rng):
    layer = random_layer(16, 4)
    x = inputs(rng, 3, 10, 16)
    expected = layer(x)
    fortran = np.asfortranarray(x)
    every_other = inputs(rng, 3, 20, 32)[:, ::2, ::2]
    assert not every_other.flags.c_contiguous
    np.testing.assert_allclose(layer(fortran), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        layer(every_other), layer(np.ascontiguousarray(every_other)), rtol=0, atol=1e-6
    )
    layer.w_q = np.asfortranarray(layer.w_q)
    layer.w_o = layer.w_o.T.copy().T
    np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-6)
    read_only = x.copy()
    read_only.setflags(write=False)
    np.testing.assert_array_equal(layer(read_only), expected)


def test_inputs_are_not_modified(rng):
    layer = random_layer(16, 2)
    x = inputs(rng, 2, 6, 16)
    before = x.copy()
    layer(x, is_causal=True)
    np.testing.assert_array_equal(x, before)


def test_initialisation_is_deterministic_and_shaped():
    first = attnscope.MultiHeadAttention(64, 8, num_kv_heads=2, seed=3)
    second = attnscope.MultiHeadAttention(64, 8, num_kv_heads=2, seed=3)
    other = attnscope.MultiHeadAttention(64, 8, num_kv_heads=2, seed=4)
    assert first.w_q.shape == (64, 64) and first.w_o.shape == (64, 64)
    assert first.w_k.shape == (64, 16) and first.w_v.shape == (64, 16)
    assert first.b_k.shape == (16,) and first.w_q.dtype == np.float32
    for name in ("w_q", "w_k", "w_v", "w_o"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
        assert not np.array_equal(getattr(first, name), getattr(other, name))
    no_bias = attnscope.MultiHeadAttention(8, 2, bias=False, dtype=np.float64)
    assert no_bias.b_q is None and no_bias.b_o is None and no_bias.w_q.dtype == np.float64
    x = np.random.default_rng(0).standard_normal((1, 3, 8))
    assert_close(no_bias(x), reference_layer(no_bias, x)[0], np.float64)


def test_results_do_not_depend_on_thread_count(rng, restore_num_threads):
    layer = random_layer(128, 8, num_kv_heads=4)
    x = inputs(rng, 2, 300, 128)
    attnscope.set_num_threads(1)
    one = layer(x, is_causal=True)
    attnscope.set_num_threads(3)
    three = layer(x, is_causal=True)
    np.testing.assert_array_equal(one, three)


def test_empty_sequences(rng):
    layer = random_layer(8, 2)
    out = layer(inputs(rng, 2, 0, 8))
    assert out.shape == (2, 0, 8)
    out, weights = layer(inputs(rng, 1, 3, 8), inputs(rng, 1, 0, 8), need_weights=True)
    assert weights.shape == (1, 2, 3, 0)
    np.testing.assert_allclose(out, np.broadcast_to(layer.b_o, (1, 3, 8)), rtol=0, atol=0)
    out, weights = layer(inputs(rng, 0, 5, 8), inputs(rng, 0, 7, 8), need_weights=True)
    assert out.shape == (0, 5, 8) and weights.shape == (0, 2, 5, 7)


@st.composite
def layer_cases(draw):
    num_kv_heads = draw(st.integers(1, 3))
    num_heads = num_kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 9))
    batch, length, keys = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 70)),
        draw(st.integers(1, 70)),
    )
    self_attention = draw(st.booleans())
    return {
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "batch": batch,
        "length": length,
        "keys": length if self_attention else keys,
        "self_attention": self_attention,
        "is_causal": draw(st.booleans()),
        "padding": draw(st.booleans()),
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_any_shape_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    embed_dim = case["num_heads"] * case["head_dim"]
    layer = random_layer(
        embed_dim,
        case["num_heads"],
        num_kv_heads=case["num_kv_heads"],
        dtype=case["dtype"],
        seed=case["seed"],
    )
    query = inputs(rng, case["batch"], case["length"], embed_dim, dtype=case["dtype"])
    memory = (
        query
        if case["self_attention"]
        else inputs(rng, case["batch"], case["keys"], embed_dim, dtype=case["dtype"])
    )
    padding = None
    if case["padding"]:
        padding = rng.random((case["batch"], case["keys"])) < 0.3
    out, weights = layer(
        query, memory, key_padding_mask=padding, is_causal=case["is_causal"], need_weights=True
    )
    expected, expected_weights = reference_layer(
        layer, query, memory, key_padding_mask=padding, is_causal=case["is_causal"]
    )
    assert_close(out, expected, case["dtype"])
    assert_close(weights, expected_weights, case["dtype"])


def test_forward_releases_the_gil(restore_num_threads):
    """A Python thread keeps counting while a long forward runs, at a good share of the rate
    it counts at while the main thread sleeps (a held GIL would allow about 1%)."""
    attnscope.set_num_threads(1)  # leave a core for the counting thread
    layer = attnscope.MultiHeadAttention(256, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 1500, 256)).astype(np.float32)
    during_call, free_rate, call_seconds = counting_while(lambda: layer(x, is_causal=True))
    assert free_rate > 0
    assert during_call > 0.1 * free_rate * call_seconds, (during_call, free_rate, call_seconds)
