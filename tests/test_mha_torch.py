"""`MultiHeadAttention.from_torch` reproduces `torch.nn.MultiheadAttention`: outputs and per-head
weights (`average_attn_weights=False`), with padding, masks, cross-attention and separate
q/k/v projections (skipped when torch is not installed). No row is fully masked: PyTorch gives
NaN there where attnscope gives zeros."""

from __future__ import annotations

import attnscope
import numpy as np
import pytest
from conftest import assert_close

torch = pytest.importorskip("torch")

FLOAT32_VS_TORCH = 2e-5


def torch_module(embed_dim, num_heads, *, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, **kwargs)
    module = module.to(dtype).eval()
    with torch.no_grad():  # non-zero biases, so the bias conversion is checked too
        for name, parameter in module.named_parameters():
            if "bias" in name:
                parameter.normal_()
    return module


def run_torch(module, query, key, value, **kwargs):
    with torch.no_grad():
        out, weights = module(
            torch.from_numpy(query),
            torch.from_numpy(key),
            torch.from_numpy(value),
            need_weights=True,
            average_attn_weights=False,
            **kwargs,
        )
    return out.numpy().astype(np.float64), weights.numpy().astype(np.float64)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "relative"),
    [(np.float32, torch.float32, FLOAT32_VS_TORCH), (np.float64, torch.float64, 1e-10)],
)
def test_self_attention_with_padding_matches_torch(rng, dtype, torch_dtype, relative):
    module = torch_module(32, 4, dtype=torch_dtype)
    layer = attnscope.MultiHeadAttention.from_torch(module)
    assert layer.dtype == dtype and layer.w_q.shape == (32, 32)
    x = rng.standard_normal((3, 20, 32)).astype(dtype)
    padding = np.zeros((3, 20), dtype=bool)
    padding[1, -5:] = True
    padding[2, :7] = True
    expected, expected_weights = run_torch(
        module, x, x, x, key_padding_mask=torch.from_numpy(padding)
    )
    out, weights = layer(x, key_padding_mask=padding, need_weights=True)
    assert_close(out, expected, dtype, relative)
    assert_close(weights, expected_weights, dtype, relative)


def test_masks_and_causal_match_torch(rng):
    module = torch_module(24, 3)
    layer = attnscope.MultiHeadAttention.from_torch(module)
    x = rng.standard_normal((2, 15, 24)).astype(np.float32)
    # PyTorch's bool attn_mask marks what may NOT be attended; attnscope's what may.
    hidden = rng.random((15, 15)) < 0.4
    np.fill_diagonal(hidden, False)
    expected, expected_weights = run_torch(module, x, x, x, attn_mask=torch.from_numpy(hidden))
    out, weights = layer(x, attn_mask=~hidden, need_weights=True)
    assert_close(out, expected, np.float32, FLOAT32_VS_TORCH)
    assert_close(weights, expected_weights, np.float32, FLOAT32_VS_TORCH)

    additive = rng.standard_normal((2 * 3, 15, 15)).astype(np.float32)
    expected, _ = run_torch(module, x, x, x, attn_mask=torch.from_numpy(additive))
    out = layer(x, attn_mask=additive.reshape(2, 3, 15, 15))
    assert_close(out, expected, np.float32, FLOAT32_VS_TORCH)

    causal = torch.nn.Transformer.generate_square_subsequent_mask(15)
    expected, expected_weights = run_torch(module, x, x, x, attn_mask=causal, is_causal=True)
    out, weights = layer(x, is_causal=True, need_weights=True)
    assert_close(out, expected, np.float32, FLOAT32_VS_TORCH)
    assert_close(weights, expected_weights, np.float32, FLOAT32_VS_TORCH)


def test_cross_attention_with_separate_projections(rng):
    module = torch_module(16, 2, kdim=6, vdim=11)
    assert not module._qkv_same_embed_dim
    layer = attnscope.MultiHeadAttention.from_torch(module)
    assert layer.w_k.shape == (6, 16) and layer.w_v.shape == (11, 16)
    query = rng.standard_normal((2, 4, 16)).astype(np.float32)
    key = rng.standard_normal((2, 9, 6)).astype(np.float32)
    value = rng.standard_normal((2, 9, 11)).astype(np.float32)
    expected, expected_weights = run_torch(module, query, key, value)
    out, weights = layer(query, key, value, need_weights=True)
    assert_close(out, expected, np.float32, FLOAT32_VS_TORCH)
    assert_close(weights, expected_weights, np.float32, FLOAT32_VS_TORCH)


def test_no_bias_and_sequence_first_module(rng):
    torch.manual_seed(1)
    module = torch.nn.MultiheadAttention(16, 4, bias=False).eval()  # (L, B, E) inputs
    layer = attnscope.MultiHeadAttention.from_torch(module)
    assert layer.b_q is None and layer.b_o is None
    x = rng.standard_normal((5, 2, 16)).astype(np.float32)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(x),) * 3, need_weights=False)[0].numpy()
    out = layer(x.transpose(1, 0, 2))
    assert_close(out.transpose(1, 0, 2), expected.astype(np.float64), np.float32, FLOAT32_VS_TORCH)


def test_state_dict_of_arrays_needs_no_module(rng):
    module = torch_module(12, 3)
    state = {name: tensor.numpy() for name, tensor in module.state_dict().items()}
    from_dict = attnscope.MultiHeadAttention.from_torch(state, num_heads=3)
    from_module = attnscope.MultiHeadAttention.from_torch(module)
    x = rng.standard_normal((1, 6, 12)).astype(np.float32)
    np.testing.assert_array_equal(from_dict(x), from_module(x))
    with pytest.raises(ValueError, match="num_heads=4 but the module has num_heads=3"):
        attnscope.MultiHeadAttention.from_torch(module, num_heads=4)


def test_unsupported_options_are_refused():
    with pytest.raises(ValueError, match="add_bias_kv"):
        attnscope.MultiHeadAttention.from_torch(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        attnscope.MultiHeadAttention.from_torch(
            torch.nn.MultiheadAttention(8, 2, add_zero_attn=True)
        )


def test_decoding_a_converted_module_matches_its_causal_forward(rng):
    module = torch_module(32, 4)
    layer = attnscope.MultiHeadAttention.from_torch(module)
    x = rng.standard_normal((1, 10, 32)).astype(np.float32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
    expected, _ = run_torch(module, x, x, x, attn_mask=causal, is_causal=True)
    cache = layer.new_cache()
    steps = [layer(x[:, :4], cache=cache)] + [
        layer(x[:, t : t + 1], cache=cache) for t in range(4, 10)
    ]
    assert_close(np.concatenate(steps, axis=1), expected, np.float32, FLOAT32_VS_TORCH)
