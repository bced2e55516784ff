"""`KVCache` and decoding with `MultiHeadAttention(..., cache=)`: bottom-right causal attention
over the cache against the reference, token-by-token decoding equal to one causal forward,
amortised growth, and failed calls that leave the cache exactly as it was."""

from __future__ import annotations

import threading

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import FLOAT_DTYPES, assert_close
from test_mha import random_layer, reference_layer


def fill(cache, rng, tokens, dtype=np.float32):
    """Appends `tokens` random keys/values; returns them as (batch, Hkv, n, D) arrays."""
    shape = (cache.batch, cache.num_kv_heads, tokens, cache.head_dim)
    k = rng.standard_normal(shape).astype(dtype)
    v = rng.standard_normal(shape).astype(dtype)
    cache.append(k, v)
    return k, v


def test_append_len_nbytes_reset(rng):
    cache = attnscope.KVCache(3, 8, batch=2, dtype=np.float64)
    assert len(cache) == 0 and cache.nbytes == 0
    fill(cache, rng, 5, np.float64)
    fill(cache, rng, 1, np.float64)
    assert len(cache) == 6
    assert cache.nbytes == 2 * 2 * 3 * 6 * 8 * 8
    capacity = cache.capacity
    cache.reset()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.capacity == capacity
    assert "len=0" in repr(cache)


def test_growth_is_amortised(rng):
    cache = attnscope.KVCache(1, 4)
    token = np.ones((1, 1, 1, 4), dtype=np.float32)
    capacities = set()
    for _ in range(2000):
        cache.append(token, token)
        capacities.add(cache.capacity)
    assert len(cache) == 2000
    # Doubling: about log2(2000) = 11 distinct sizes, never one per token.
    assert len(capacities) <= 12, sorted(capacities)
    reserved = attnscope.KVCache(1, 4, capacity=3000)
    for _ in range(2000):
        reserved.append(token, token)
    assert reserved.capacity == 3000


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "queries"),
    [(4, 4, 1), (8, 2, 1), (8, 2, 3), (6, 1, 1), (4, 2, 70)],
)
@pytest.mark.parametrize("window", [None, 5, (7, 0)])
def test_attend_matches_reference(rng, dtype, num_heads, num_kv_heads, queries, window):
    cache = attnscope.KVCache(num_kv_heads, 16, batch=2, dtype=dtype)
    parts = [fill(cache, rng, tokens, dtype) for tokens in (40, 1, 60)]
    keys = np.concatenate([k for k, _ in parts], axis=2)
    values = np.concatenate([v for _, v in parts], axis=2)
    q = rng.standard_normal((2, num_heads, queries, 16)).astype(dtype)
    out = cache.attend(q, window=window, enable_gqa=num_heads != num_kv_heads)
    expected = reference.scaled_dot_product_attention(
        q,
        keys,
        values,
        is_causal=True,
        enable_gqa=True,
        causal_alignment="bottom_right",
        window=window,
    )
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_long_cache_single_query_matches_reference(rng, num_kv_heads):
    # Long enough that the keys are split into chunks across threads and merged.
    cache = attnscope.KVCache(num_kv_heads, 32, dtype=np.float64)
    keys, values = fill(cache, rng, 5000, np.float64)
    q = rng.standard_normal((1, 4, 1, 32))
    out = cache.attend(q, scale=0.3, enable_gqa=True)
    expected = reference.scaled_dot_product_attention(
        q, keys, values, scale=0.3, is_causal=True, enable_gqa=True, causal_alignment="bottom_right"
    )
    assert_close(out, expected, np.float64)


def test_attend_results_do_not_depend_on_thread_count(rng, restore_num_threads):
    cache = attnscope.KVCache(2, 64)
    fill(cache, rng, 9000)
    q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    attnscope.set_num_threads(1)
    one = cache.attend(q, enable_gqa=True)
    attnscope.set_num_threads(3)
    np.testing.assert_array_equal(cache.attend(q, enable_gqa=True), one)


@pytest.mark.parametrize("num_kv_heads", [8, 2])
def test_a_decoding_step_has_the_same_bits_through_the_cache_and_sdpa(
    rng, simd_level, num_kv_heads
):
    """One kernel decodes: the cache, SDPA (bottom-right causal) and SDPA with weights give the
    same output to the bit, grouped heads or not, and the weights match the reference."""
    cache = attnscope.KVCache(num_kv_heads, 64)
    keys, values = fill(cache, rng, 2500)
    q = rng.standard_normal((1, 8, 1, 64)).astype(np.float32)
    cached = cache.attend(q, enable_gqa=True)
    options = dict(is_causal=True, causal_alignment="bottom_right", enable_gqa=True)
    direct = attnscope.scaled_dot_product_attention(q, keys, values, **options)
    with_weights, weights = attnscope.scaled_dot_product_attention(
        q, keys, values, return_weights=True, **options
    )
    np.testing.assert_array_equal(direct.view(np.uint32), cached.view(np.uint32))
    np.testing.assert_array_equal(with_weights.view(np.uint32), cached.view(np.uint32))
    want_out, want_weights = reference.scaled_dot_product_attention(
        q, keys, values, return_weights=True, **options
    )
    assert_close(cached, want_out, np.float32)
    assert_close(weights, want_weights, np.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_token_by_token_decode_equals_one_causal_forward(rng, dtype, num_kv_heads):
    layer = random_layer(32, 4, num_kv_heads=num_kv_heads, dtype=dtype)
    x = rng.standard_normal((2, 30, 32)).astype(dtype)
    full = layer(x, is_causal=True)
    cache = layer.new_cache(batch=2)
    steps = [layer(x[:, :12], cache=cache)]
    for token in range(12, 30):
        steps.append(layer(x[:, token : token + 1], cache=cache))
    decoded = np.concatenate(steps, axis=1)
    assert len(cache) == 30
    assert_close(decoded, full.astype(np.float64), dtype)
    assert_close(decoded, reference_layer(layer, x, is_causal=True)[0], dtype)


def test_decode_with_padding_and_weights(rng):
    layer = random_layer(16, 4, num_kv_heads=2, dtype=np.float64)
    x = rng.standard_normal((2, 9, 16))
    padding = np.zeros((2, 9), dtype=bool)
    padding[1, :3] = True  # the second sequence is left-padded
    cache = layer.new_cache(batch=2)
    layer(x[:, :6], cache=cache, key_padding_mask=padding[:, :6])
    for token in range(6, 9):
        out, weights = layer(
            x[:, token : token + 1],
            cache=cache,
            key_padding_mask=padding[:, : token + 1],
            need_weights=True,
        )
        expected, expected_weights = reference_layer(
            layer,
            x[:, token : token + 1],
            x[:, : token + 1],
            key_padding_mask=padding[:, : token + 1],
        )
        assert weights.shape == (2, 4, 1, token + 1)
        assert_close(out, expected, np.float64)
        assert_close(weights, expected_weights, np.float64)
    assert np.all(weights[1, :, :, :3] == 0)


def test_unbatched_decode(rng):
    layer = random_layer(16, 2)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    cache = layer.new_cache()
    steps = [layer(x[:3], cache=cache), layer(x[3:4], cache=cache), layer(x[4:], cache=cache)]
    assert_close(np.concatenate(steps), layer(x, is_causal=True).astype(np.float64), np.float32)


def snapshot(cache, rng):
    """What a cache holds, seen from outside: length, bytes and what attending to it gives."""
    q = rng.standard_normal((cache.batch, cache.num_kv_heads, 1, cache.head_dim))
    q = q.astype(cache.dtype)
    return len(cache), cache.nbytes, cache.capacity, cache.attend(q)


def assert_unchanged(cache, before, seed=7):
    after = snapshot(cache, np.random.default_rng(seed))
    assert after[:3] == before[:3]
    np.testing.assert_array_equal(after[3], before[3])


@pytest.mark.parametrize(
    ("k_shape", "v_shape", "dtype", "error", "match"),
    [
        ((1, 2, 3, 8), (1, 2, 3, 8), np.float32, ValueError, r"k: expected shape .*\(2, 2, n, 8\)"),
        ((2, 3, 3, 8), (2, 3, 3, 8), np.float32, ValueError, r"k: .*got \(2, 3, 3, 8\)"),
        ((2, 2, 3, 4), (2, 2, 3, 4), np.float32, ValueError, r"k: .*head_dim"),
        ((2, 2, 3, 8), (2, 2, 4, 8), np.float32, ValueError, r"v: holds 4 tokens but k holds 3"),
        ((2, 2, 3, 8), (2, 2, 3, 8), np.float64, TypeError, r"k has dtype float64"),
        ((2, 2, 3), (2, 2, 3), np.float32, ValueError, r"k must have 4 dims"),
    ],
)
def test_failed_append_leaves_the_cache_as_it_was(rng, k_shape, v_shape, dtype, error, match):
    cache = attnscope.KVCache(2, 8, batch=2, capacity=4)
    fill(cache, rng, 4)
    before = snapshot(cache, np.random.default_rng(7))
    with pytest.raises(error, match=match):
        cache.append(np.zeros(k_shape, dtype), np.zeros(v_shape, dtype))
    assert_unchanged(cache, before)


def test_append_rejects_non_arrays():
    cache = attnscope.KVCache(1, 2)
    with pytest.raises(TypeError, match="k must be a numpy.ndarray"):
        cache.append([[[[1.0, 2.0]]]], np.zeros((1, 1, 1, 2), np.float32))


@pytest.mark.parametrize(
    ("make_cache", "error", "match"),
    [
        (lambda: attnscope.KVCache(2, 8, batch=3), ValueError, r"cache: holds .*\(3, 2, 8\)"),
        (lambda: attnscope.KVCache(4, 8, batch=2), ValueError, r"cache: holds .*\(2, 4, 8\)"),
        (lambda: attnscope.KVCache(2, 4, batch=2), ValueError, r"cache: holds .*\(2, 2, 4\)"),
        (
            lambda: attnscope.KVCache(2, 8, batch=2, dtype=np.float64),
            TypeError,
            "cache holds float64",
        ),
    ],
)
def test_layer_rejects_a_cache_that_does_not_fit(rng, make_cache, error, match):
    layer = random_layer(32, 4, num_kv_heads=2)
    cache = make_cache()
    shape = (cache.batch, cache.num_kv_heads, 3, cache.head_dim)
    cache.append(np.ones(shape, cache.dtype), np.ones(shape, cache.dtype))
    before = snapshot(cache, np.random.default_rng(7))
    with pytest.raises(error, match=match):
        layer(rng.standard_normal((2, 1, 32)).astype(np.float32), cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"key_padding_mask": np.zeros((2, 2), bool)}, ValueError, r"key_padding_mask: .*\(2, 6\)"),
        ({"attn_mask": np.ones((1, 3), bool)}, ValueError, r"attn_mask: shape \(1, 3\)"),
        ({"need_weights": "yes"}, TypeError, "need_weights must be a bool"),
    ],
)
def test_failed_layer_call_leaves_the_cache_as_it_was(rng, kwargs, error, match):
    layer = random_layer(16, 2)
    cache = layer.new_cache(batch=2)
    layer(rng.standard_normal((2, 5, 16)).astype(np.float32), cache=cache)
    before = snapshot(cache, np.random.default_rng(7))
    with pytest.raises(error, match=match):
        layer(rng.standard_normal((2, 1, 16)).astype(np.float32), cache=cache, **kwargs)
    assert_unchanged(cache, before)


def test_weights_too_large_rolls_back_the_append(rng, restore_weights_limit):
    layer = random_layer(16, 2)
    cache = layer.new_cache()
    layer(rng.standard_normal((1, 5, 16)).astype(np.float32), cache=cache)
    before = snapshot(cache, np.random.default_rng(7))
    attnscope.set_weights_memory_limit(16)
    with pytest.raises(ValueError, match="return_weights"):
        layer(rng.standard_normal((1, 2, 16)).astype(np.float32), cache=cache, need_weights=True)
    assert_unchanged(cache, before)


def test_cache_is_for_self_attention_only(rng):
    layer = random_layer(16, 2)
    cache = layer.new_cache()
    x = rng.standard_normal((1, 2, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="cache= runs self-attention"):
        layer(x, x.copy(), cache=cache)
    with pytest.raises(TypeError, match="cache must be an attnscope.KVCache"):
        layer(x, cache={})
    assert len(cache) == 0


def test_attend_errors(rng):
    cache = attnscope.KVCache(2, 8)
    fill(cache, rng, 3)
    with pytest.raises(ValueError, match=r"q: has 4 queries but the cache holds only 3"):
        cache.attend(np.zeros((1, 2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"q: expected shape .*got \(1, 2, 1, 5\)"):
        cache.attend(np.zeros((1, 2, 1, 5), np.float32))
    with pytest.raises(ValueError, match="enable_gqa"):
        cache.attend(np.zeros((1, 4, 1, 8), np.float32))
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        cache.attend(np.zeros((1, 3, 1, 8), np.float32), enable_gqa=True)
    with pytest.raises(TypeError, match="q has dtype float64"):
        cache.attend(np.zeros((1, 2, 1, 8)))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 8), {}, ValueError, "num_kv_heads must be >= 1"),
        ((2, 0), {}, ValueError, "head_dim must be >= 1"),
        ((2, 8), {"batch": 0}, ValueError, "batch must be >= 1"),
        ((2.0, 8), {}, TypeError, "num_kv_heads must be an int"),
        ((2, 8), {"dtype": np.int32}, TypeError, "dtype must be numpy.float32"),
        ((2, 8), {"capacity": -1}, ValueError, "capacity must be >= 0"),
        # Rows past what memory could hold, and a row count (heads x capacity) past the
        # address space: both must be refused, not wrap around to an empty buffer.
        ((32, 128), {"capacity": 2**40}, ValueError, "capacity"),
        ((32, 128), {"capacity": 2**60}, ValueError, "capacity: .* too many to hold"),
        ((32, 128), {"capacity": 2**60, "storage": "int8"}, ValueError, "too many to hold"),
    ],
)
def test_constructor_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attnscope.KVCache(*args, **kwargs)


def test_a_cache_used_from_two_threads_at_once_says_so(rng):
    """While one thread's call holds the cache, another thread's call on it raises an error
    that says what happened (not PyO3's bare "Already borrowed")."""
    cache = attnscope.KVCache(4, 64, batch=2)
    tokens = 4096
    keys = rng.standard_normal((2, 4, tokens, 64)).astype(np.float32)
    cache.append(keys, keys)
    query = rng.standard_normal((2, 4, 256, 64)).astype(np.float32)
    errors = []
    done = threading.Event()

    def attend_for_a_while():
        try:
            for _ in range(20):
                cache.attend(query)
        finally:
            done.set()

    worker = threading.Thread(target=attend_for_a_while)
    worker.start()
    while not done.is_set():
        try:
            cache.append(keys[:, :, :1], keys[:, :, :1])
        except RuntimeError as error:
            errors.append(str(error))
    worker.join()
    assert errors, "the two threads never overlapped"
    assert all("KVCache is in use by a call in another thread" in e for e in errors), errors[:1]
