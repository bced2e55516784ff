"""Bad arguments to `MultiHeadAttention` raise TypeError or ValueError naming the argument and
the shapes involved; none reaches the engine as a panic."""

from __future__ import annotations

import re

import attnscope
import numpy as np
import pytest

MHA = attnscope.MultiHeadAttention


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((30, 4), {}, ValueError, r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
        ((32, 8), {"num_kv_heads": 3}, ValueError, r"num_heads \(8\) must be a multiple of num_kv"),
        ((32, 0), {}, ValueError, "num_heads must be >= 1"),
        ((32, 4), {"num_kv_heads": 0}, ValueError, "num_kv_heads must be >= 1"),
        ((32.0, 4), {}, TypeError, "embed_dim must be an int"),
        ((32, 4), {"dtype": np.float16}, TypeError, "dtype must be numpy.float32 or"),
        ((32, 4), {"bias": 1}, TypeError, "bias must be a bool"),
    ],
)
def test_constructor_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        MHA(*args, **kwargs)


@pytest.fixture
def layer():
    return MHA(16, 4, num_kv_heads=2, seed=0)


def x(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda m: m(x(2, 3, 12)),
            ValueError,
            r"query: last axis must be embed_dim = 16, got "
            r"shape \(2, 3, 12\)",
        ),
        (
            lambda m: m(x(2, 3, 16), x(2, 5, 8)),
            ValueError,
            r"key: expected shape \(B, S, 16\) "
            r"with B = 2 like query, got \(2, 5, 8\)",
        ),
        (lambda m: m(x(2, 3, 16), x(1, 5, 16)), ValueError, r"key: .*got \(1, 5, 16\)"),
        (
            lambda m: m(x(2, 3, 16), x(2, 5, 16), x(2, 4, 16)),
            ValueError,
            r"value: has 4 tokens but key has 5",
        ),
        (lambda m: m(x(2, 3, 16), x(5, 16)), ValueError, r"key has shape \(5, 16\) but query"),
        (lambda m: m(x(16)), ValueError, r"query must have 2 or 3 dims, got shape \(16,\)"),
        (
            lambda m: m(x(2, 3, 16), attn_mask=np.ones((3, 4), bool)),
            ValueError,
            r"attn_mask: shape \(3, 4\) does not broadcast to \(B, num_heads, L, S\) = "
            r"\(2, 4, 3, 3\)",
        ),
        (
            lambda m: m(x(2, 3, 16), attn_mask=np.ones((3, 3, 3), bool)),
            ValueError,
            r"attn_mask: shape \(3, 3, 3\)",
        ),
        (
            lambda m: m(x(2, 3, 16), key_padding_mask=np.zeros((2, 4), bool)),
            ValueError,
            r"key_padding_mask: expected shape \(B, S\) = \(2, 3\), got \(2, 4\)",
        ),
        (
            lambda m: m(x(2, 3, 16), key_padding_mask=np.zeros(3, bool)),
            ValueError,
            r"key_padding_mask must be \(B, S\), got shape \(3,\)",
        ),
        (
            lambda m: m(x(3, 16), key_padding_mask=np.zeros((1, 3), bool)),
            ValueError,
            r"key_padding_mask must be \(S,\)",
        ),
        (
            lambda m: m(x(2, 3, 16), key_padding_mask=np.zeros((2, 3))),
            TypeError,
            "key_padding_mask must be a bool numpy array",
        ),
        (
            lambda m: m(x(2, 3, 16), attn_mask=np.ones((3, 3), np.int8)),
            TypeError,
            "attn_mask has dtype int8",
        ),
        (lambda m: m([[0.0] * 16]), TypeError, "query must be a numpy.ndarray"),
        (
            lambda m: m(x(2, 3, 16, dtype=np.float64)),
            TypeError,
            "query has dtype float64 but this computes in float32",
        ),
        (lambda m: m(x(2, 3, 16), x(2, 3, 16, dtype=np.int64)), TypeError, "key has dtype int64"),
        (lambda m: m(x(2, 3, 16), is_causal=None), TypeError, "is_causal must be a bool"),
    ],
)
def test_call_errors(layer, call, error, match):
    with pytest.raises(error, match=match):
        call(layer)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("w_k", (16, 16), "(kdim, num_kv_heads * head_dim) = (kdim, 8)"),
        ("w_o", (8, 16), "(num_heads * head_dim, E) = (16, 16)"),
        ("w_o", (16, 12), "(num_heads * head_dim, E) = (16, 16)"),  # w_o's fault, not b_o's
        ("b_v", (16,), "(8,)"),
    ],
)
def test_reassigned_weights_of_another_shape_are_named_with_the_shape_expected(
    layer, name, shape, expected
):
    setattr(layer, name, x(*shape))
    message = f"{name}: expected shape {expected}, got {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x(1, 2, 16))


@pytest.mark.parametrize(("name", "input_name"), [("w_k", "key"), ("w_v", "value")])
def test_reassigned_weights_with_rows_that_do_not_fit_the_input_are_their_fault(
    layer, name, input_name
):
    # In self-attention the key and value inputs are the query: wrong rows are the weight's.
    setattr(layer, name, x(12, 8))
    message = f"{name}: has 12 rows but the {input_name} input (here the query) is 16 wide"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(x(1, 2, 16))


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("w_q", x(16, 18), ValueError, r"w_q: has 18 columns, not a multiple of num_heads \(4\)"),
        ("w_v", x(16, 8, dtype=np.float64), TypeError, "w_v has dtype float64"),
        ("b_q", x(1, 16), ValueError, "b_q must have 1 dims"),
    ],
)
def test_reassigned_weights_are_checked(layer, name, value, error, match):
    setattr(layer, name, value)
    with pytest.raises(error, match=match):
        layer(x(1, 2, 16))


def test_from_torch_needs_num_heads_for_a_state_dict():
    with pytest.raises(ValueError, match="num_heads is required"):
        MHA.from_torch({"out_proj.weight": np.eye(4)})
    with pytest.raises(ValueError, match="no 'out_proj.weight'"):
        MHA.from_torch({"weight": np.eye(4)}, num_heads=2)
    with pytest.raises(TypeError, match="module_or_state_dict must be"):
        MHA.from_torch(np.eye(4), num_heads=2)
    with pytest.raises(ValueError, match=r"in_proj_weight has shape \(8, 4\)"):
        MHA.from_torch({"out_proj.weight": np.eye(4), "in_proj_weight": np.ones((8, 4))}, 2)


def test_a_wrong_w_k_in_cross_attention_names_the_key_and_w_k(layer):
    with pytest.raises(ValueError, match=r"key: expected shape \(B, S, 16\).*rows of w_k"):
        layer(x(2, 3, 16), x(2, 5, 8))


def _state_dict(embed_dim=4):
    rng = np.random.default_rng(0)
    return {
        "in_proj_weight": rng.standard_normal((3 * embed_dim, embed_dim)),
        "in_proj_bias": rng.standard_normal(3 * embed_dim),
        "out_proj.weight": rng.standard_normal((embed_dim, embed_dim)),
        "out_proj.bias": rng.standard_normal(embed_dim),
    }


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        (
            "in_proj_bias",
            np.zeros(8),
            ValueError,
            r"in_proj_bias must have shape \(12,\), got \(8,\)",
        ),
        (
            "in_proj_bias",
            np.zeros((3, 4)),
            ValueError,
            r"in_proj_bias must have shape \(12,\), got \(3, 4\)",
        ),
        ("out_proj.bias", np.zeros((1, 4)), ValueError, r"out_proj.bias must have shape \(4,\)"),
        ("out_proj.weight", np.float64(1.0), ValueError, r"out_proj.weight must be 2-D"),
        ("in_proj_weight", np.zeros(48), ValueError, r"in_proj_weight must be 2-D"),
        ("in_proj_weight", np.zeros((12, 4), bool), TypeError, "in_proj_weight has dtype bool"),
        ("out_proj.bias", np.zeros(4, np.int64), TypeError, "out_proj.bias has dtype int64"),
    ],
)
def test_from_torch_checks_each_entry_up_front(name, value, error, match):
    state = _state_dict()
    state[name] = value
    with pytest.raises(error, match=match):
        MHA.from_torch(state, num_heads=2)


def test_from_torch_checks_separate_projection_shapes():
    state = _state_dict()
    del state["in_proj_weight"]
    state.update(
        q_proj_weight=np.zeros((4, 4)),
        k_proj_weight=np.zeros((3, 6)),
        v_proj_weight=np.zeros((4, 5)),
    )
    with pytest.raises(ValueError, match=r"k_proj_weight has shape \(3, 6\)"):
        MHA.from_torch(state, num_heads=2)
