"""Randomized differential tests: the engine against `attnscope.reference` on hundreds of
seeded random calls that mix every option with every memory layout and with empty dimensions.

Each case draws shapes (including zero-length batch, head, query, key and width dims), a dtype,
a layout for every array (C order, Fortran order, transposed, reversed, strided, broadcast,
read-only, big-endian) and an option mix (bool or float masks of any broadcastable shape,
causal in both alignments, windows, grouped heads, weights, scale). The same arrays go to the
reference, so a layout that changes values (a broadcast) is compared like for like. Every case
also checks that the inputs were not modified and that no Python-level exception other than
the documented ones escapes. The seeds are fixed: a failure names its case and reproduces.
"""

from __future__ import annotations

import subprocess
import sys

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import assert_close
from test_mha import reference_layer

sdpa = attnscope.scaled_dot_product_attention

LAYOUTS = (
    "c",
    "fortran",
    "transposed",
    "reversed",
    "strided",
    "broadcast",
    "readonly",
    "bigendian",
)
CASES_PER_CHUNK = 100


def laid_out(array: np.ndarray, layout: str) -> np.ndarray:
    """`array`'s values (or, for "broadcast", its first entry along axis 0 repeated) seen
    through `layout`; a bool array stays in native byte order."""
    if array.ndim == 0:
        return array.copy()
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "transposed" and array.ndim >= 2:
        return np.ascontiguousarray(np.swapaxes(array, -1, -2)).swapaxes(-1, -2)
    if layout == "reversed":
        return np.flip(np.ascontiguousarray(np.flip(array)))
    if layout == "strided":
        wide = np.zeros((*array.shape[:-1], 2 * array.shape[-1]), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    if layout == "broadcast" and array.shape[0] > 0:
        return np.broadcast_to(array[:1], array.shape)
    if layout == "readonly":
        frozen = array.copy()
        frozen.flags.writeable = False
        return frozen
    if layout == "bigendian" and array.dtype != np.bool_:
        return array.astype(array.dtype.newbyteorder(">"))
    return np.ascontiguousarray(array)


def random_layout(rng: np.random.Generator) -> str:
    return LAYOUTS[rng.integers(len(LAYOUTS))]


def random_dim(rng: np.random.Generator, largest: int, empty_chance: float = 0.08) -> int:
    """Mostly 1..largest, sometimes 0."""
    return 0 if rng.random() < empty_chance else int(rng.integers(1, largest + 1))


def random_mask(rng, target_shape, dtype):
    """A bool or float mask of a random shape that broadcasts to `target_shape`, or None."""
    kind = rng.choice(["none", "bool", "float"], p=[0.4, 0.3, 0.3])
    if kind == "none":
        return None
    rank = int(rng.integers(1, len(target_shape) + 1))
    shape = tuple(d if rng.random() < 0.6 else 1 for d in target_shape[len(target_shape) - rank :])
    if kind == "bool":
        mask = rng.random(shape) < 0.7
    else:
        mask = rng.standard_normal(shape).astype(dtype)
        mask[rng.random(shape) < 0.25] = -np.inf
    return laid_out(mask, random_layout(rng))


def random_window(rng):
    choice = rng.integers(4)
    if choice == 0:
        return None
    if choice == 1:
        return int(rng.integers(1, 12))
    sides = [None if rng.random() < 0.3 else int(rng.integers(0, 10)) for _ in range(2)]
    return tuple(sides)


def copies(arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(arrays, before):
    for array, copy in zip(arrays, before, strict=True):
        if array is not None:
            np.testing.assert_array_equal(array, copy)


def sdpa_case(seed: int):
    """One random SDPA call: (args, kwargs) for both the engine and the reference."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if rng.random() < 0.6 else np.float64
    lead = tuple(random_dim(rng, 3, 0.05) for _ in range(rng.integers(0, 3)))
    kv_heads = random_dim(rng, 3, 0.03)
    group = int(rng.integers(1, 4)) if kv_heads else 1
    gqa = group > 1
    query_heads = kv_heads * group
    # One query (decoding) takes its own paths: grouped heads, split keys.
    num_queries = 1 if rng.random() < 0.25 else random_dim(rng, 70)
    num_keys = random_dim(rng, 300)
    depth, value_dim = random_dim(rng, 20, 0.05), random_dim(rng, 20, 0.05)
    two_d = rng.random() < 0.1
    if two_d:
        q_shape, k_shape = (num_queries, depth), (num_keys, depth)
        v_shape = (num_keys, value_dim)
        target = (num_queries, num_keys)
        gqa = False
    else:
        q_shape = (*lead, query_heads, num_queries, depth)
        k_shape = (*lead, kv_heads, num_keys, depth)
        v_shape = (*lead, kv_heads, num_keys, value_dim)
        target = (*lead, query_heads, num_queries, num_keys)
    q, k, v = (
        laid_out(rng.standard_normal(shape).astype(dtype), random_layout(rng))
        for shape in (q_shape, k_shape, v_shape)
    )
    kwargs = dict(
        attn_mask=random_mask(rng, target, dtype),
        is_causal=bool(rng.random() < 0.5),
        causal_alignment=str(rng.choice(["top_left", "bottom_right"])),
        window=random_window(rng),
        enable_gqa=gqa or bool(rng.random() < 0.2),
        return_weights=bool(rng.random() < 0.4),
        scale=None if rng.random() < 0.7 else float(rng.uniform(0.05, 2.0)),
    )
    return dtype, (q, k, v), kwargs


@pytest.mark.parametrize("chunk", range(12))
def test_sdpa_matches_the_reference(chunk):
    for seed in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
        dtype, arrays, kwargs = sdpa_case(seed)
        watched = [*arrays, kwargs["attn_mask"]]
        before = copies(watched)
        got = sdpa(*arrays, **kwargs)
        expected = reference.scaled_dot_product_attention(*arrays, **kwargs)
        if not kwargs["return_weights"]:
            got, expected = (got,), (expected,)
        try:
            assert isinstance(got, tuple) and len(got) == len(expected)
            for actual, wanted in zip(got, expected, strict=True):
                assert_close(actual, wanted, dtype)
        except AssertionError as error:
            shapes = [(a.shape, a.strides, a.dtype.str) for a in arrays]
            raise AssertionError(f"seed {seed}: {shapes} {kwargs}") from error
        assert_unchanged(watched, before)


def test_the_reported_cases():
    """The calls that once panicked: a grouped decode with an empty batch and a window."""
    q = np.zeros((0, 4, 1, 8), np.float32)
    k = np.zeros((0, 2, 300, 8), np.float32)
    options = dict(enable_gqa=True, is_causal=True, window=5, causal_alignment="bottom_right")
    assert sdpa(q, k, k, **options).shape == (0, 4, 1, 8)
    out, weights = sdpa(q, k, k, return_weights=True, **options)
    assert out.shape == (0, 4, 1, 8) and weights.shape == (0, 4, 1, 300)


def test_empty_work_with_huge_leading_dims_returns_at_once():
    """Work follows the data: 2**40 empty heads or cache rows are no work at all. Run in a
    subprocess so that a regression fails on the timeout instead of hanging the suite."""
    script = """
import numpy as np, attnscope as ats
q = np.zeros((2**40, 1, 1, 0), np.float32)
assert ats.scaled_dot_product_attention(q, q, q).shape == (2**40, 1, 1, 0)
out, weights = ats.scaled_dot_product_attention(q, q[:, :, :0], q[:, :, :0], return_weights=True)
assert out.shape == (2**40, 1, 1, 0) and weights.shape == (2**40, 1, 1, 0)
cache = ats.KVCache(2**40, 1)
empty = np.zeros((1, 2**40, 0, 1), np.float32)
cache.append(empty, empty)
assert len(cache) == 0
assert cache.attend(np.zeros((1, 2**40, 0, 1), np.float32)).shape == (1, 2**40, 0, 1)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def mha_case(seed: int):
    rng = np.random.default_rng(10_000 + seed)
    dtype = np.float32 if rng.random() < 0.6 else np.float64
    kv_heads = int(rng.integers(1, 3))
    heads = kv_heads * int(rng.integers(1, 3))
    head_dim = int(rng.integers(1, 5))
    embed = heads * head_dim
    layer = attnscope.MultiHeadAttention(
        embed, heads, num_kv_heads=kv_heads, seed=seed, dtype=dtype, bias=bool(rng.random() < 0.7)
    )
    if layer.b_q is not None:
        for name in ("b_q", "b_k", "b_v", "b_o"):
            setattr(layer, name, rng.standard_normal(getattr(layer, name).shape).astype(dtype))
    batch, length = random_dim(rng, 3, 0.05), random_dim(rng, 9, 0.05)
    x = laid_out(rng.standard_normal((batch, length, embed)).astype(dtype), random_layout(rng))
    return rng, dtype, layer, x


def random_padding(rng, batch, keys):
    if rng.random() < 0.4:
        return None
    return laid_out(rng.random((batch, keys)) < 0.3, random_layout(rng))


@pytest.mark.parametrize("chunk", range(4))
def test_multi_head_attention_matches_the_reference(chunk):
    for seed in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
        rng, dtype, layer, x = mha_case(seed)
        batch, length, _ = x.shape
        padding = random_padding(rng, batch, length)
        mask = random_mask(rng, (batch, layer.num_heads, length, length), dtype)
        is_causal = bool(rng.random() < 0.5)
        before = copies([x, padding, mask])
        out, weights = layer(
            x, attn_mask=mask, key_padding_mask=padding, is_causal=is_causal, need_weights=True
        )
        expected, expected_weights = reference_layer(
            layer,
            np.asarray(x),
            attn_mask=None if mask is None else np.asarray(mask),
            key_padding_mask=None if padding is None else np.asarray(padding),
            is_causal=is_causal,
        )
        try:
            assert_close(out, expected, dtype, relative=1e-4 if dtype == np.float32 else None)
            assert_close(weights, expected_weights, dtype)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}: {x.shape}, causal {is_causal}") from error
        assert_unchanged([x, padding, mask], before)


@pytest.mark.parametrize("chunk", range(2))
def test_multi_head_attention_with_a_cache_matches_the_reference(chunk):
    """Prefill then decode through `cache=`, with padding of any layout, equals one
    bottom-right causal call over the whole sequence."""
    for seed in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
        rng, dtype, layer, x = mha_case(50_000 + seed)
        batch, length, _ = x.shape
        if batch == 0:
            continue
        cache = layer.new_cache(batch=batch)
        padding = rng.random((batch, length)) < 0.25
        prefill = int(rng.integers(0, length + 1))
        steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
        for start, end in steps:
            step_padding = laid_out(padding[:, :end], random_layout(rng))
            out = layer(x[:, start:end], key_padding_mask=step_padding, cache=cache)
            expected, _ = reference_layer(
                layer,
                np.asarray(x[:, start:end]),
                np.asarray(x[:, :end]),
                key_padding_mask=np.asarray(step_padding),
                is_causal=True,
                causal_alignment="bottom_right",
            )
            try:
                assert_close(out, expected, dtype, relative=1e-4 if dtype == np.float32 else None)
            except AssertionError as error:
                raise AssertionError(f"seed {seed}: tokens {start}..{end}") from error
        assert len(cache) == length


@pytest.mark.parametrize("chunk", range(4))
def test_kv_cache_matches_the_reference(chunk):
    for seed in range(chunk * CASES_PER_CHUNK, (chunk + 1) * CASES_PER_CHUNK):
        rng = np.random.default_rng(90_000 + seed)
        dtype = np.float32 if rng.random() < 0.6 else np.float64
        batch, kv_heads = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        head_dim = int(rng.integers(1, 13))
        group = int(rng.integers(1, 4))
        cache = attnscope.KVCache(
            kv_heads,
            head_dim,
            batch=batch,
            dtype=dtype,
            capacity=None if rng.random() < 0.5 else int(rng.integers(0, 20)),
        )
        keys, values = [], []
        for _ in range(rng.integers(1, 5)):
            tokens = random_dim(rng, 90, 0.2)
            shape = (batch, kv_heads, tokens, head_dim)
            k = laid_out(rng.standard_normal(shape).astype(dtype), random_layout(rng))
            v = laid_out(rng.standard_normal(shape).astype(dtype), random_layout(rng))
            cache.append(k, v)
            keys.append(np.asarray(k))
            values.append(np.asarray(v))
        all_keys, all_values = np.concatenate(keys, axis=2), np.concatenate(values, axis=2)
        held = all_keys.shape[2]
        assert len(cache) == held
        queries = int(rng.integers(0, min(held, 6) + 1))
        q = rng.standard_normal((batch, kv_heads * group, queries, head_dim)).astype(dtype)
        q = laid_out(q, random_layout(rng))
        window = random_window(rng)
        scale = None if rng.random() < 0.7 else float(rng.uniform(0.1, 2.0))
        got = cache.attend(q, window=window, scale=scale, enable_gqa=group > 1)
        expected = reference.scaled_dot_product_attention(
            q,
            all_keys,
            all_values,
            is_causal=True,
            causal_alignment="bottom_right",
            window=window,
            scale=scale,
            enable_gqa=group > 1,
        )
        try:
            assert_close(got, expected, dtype)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}: q {q.shape}, window {window}") from error
