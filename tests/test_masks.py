"""Mask expressions: each pattern against its plain NumPy definition, the algebra, tile layouts,
and attention under an expression against the same call with its dense mask, the float64
reference and (when installed) PyTorch."""

from __future__ import annotations

import attnscope as ats
import numpy as np
import pytest
from attnscope import masks as M
from attnscope import reference

L, S = 37, 41
ROWS = np.arange(L)[:, None]
COLS = np.arange(S)[None, :]
IDS_Q = np.repeat(np.arange(5), 8)[:L]
IDS_K = np.repeat(np.arange(5), 9)[:S]


def plain_cases():
    """(mask, the same pattern written with NumPy on the (L, S) grid)."""
    diagonal_br = ROWS + (S - L)
    global_positions = [0, 3, 20, 40]
    is_global = lambda x: np.isin(x, global_positions)  # noqa: E731
    return [
        (M.causal(), COLS <= ROWS),
        (M.causal("bottom_right"), COLS <= diagonal_br),
        (M.window(3), (COLS >= ROWS - 3) & (COLS <= ROWS + 3)),
        (M.window(4, 0), (COLS >= ROWS - 4) & (COLS <= ROWS)),
        (M.window(None, 2), COLS <= ROWS + 2),
        (M.window(2, None, alignment="bottom_right"), COLS >= diagonal_br - 2),
        (M.prefix_lm(6), (COLS < 6) | (COLS <= ROWS)),
        (M.document(IDS_Q, kv_ids=IDS_K), IDS_Q[:, None] == IDS_K[None, :]),
        (M.global_tokens(global_positions), is_global(ROWS) | is_global(COLS)),
        (M.sinks(4), np.broadcast_to(COLS < 4, (L, S))),
        (M.strided(5), (ROWS - COLS) % 5 == 0),
        (M.fixed(8), (ROWS // 8 == COLS // 8) | (COLS % 8 >= 7)),
        (M.fixed(8, summary=3), (ROWS // 8 == COLS // 8) | (COLS % 8 >= 5)),
        (M.dilated(6, 2), (np.abs(ROWS - COLS) <= 6) & (np.abs(ROWS - COLS) % 2 == 0)),
    ]


@pytest.mark.parametrize("index", range(len(plain_cases())))
def test_each_pattern_matches_its_numpy_definition(index):
    mask, expected = plain_cases()[index]
    dense = mask.to_dense(L, S)
    assert dense.dtype == np.bool_ and dense.shape == (L, S)
    np.testing.assert_array_equal(dense, expected)


def test_document_without_kv_ids_and_from_array():
    ids = np.array([0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(M.document(ids).to_dense(6, 6), ids[:, None] == ids[None, :])
    array = np.random.default_rng(0).random((5, 7)) < 0.4
    np.testing.assert_array_equal(M.from_array(array).to_dense(5, 7), array)


def test_random_blocks_pick_per_row_distinct_key_blocks_from_the_seed():
    mask = M.random_blocks(8, 2, seed=7)
    dense = mask.to_dense(40, 64)
    blocks = dense.reshape(5, 8, 8, 8).transpose(0, 2, 1, 3)  # (row block, key block, 8, 8)
    seen = blocks.any(axis=(2, 3))
    np.testing.assert_array_equal(seen, blocks.all(axis=(2, 3)))  # whole blocks only
    assert (seen.sum(axis=1) == 2).all()
    np.testing.assert_array_equal(dense, M.random_blocks(8, 2, seed=7).to_dense(40, 64))
    assert not np.array_equal(dense, M.random_blocks(8, 2, seed=8).to_dense(40, 64))
    assert M.random_blocks(8, 99).to_dense(16, 24).all()  # more blocks asked than exist


def test_algebra_and_or_not():
    a, b = M.causal(), M.window(5) | M.sinks(2)
    da, db = a.to_dense(L, S), b.to_dense(L, S)
    np.testing.assert_array_equal((a & b).to_dense(L, S), da & db)
    np.testing.assert_array_equal((a | b).to_dense(L, S), da | db)
    np.testing.assert_array_equal((~a).to_dense(L, S), ~da)
    np.testing.assert_array_equal((~(a & ~b)).to_dense(L, S), ~(da & ~db))


def test_repr_equality_hash_and_immutability():
    mask = M.causal() & (M.window(512, 0) | M.global_tokens([0, 1]))
    assert repr(mask) == "(causal() & (window(512, 0) | global_tokens([0, 1])))"
    same = M.causal() & (M.window(512, 0) | M.global_tokens([1, 0, 1]))
    assert mask == same and hash(mask) == hash(same)
    assert mask != M.causal() & M.window(512, 0)
    assert M.document([0, 1]) == M.document(np.array([0, 1]))
    assert M.document([0, 1]) != M.document([0, 2])
    assert M.window(3) == M.window(3, 3) and M.window(3) != M.window(3, None)
    with pytest.raises(AttributeError):
        mask._spec = None
    with pytest.raises(TypeError, match="truth value"):
        bool(mask)
    ids = np.array([0, 0, 1])
    doc = M.document(ids)
    ids[0] = 5  # the mask keeps its own copy
    np.testing.assert_array_equal(doc.to_dense(3, 3)[0], [True, True, False])


@pytest.mark.parametrize("block", [1, 7, 8, 64])
def test_layout_matches_dense_at_every_tile_edge(block):
    cases = [mask for mask, _ in plain_cases()] + [
        M.random_blocks(8, 2, seed=1),
        M.causal() & (M.window(5, 0) | M.global_tokens([0, 9])),
    ]
    for mask in cases:
        dense = mask.to_dense(L, S)
        layout = mask.layout(L, S, block=block)
        assert layout.states.shape == (-(-L // block), -(-S // block))
        assert layout.visible_pairs == dense.sum()
        assert layout.visible_fraction == pytest.approx(dense.mean())
        for r in range(layout.states.shape[0]):
            for c in range(layout.states.shape[1]):
                tile = dense[r * block : (r + 1) * block, c * block : (c + 1) * block]
                expected = M.FULL if tile.all() else M.EMPTY if not tile.any() else M.PARTIAL
                assert layout.states[r, c] == expected, (mask, r, c)
        assert sum(layout.counts().values()) == layout.states.size


def random_mask(rng: np.random.Generator, depth: int, num_queries: int, num_keys: int):
    """A seeded random composition of patterns, `depth` levels deep at most."""
    leaves = [
        lambda: M.causal(rng.choice(["top_left", "bottom_right"])),
        lambda: M.window(int(rng.integers(0, 40)), int(rng.integers(0, 40))),
        lambda: M.window(int(rng.integers(0, 40)), None),
        lambda: M.sinks(int(rng.integers(0, 10))),
        lambda: M.global_tokens(rng.integers(0, min(num_queries, num_keys), 3)),
        lambda: M.strided(int(rng.integers(1, 9))),
        lambda: M.fixed(int(rng.integers(1, 70)), int(rng.integers(0, 2))),
        lambda: M.dilated(int(rng.integers(0, 90)), int(rng.integers(1, 4))),
        lambda: M.random_blocks(int(rng.integers(16, 80)), int(rng.integers(0, 3)), 5),
        lambda: M.prefix_lm(int(rng.integers(0, 50))),
        lambda: M.document(
            np.sort(rng.integers(0, 4, num_queries)), kv_ids=np.sort(rng.integers(0, 4, num_keys))
        ),
    ]
    if depth == 0 or rng.random() < 0.3:
        return leaves[int(rng.integers(len(leaves)))]()
    kind = rng.integers(3)
    if kind == 2:
        return ~random_mask(rng, depth - 1, num_queries, num_keys)
    a = random_mask(rng, depth - 1, num_queries, num_keys)
    b = random_mask(rng, depth - 1, num_queries, num_keys)
    return a & b if kind == 0 else a | b


def tolerance(dtype):
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}


@pytest.mark.parametrize("seed", range(24))
def test_random_compositions_match_dense_mask_and_reference(seed):
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    num_queries, num_keys = int(rng.integers(1, 300)), int(rng.integers(1, 600))
    if seed % 3 == 0:
        num_queries = num_keys  # document(ids) and the common square case
    mask = random_mask(rng, 3, num_queries, num_keys)
    q = rng.standard_normal((2, 4, num_queries, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, num_keys, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, num_keys, 8)).astype(dtype)
    options = {
        "enable_gqa": True,
        "is_causal": bool(seed % 4 == 1),
        "window": (None, 30, (50, None))[seed % 3],
        "causal_alignment": ("top_left", "bottom_right")[seed % 5 == 0],
        "return_weights": bool(seed % 2),
    }
    got = ats.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
    dense = mask.to_dense(num_queries, num_keys)
    with_dense = ats.scaled_dot_product_attention(q, k, v, attn_mask=dense, **options)
    expected = reference.scaled_dot_product_attention(q, k, v, attn_mask=dense, **options)
    if not options["return_weights"]:
        got, with_dense, expected = (got,), (with_dense,), (expected,)
    for mine, theirs, spec in zip(got, with_dense, expected, strict=True):
        assert mine.dtype == dtype
        np.testing.assert_allclose(mine, theirs, **tolerance(dtype), err_msg=repr(mask))
        np.testing.assert_allclose(mine, spec, **tolerance(dtype), err_msg=repr(mask))


def test_expression_over_2d_and_batched_inputs():
    rng = np.random.default_rng(3)
    mask = M.causal() & (M.window(7, 0) | M.sinks(2))
    for shape in [(50, 8), (3, 50, 8), (2, 3, 2, 50, 8)]:
        q = rng.standard_normal(shape).astype(np.float32)
        got = ats.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        expected = reference.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


def test_bitwise_identical_for_every_thread_count():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 700, 32)).astype(np.float32)
    k = rng.standard_normal((1, 4, 900, 32)).astype(np.float32)
    mask = M.causal("bottom_right") & (M.window(100, 0) | M.global_tokens([0, 1, 500]))
    decode_q = q[:, :, :3]
    results = {}
    for threads in (1, 2, 3):
        with ats.threads(threads):
            results[threads] = (
                ats.scaled_dot_product_attention(q, k, k, attn_mask=mask),
                ats.scaled_dot_product_attention(q, k, k, attn_mask=mask, return_weights=True)[1],
                ats.scaled_dot_product_attention(decode_q, k, k, attn_mask=mask),
            )
    for threads in (2, 3):
        for mine, first in zip(results[threads], results[1], strict=True):
            np.testing.assert_array_equal(mine, first)


def test_masked_nan_values_do_not_leak():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((60, 8)).astype(np.float32)
    v = rng.standard_normal((60, 8)).astype(np.float32)
    v[40] = np.nan
    mask = M.causal() & M.window(10, 0)
    got = ats.scaled_dot_product_attention(q, q, v, attn_mask=mask)
    expected = reference.scaled_dot_product_attention(q, q, v, attn_mask=mask)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    assert np.isfinite(got[:40]).all() and np.isnan(got[40:51]).all()
    assert np.isfinite(got[51:]).all()


def test_layer_accepts_an_expression():
    rng = np.random.default_rng(2)
    layer = ats.MultiHeadAttention(32, 4, seed=0)
    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    mask = M.causal() & M.window(6, 0)
    got = layer(x, attn_mask=mask)
    np.testing.assert_allclose(got, layer(x, attn_mask=mask.to_dense(40, 40)), rtol=1e-5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(x, attn_mask=mask, key_padding_mask=np.zeros((2, 40), dtype=bool))


def test_torch_sdpa_with_the_dense_mask():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional peer")
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 4, 200, 32)).astype(np.float32)
    k = rng.standard_normal((1, 4, 260, 32)).astype(np.float32)
    v = rng.standard_normal((1, 4, 260, 32)).astype(np.float32)
    for mask in [
        M.causal("bottom_right") & (M.window(31, 0) | M.global_tokens(range(4))),
        M.sinks(4) | M.window(20),
        M.random_blocks(32, 2, 1) | M.window(32),
        M.document(np.repeat(np.arange(4), 50), kv_ids=np.repeat(np.arange(4), 65)) & M.causal(),
    ]:
        dense = mask.to_dense(200, 260)
        got = ats.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        t = [torch.from_numpy(x) for x in (q, k, v)]
        theirs = torch.nn.functional.scaled_dot_product_attention(
            *t, attn_mask=torch.from_numpy(dense)
        ).numpy()
        visible_rows = dense.any(axis=1)  # torch gives NaN to rows with no visible key
        np.testing.assert_allclose(
            got[..., visible_rows, :], theirs[..., visible_rows, :], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: M.window(-1), ValueError, "window left"),
        (lambda: M.window(3, -2), ValueError, "window right"),
        (lambda: M.window(2.5), TypeError, "window left"),
        (lambda: M.window(True), TypeError, "window left"),
        (lambda: M.causal("diagonal"), ValueError, "alignment"),
        (lambda: M.window(1, alignment="bottom"), ValueError, "alignment"),
        (lambda: M.prefix_lm(-1), ValueError, "prefix_len"),
        (lambda: M.sinks(-3), ValueError, "n must"),
        (lambda: M.sinks("4"), TypeError, "n must"),
        (lambda: M.strided(0), ValueError, "stride"),
        (lambda: M.fixed(0), ValueError, "block"),
        (lambda: M.fixed(4, summary=5), ValueError, "summary"),
        (lambda: M.dilated(-1, 2), ValueError, "window"),
        (lambda: M.dilated(4, 0), ValueError, "dilation"),
        (lambda: M.random_blocks(0, 1), ValueError, "block"),
        (lambda: M.random_blocks(8, -1), ValueError, "per_row"),
        (lambda: M.random_blocks(8, 1, seed=-1), ValueError, "seed"),
        (lambda: M.random_blocks(8, 1, seed=2**64), ValueError, "seed"),
        (lambda: M.global_tokens([-1]), ValueError, "positions"),
        (lambda: M.global_tokens([0.5]), TypeError, "positions"),
        (lambda: M.global_tokens([[0]]), ValueError, "positions"),
        (lambda: M.document([[0, 1]]), ValueError, "ids"),
        (lambda: M.document(["a"]), TypeError, "ids"),
        (lambda: M.document([0], kv_ids=[True]), TypeError, "kv_ids"),
        (lambda: M.from_array([[True]]), TypeError, "numpy"),
        (lambda: M.from_array(np.zeros((2, 2))), TypeError, "bool"),
        (lambda: M.from_array(np.zeros(3, dtype=bool)), ValueError, "2-D"),
        (lambda: M.causal() & np.ones((2, 2), dtype=bool), TypeError, "unsupported|not supported"),
        (lambda: M.causal() | 1, TypeError, "unsupported"),
        (lambda: M.causal().to_dense(-1, 3), ValueError, "num_queries"),
        (lambda: M.causal().to_dense(3, 2.0), TypeError, "num_keys"),
        (lambda: M.causal().layout(3, 3, block=0), ValueError, "block"),
    ],
)
def test_bad_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_sizes_that_do_not_fit_are_refused_at_call_time():
    q = np.zeros((1, 2, 6, 4), dtype=np.float32)
    k = np.zeros((1, 2, 8, 4), dtype=np.float32)
    sdpa = ats.scaled_dot_product_attention
    with pytest.raises(ValueError, match="attn_mask.*6 queries"):
        sdpa(q, k, k, attn_mask=M.document([0] * 5, kv_ids=[0] * 8))
    with pytest.raises(ValueError, match="attn_mask.*kv_ids.*8 keys"):
        sdpa(q, k, k, attn_mask=M.document([0] * 6, kv_ids=[0] * 7))
    with pytest.raises(ValueError, match="attn_mask.*queries"):
        sdpa(q, k, k, attn_mask=M.document([0] * 8))  # one id list, but L != S
    with pytest.raises(ValueError, match="attn_mask.*from_array.*\\(6, 8\\)"):
        sdpa(q, k, k, attn_mask=M.from_array(np.ones((6, 7), dtype=bool)))
    with pytest.raises(ValueError, match="attn_mask.*position 9"):
        sdpa(q, k, k, attn_mask=M.global_tokens([9]))
    with pytest.raises(ValueError, match="ids"):
        M.document([0, 1]).to_dense(3, 3)
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, k, attn_mask=("causal", False, "extra"))
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, k, attn_mask=("sinks", -1))


def test_cache_attend_takes_an_expression():
    rng = np.random.default_rng(8)
    cache = ats.KVCache(2, 16)
    k = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    v = rng.standard_normal((1, 2, 300, 16)).astype(np.float32)
    cache.append(k, v)
    q = rng.standard_normal((1, 2, 5, 16)).astype(np.float32)
    streaming = M.sinks(4) | M.window(63, 0, alignment="bottom_right")
    got = cache.attend(q, attn_mask=streaming)
    expected = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=streaming, is_causal=True, causal_alignment="bottom_right"
    )
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    with pytest.raises(TypeError, match="attn_mask"):
        cache.attend(q, attn_mask=streaming.to_dense(5, 300))


def deep_chain(depth: int):
    """A left-deep chain `depth` levels deep mixing ~, & and |, with the same chain evaluated
    by NumPy on the (L, S) grid from the patterns' definitions."""
    patterns = [
        (M.window(5), np.abs(ROWS - COLS) <= 5),
        (M.sinks(1), np.broadcast_to(COLS < 1, (L, S))),
        (M.strided(3), (ROWS - COLS) % 3 == 0),
    ]
    mask, dense = M.causal(), COLS <= ROWS
    for level in range(depth - 1):
        pattern, pattern_dense = patterns[level % len(patterns)]
        step = level % 3
        if step == 0:
            mask, dense = ~mask, ~dense
        elif step == 1:
            mask, dense = mask & pattern, dense & pattern_dense
        else:
            mask, dense = mask | pattern, dense | pattern_dense
    return mask, dense


def test_expression_at_the_depth_limit_matches_numpy_and_the_reference():
    mask, expected = deep_chain(M.MAX_DEPTH)
    np.testing.assert_array_equal(mask.to_dense(L, S), expected)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 2, L, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, S, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, S, 8)).astype(np.float32)
    got = ats.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=expected)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert mask.layout(L, S, block=8).visible_pairs == expected.sum()


def test_one_level_past_the_depth_limit_is_refused_when_built():
    mask, _ = deep_chain(M.MAX_DEPTH)
    for build in (lambda: ~mask, lambda: mask & M.causal(), lambda: M.sinks(2) | mask):
        with pytest.raises(ValueError, match=f"{M.MAX_DEPTH + 1} levels.*MAX_DEPTH = 1024"):
            build()


def test_a_long_chain_is_refused_at_the_limit_not_built_to_the_end():
    mask, built = M.causal(), 1
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        for _ in range(20_000):
            mask = mask | M.sinks(1)
            built += 1
    assert built == M.MAX_DEPTH
    assert repr(mask).count("sinks(1)") == M.MAX_DEPTH - 1


def test_a_self_doubling_expression_is_refused_by_its_size():
    mask = M.causal()
    with pytest.raises(ValueError, match="MAX_NODES"):
        for _ in range(40):
            mask = mask & mask
    assert 2 * mask._nodes + 1 > M.MAX_NODES
    np.testing.assert_array_equal(mask.to_dense(5, 5), np.tri(5, dtype=bool))


def test_deep_equality_hash_and_repr_need_no_recursion():
    first, _ = deep_chain(M.MAX_DEPTH - 1)
    second, _ = deep_chain(M.MAX_DEPTH - 1)
    assert first is not second and first == second and hash(first) == hash(second)
    other = ~second
    assert other != first and ~first == other
    nots = M.causal()
    for _ in range(M.MAX_DEPTH - 1):
        nots = ~nots
    assert repr(nots) == "~" * (M.MAX_DEPTH - 1) + "causal()"
    last_leaf_differs = M.causal("bottom_right")
    for _ in range(M.MAX_DEPTH - 1):
        last_leaf_differs = ~last_leaf_differs
    assert nots != last_leaf_differs


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: M.sinks(2**64), "n must be <= 2\\*\\*63 - 1"),
        (lambda: M.prefix_lm(2**63), "prefix_len"),
        (lambda: M.strided(2**64), "stride"),
        (lambda: M.fixed(2**64), "block"),
        (lambda: M.dilated(2**64, 1), "window"),
        (lambda: M.dilated(3, 2**70), "dilation"),
        (lambda: M.random_blocks(2**63, 1), "block"),
        (lambda: M.random_blocks(8, 2**64), "per_row"),
        (lambda: M.window(2**64), "window left"),
        (lambda: M.window(1, 2**63), "window right"),
        (lambda: M.global_tokens([2**63]), "positions"),
        (lambda: M.global_tokens(np.array([2**63], dtype=np.uint64)), "positions"),
        (lambda: M.global_tokens([0, 2**64]), "positions"),
        (lambda: M.document([-1, 2**63]), "ids"),
        (lambda: M.document([0], kv_ids=np.array([2**64 - 1], dtype=np.uint64)), "kv_ids"),
        (lambda: M.causal().to_dense(2**64, 1), "num_queries"),
        (lambda: M.causal().layout(3, 3, block=2**64), "block"),
        (lambda: M.causal().dense_rows(3, 3, [2**64]), "rows"),
    ],
)
def test_integers_past_int64_are_refused_with_the_argument_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_the_largest_sizes_still_work():
    largest = 2**63 - 1
    full = np.ones((3, 8), dtype=bool)
    np.testing.assert_array_equal(M.sinks(largest).to_dense(3, 8), full)
    np.testing.assert_array_equal(M.window(largest).to_dense(3, 8), full)
    np.testing.assert_array_equal(M.prefix_lm(largest).to_dense(3, 8), full)
    np.testing.assert_array_equal(M.strided(largest).to_dense(3, 8), np.eye(3, 8, dtype=bool))
    ids = [largest, 0, -largest - 1]
    np.testing.assert_array_equal(M.document(ids).to_dense(3, 3), np.eye(3, dtype=bool))


def test_global_positions_must_be_a_query_or_a_key():
    q = np.zeros((1, 2, 6, 4), dtype=np.float32)
    k = np.ones((1, 2, 8, 4), dtype=np.float32)
    key_only = M.global_tokens([7])  # a key, not a query: allowed
    expected = (COLS[:, :8] == 7) | (ROWS[:6] == 7)
    np.testing.assert_array_equal(key_only.to_dense(6, 8), expected)
    got = ats.scaled_dot_product_attention(q, k, k, attn_mask=key_only)
    np.testing.assert_allclose(got, reference.scaled_dot_product_attention(q, k, k, expected))
    with pytest.raises(ValueError, match="position 8"):
        M.global_tokens([8]).to_dense(6, 8)


def test_the_limits_are_the_engines():
    from attnscope._engine import core

    assert (M.MAX_DEPTH, M.MAX_NODES) == (core().MAX_MASK_DEPTH, core().MAX_MASK_NODES)
