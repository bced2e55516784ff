"""The non-finite rule on every path of the kernel and every instruction set, against the float64
reference and, where torch is installed, PyTorch:

- NaN in what a query sees (its row of the query, a visible key or value, a visible float-mask
  cell) reaches its output and makes its weights row NaN; so does +inf at a visible mask cell.
  Infinities in the query or keys give NaN exactly where inf - inf arises.
- What a query cannot see never reaches it, NaN included; a query that sees no key gets zeros.
- A scale that overflows the dtype is refused with a ValueError naming ``scale``.

Each case poisons key ``j`` (or its mask column), which the bottom-right causal rule shows only to
the rows from ``L // 2`` on, so one call checks both halves of the rule.
"""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from attnscope import reference
from conftest import FLOAT_DTYPES, assert_close, random_qkv

sdpa = attnscope.scaled_dot_product_attention


# (L, S): the paths a call can take.
SHAPES = [
    pytest.param(1, 10, id="decode-row-layout"),
    pytest.param(3, 5000, id="row-layout-split-keys"),
    pytest.param(70, 300, id="tiled"),
    pytest.param(40, 5000, id="tiled-split-keys"),
    pytest.param(130, 700, id="tiled-three-query-blocks"),
]

# Poisons that must make every row that sees them NaN (value poisons: the poisoned column).
NAN_POISONS = ["query-nan", "key-nan", "value-nan", "mask-nan", "mask-inf"]
# Infinities whose result the reference decides (+inf or -inf scores, inf - inf).
INF_POISONS = ["query-inf", "key-inf", "key-neg-inf", "value-inf"]

CAUSAL = dict(is_causal=True, causal_alignment="bottom_right")


def poisoned_case(rng, num_queries, num_keys, dtype, poison, heads=2):
    """q, k, v (2, heads, L|S, 8), an optional float mask, and the rows that see the poison."""
    q, k, v = random_qkv(
        rng, (2, heads, num_queries, 8), (2, heads, num_keys, 8), (2, heads, num_keys, 8), dtype
    )
    poisoned_key = num_keys - num_queries + num_queries // 2
    sees = np.arange(num_queries) >= num_queries // 2
    mask = None
    value = {"nan": np.nan, "inf": np.inf, "neg-inf": -np.inf}[poison.split("-", 1)[1]]
    target = poison.split("-", 1)[0]
    if target == "query":
        q[:, :, num_queries // 2, 0] = value
        sees = np.arange(num_queries) == num_queries // 2
    elif target == "key":
        k[:, :, poisoned_key, 0] = value
    elif target == "value":
        v[:, :, poisoned_key, 0] = value
    else:  # a float mask, poisoned down the whole column: hidden from the first rows
        mask = np.zeros((num_queries, num_keys), dtype)
        mask[:, poisoned_key] = value
    return q, k, v, mask, sees


def check_rule(out, weights, sees, poison):
    """Rows that see a NaN poison are NaN (weights: the whole row); the others stay finite."""
    columns = slice(0, 1) if poison.startswith("value") else slice(None)
    assert np.isnan(out[:, :, sees, columns]).all()
    assert np.isfinite(out[:, :, ~sees]).all()
    if weights is not None:
        if poison.startswith("value"):
            assert np.isfinite(weights).all()
        else:
            assert np.isnan(weights[:, :, sees]).all()
            assert np.isfinite(weights[:, :, ~sees]).all()


@pytest.mark.parametrize("poison", NAN_POISONS + INF_POISONS)
@pytest.mark.parametrize(("num_queries", "num_keys"), SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_path_and_level_follows_the_rule(
    simd_level, rng, dtype, num_queries, num_keys, poison
):
    q, k, v, mask, sees = poisoned_case(rng, num_queries, num_keys, dtype, poison)
    want_out, want_weights = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, **CAUSAL, return_weights=True
    )
    out = sdpa(q, k, v, attn_mask=mask, **CAUSAL)
    out_w, weights = sdpa(q, k, v, attn_mask=mask, **CAUSAL, return_weights=True)
    for got in (out, out_w):  # NaN and inf at the same places, finite values close
        assert_close(got, want_out, dtype)
    assert_close(weights, want_weights, dtype)
    if poison in NAN_POISONS:
        check_rule(want_out, want_weights, sees, poison)  # the reference states the rule too
        check_rule(out, None, sees, poison)
        check_rule(out_w, weights, sees, poison)
    else:
        assert np.isfinite(out[:, :, ~sees]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("num_keys", [300, 5000])
@pytest.mark.parametrize("poison", NAN_POISONS)
def test_grouped_decode_follows_the_rule(simd_level, rng, dtype, num_keys, poison):
    """One query row, four query heads on two kv heads: the heads of a group run as one block."""
    q, k, v, mask, _ = poisoned_case(rng, 1, num_keys, dtype, poison)
    q = np.concatenate([q, q], axis=1)  # (2, 4, 1, 8) against (2, 2, S, 8)
    if mask is not None:
        mask = mask[None, None]
    hidden_key = 7  # outside the window: NaN there must not leak
    k[:, :, hidden_key] = np.nan
    v[:, :, hidden_key] = np.nan
    options = dict(CAUSAL, window=(200, 0), enable_gqa=True)
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
    got = sdpa(q, k, v, attn_mask=mask, **options)
    assert_close(got, want, dtype)
    columns = slice(0, 1) if poison.startswith("value") else slice(None)
    assert np.isnan(got[..., columns]).all()
    # The same call with the visible poison removed is finite: the hidden NaN key stays out.
    clean_k, clean_v = k.copy(), v.copy()
    clean_k[:, :, -1], clean_v[:, :, -1] = 0.5, 0.5
    clean = sdpa(q if poison != "query-nan" else np.nan_to_num(q), clean_k, clean_v, **options)
    assert np.isfinite(clean).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("poison", ["query-nan", "key-nan", "value-nan", "key-inf"])
@pytest.mark.parametrize("num_queries", [1, 6, 70])
def test_kv_cache_follows_the_rule(simd_level, rng, dtype, poison, num_queries):
    num_keys = 3000
    q, k, v, _, sees = poisoned_case(rng, num_queries, num_keys, dtype, poison, heads=2)
    q, k, v = q[:1], k[:1], v[:1]
    q = np.concatenate([q, q], axis=1)  # 4 query heads on 2 kv heads
    cache = attnscope.KVCache(2, 8, dtype=dtype)
    cache.append(k[:, :, :1000], v[:, :, :1000])
    cache.append(k[:, :, 1000:], v[:, :, 1000:])
    got = cache.attend(q, enable_gqa=True)
    want = reference.scaled_dot_product_attention(q, k, v, **CAUSAL, enable_gqa=True)
    assert_close(got, want, dtype)
    if poison != "key-inf":
        check_rule(want, None, sees, poison)
        check_rule(got, None, sees, poison)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "int8"])
@pytest.mark.parametrize("poison", ["query-nan", "key-nan", "value-nan"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["one-head-per-kv-head", "grouped"])
def test_a_decoding_step_over_any_storage_follows_the_rule(
    simd_level, rng, storage, poison, kv_heads
):
    """One query row per head over a stored cache (the stored-rows kernel, every format): a NaN
    the row sees reaches it, even a query whose every score is NaN. int8 storage refuses a
    NaN key or value at append (a block of 32 values shares its scale, which would spread the
    NaN to outputs it does not feed), and keeps nothing of the refused chunk."""
    q, k, v, _, sees = poisoned_case(rng, 1, 3000, np.float32, poison)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    cache = attnscope.KVCache(kv_heads, 8, batch=2, storage=storage)
    if storage == "int8" and poison != "query-nan":
        name = poison.split("-")[0][0]
        with pytest.raises(
            ValueError, match=rf"^{name}: holds NaN, which int8 storage cannot keep"
        ):
            cache.append(k, v)
        assert len(cache) == 0
        return
    cache.append(k, v)
    got = cache.attend(q, enable_gqa=kv_heads == 1)
    want = reference.scaled_dot_product_attention(
        q,
        reference.stored_values(k, storage),
        reference.stored_values(v, storage),
        **CAUSAL,
        enable_gqa=kv_heads == 1,
    )
    assert_close(got, want, np.float32)
    check_rule(got, None, sees, poison)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("cell", [np.nan, np.inf])
def test_a_poisoned_mask_cell_at_a_key_hidden_otherwise_stays_hidden(simd_level, rng, dtype, cell):
    """The cell lies where a bool mask, the causal rule or a window already hides the key."""
    q, k, v = random_qkv(rng, (2, 70, 8), (2, 300, 8), (2, 300, 8), dtype)
    mask = np.zeros((70, 300), dtype)
    mask[:, 299] = cell  # hidden from every row by the causal rule (top-left)
    mask[:, 0] = cell  # hidden by the window below
    options = dict(is_causal=True, window=(50, 0))
    want = reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
    for return_weights in (False, True):
        got = sdpa(q, k, v, attn_mask=mask, **options, return_weights=return_weights)
        out = got[0] if return_weights else got
        assert np.isfinite(out[:, 51:]).all()  # rows past the window's reach of key 0
        assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neg_inf_in_a_float_mask_hides_and_a_row_of_it_gives_zeros(rng, dtype):
    q, k, v = random_qkv(rng, (2, 5, 8), (2, 40, 8), (2, 40, 8), dtype)
    mask = np.zeros((5, 40), dtype)
    mask[:, 3] = -np.inf
    mask[2] = -np.inf
    k[:, 3] = np.nan
    v[:, 3] = np.inf
    out, weights = sdpa(q, k, v, attn_mask=mask, return_weights=True)
    want_out, want_weights = reference.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, return_weights=True
    )
    np.testing.assert_array_equal(out[:, 2], 0)
    np.testing.assert_array_equal(weights[:, 2], 0)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    assert_close(out, want_out, dtype)
    assert_close(weights, want_weights, dtype)


@pytest.mark.parametrize(("num_queries", "num_keys"), SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scores_all_neg_inf_give_zero_weights_yet_a_visible_nan_value_still_counts(
    simd_level, rng, dtype, num_queries, num_keys
):
    """Row 0's query is +inf against keys that are all negative there: every score is -inf, so
    its weights are zeros (as for a row that sees nothing), but 0 · NaN at a visible value is NaN,
    as in PyTorch."""
    q, k, v = random_qkv(rng, (1, num_queries, 8), (1, num_keys, 8), (1, num_keys, 8), dtype)
    k[..., 0] = -np.abs(k[..., 0]) - 0.1
    q[0, 0, 0] = np.inf
    v[0, -1, 2] = np.nan
    want_out, want_weights = reference.scaled_dot_product_attention(q, k, v, return_weights=True)
    out, weights = sdpa(q, k, v, return_weights=True)
    np.testing.assert_array_equal(weights[0, 0], 0)
    assert np.isnan(out[0, :, 2]).all() and np.isfinite(np.delete(out, 2, axis=-1)).all()
    for got in (out, sdpa(q, k, v)):
        assert_close(got, want_out, dtype)
    assert_close(weights, want_weights, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weight", ["w_q", "w_k", "w_v", "w_o", "b_q", "b_v"])
def test_a_layer_with_nan_weights_gives_nan(rng, dtype, weight):
    layer = attnscope.MultiHeadAttention(16, 4, num_kv_heads=2, seed=0, dtype=dtype)
    poisoned = getattr(layer, weight).copy()
    poisoned[...] = np.nan
    setattr(layer, weight, poisoned)
    x = rng.standard_normal((2, 5, 16)).astype(dtype)
    out, weights = layer(x, need_weights=True)
    assert np.isnan(out).all()
    assert np.isnan(layer(x)).all()
    assert np.isnan(layer(x, cache=layer.new_cache(batch=2))).all()
    if weight in ("w_q", "w_k", "b_q"):  # the scores themselves are NaN
        assert np.isnan(weights).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_nan_token_reaches_only_the_queries_that_see_it(rng, dtype):
    layer = attnscope.MultiHeadAttention(16, 4, seed=0, dtype=dtype)
    x = rng.standard_normal((1, 9, 16)).astype(dtype)
    x[0, 4, 3] = np.nan
    out = layer(x, is_causal=True)
    assert np.isfinite(out[0, :4]).all()
    assert np.isnan(out[0, 4:]).all()


# --- scale ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e39, -1e39, 3e38])
def test_a_scale_that_overflows_float32_is_refused(rng, scale):
    q, k, v = random_qkv(rng, (2, 4, 8), (2, 6, 8), (2, 6, 8), np.float32)
    with pytest.raises(ValueError, match=r"scale: .* too large for float32"):
        sdpa(q, k, v, scale=scale)
    cache = attnscope.KVCache(2, 8)
    cache.append(k[None], v[None])
    with pytest.raises(ValueError, match="scale"):
        cache.attend(q[None, :, :1], scale=scale)
    assert len(cache) == 6


def test_a_scale_that_overflows_float64_is_refused(rng):
    q, k, v = random_qkv(rng, (2, 4, 8), (2, 6, 8), (2, 6, 8), np.float64)
    with pytest.raises(ValueError, match=r"scale: .* too large for float64"):
        sdpa(q, k, v, scale=1.5e308)


@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.float32, 1e38), (np.float32, 1e-40), (np.float64, 1e39)]
)
def test_extreme_scales_that_fit_are_computed(rng, dtype, scale):
    # Small inputs keep the scaled scores inside the dtype's range.
    q, k, v = random_qkv(rng, (2, 70, 8), (2, 90, 8), (2, 90, 8), dtype)
    q = q * dtype(1e-20) if scale > 1 else q
    want = reference.scaled_dot_product_attention(q, k, v, scale=scale)
    got = sdpa(q, k, v, scale=scale)
    assert np.isfinite(got).all()
    assert_close(got, want, dtype)


# --- PyTorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", NAN_POISONS + INF_POISONS)
@pytest.mark.parametrize(("num_queries", "num_keys"), SHAPES)
def test_torch_agrees_on_the_rows_it_does_not_leak_into(rng, num_queries, num_keys, poison):
    """PyTorch adds -inf to a hidden key's score and multiplies a hidden value by a zero weight,
    so a NaN or inf key or value still reaches rows that cannot see it (NaN + -inf, 0 · NaN);
    attnscope keeps it out. Every other row agrees."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, sees = poisoned_case(rng, num_queries, num_keys, np.float32, poison)
    visible = reference.visibility(num_queries, num_keys, **CAUSAL)
    float_mask = np.where(visible, mask if mask is not None else 0.0, -np.inf).astype(np.float32)
    with torch.no_grad():
        want = torch.nn.functional.scaled_dot_product_attention(
            *(torch.from_numpy(x) for x in (q, k, v)), attn_mask=torch.from_numpy(float_mask)
        ).numpy()
    got = sdpa(q, k, v, attn_mask=mask, **CAUSAL)
    rows = sees if poison.startswith(("key", "value")) else slice(None)
    assert_close(got[:, :, rows], want[:, :, rows].astype(np.float64), np.float32)
