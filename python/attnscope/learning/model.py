"""The model, forward and backward: embeddings, projections, LayerNorm, the optional MLP and
the loss in NumPy, attention in the engine."""

from __future__ import annotations

import math

import numpy as np

from .._attention import scaled_dot_product_attention, scaled_dot_product_attention_backward
from ..models._model import merge_heads, split_heads
from .config import TrainConfig
from .tasks import Batch

_LAYER_NORM_EPS = 1e-5


def _init_params(config: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Embeddings of unit size; projections of variance 1/fan-in (so a score ``q·k`` spreads
    like √d_k, which is what the scale is there to undo)."""
    d, vocab, dtype = config.d_model, config.vocab_size, np.dtype(config.dtype)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(dtype)

    params = {
        "token_embedding": normal((vocab, d), 1.0),
        "position_embedding": normal((config.seq_len, d), 1.0),
    }
    for layer in range(config.num_layers):
        for name in ("w_q", "w_k", "w_v", "w_o"):
            params[f"{layer}.{name}"] = normal((d, d), 1.0 / math.sqrt(d))
        if config.mlp:
            params[f"{layer}.mlp_in"] = normal((d, 4 * d), 1.0 / math.sqrt(d))
            params[f"{layer}.mlp_in_bias"] = np.zeros(4 * d, dtype)
            params[f"{layer}.mlp_out"] = normal((4 * d, d), 1.0 / math.sqrt(4 * d))
            params[f"{layer}.mlp_out_bias"] = np.zeros(d, dtype)
    params["unembedding"] = normal((d, vocab), 1.0 / math.sqrt(d))
    return params


def _layer_norm(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position scaled to zero mean and unit variance (no learned gain: the next matrix
    can learn any scale). Returns the result and 1/std for the backward."""
    centred = x - x.mean(axis=-1, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + _LAYER_NORM_EPS)
    return centred * inv_std, inv_std.astype(x.dtype)


def _layer_norm_backward(grad: np.ndarray, normed: np.ndarray, inv_std: np.ndarray):
    mean_grad = grad.mean(axis=-1, keepdims=True)
    mean_grad_normed = (grad * normed).mean(axis=-1, keepdims=True)
    return inv_std * (grad - mean_grad - normed * mean_grad_normed)


def _causal_attention(q, k, v, scale: float, keep_weights: bool):
    """Causal attention of ``(B, H, T, Dh)`` heads in the engine: ``(out, lse, weights or
    None)``. Without the compiled engine it raises ImportError, as the whole API does."""
    results = scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, return_weights=keep_weights, return_lse=True
    )
    out, lse = results[0], results[-1]
    return out, lse, (results[1] if keep_weights else None)


def _causal_attention_backward(grad_out, q, k, v, out, lse, scale: float):
    """``(grad_q, grad_k, grad_v)`` of :func:`_causal_attention`, from the engine."""
    return scaled_dot_product_attention_backward(
        grad_out, q, k, v, out, lse, is_causal=True, scale=scale
    )


def _normed(x: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    return _layer_norm(x) if config.layer_norm else (x, None)


def _normed_backward(grad, normed, inv_std):
    return grad if inv_std is None else _layer_norm_backward(grad, normed, inv_std)


def _forward(params, config: TrainConfig, tokens: np.ndarray, keep_weights: bool = False):
    """Logits ``(B, T, vocab)`` and what the backward needs (and, if asked, the attention
    weights ``(layers, B, heads, T, T)``)."""
    length = tokens.shape[1]
    x = params["token_embedding"][tokens] + params["position_embedding"][:length]
    saved, weights = [], []
    for layer in range(config.num_layers):
        p = {name: params[f"{layer}.{name}"] for name in ("w_q", "w_k", "w_v", "w_o")}
        normed, inv_std = _normed(x, config)
        rows = normed.reshape(-1, config.d_model)
        q, k, v = (
            split_heads(rows @ p[n], config.num_heads, length) for n in ("w_q", "w_k", "w_v")
        )
        out, lse, layer_weights = _causal_attention(q, k, v, config.attention_scale, keep_weights)
        weights.append(layer_weights)
        merged = merge_heads(out).reshape(x.shape)
        x = x + merged @ p["w_o"]
        saved.append(("attention", layer, normed, inv_std, q, k, v, out, lse, merged))
        if config.mlp:
            x, mlp_saved = _mlp_forward(params, layer, x, config)
            saved.append(mlp_saved)
    normed, inv_std = _normed(x, config)
    logits = normed @ params["unembedding"]
    saved.append(("final", normed, inv_std))
    return logits, saved, (np.stack(weights) if keep_weights else None)


def _mlp_forward(params, layer: int, x: np.ndarray, config: TrainConfig):
    normed, inv_std = _normed(x, config)
    hidden = np.maximum(normed @ params[f"{layer}.mlp_in"] + params[f"{layer}.mlp_in_bias"], 0)
    x = x + hidden @ params[f"{layer}.mlp_out"] + params[f"{layer}.mlp_out_bias"]
    return x, ("mlp", layer, normed, inv_std, hidden)


def _cross_entropy(logits: np.ndarray, batch: Batch):
    """Mean loss over the counted positions, its gradient w.r.t. the logits, and the
    per-position loss ``(B, T)`` (0 where not counted)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, batch.targets[..., None], axis=-1)[..., 0]
    per_position = np.where(batch.counted, -picked, 0.0)
    count = max(int(batch.counted.sum()), 1)
    grad = np.exp(log_probs)
    np.put_along_axis(
        grad,
        batch.targets[..., None],
        np.take_along_axis(grad, batch.targets[..., None], -1) - 1,
        -1,
    )
    grad *= (batch.counted / count)[..., None].astype(grad.dtype)
    return float(per_position.sum() / count), grad, per_position


def _backward(params, config: TrainConfig, tokens, saved, grad_logits) -> dict[str, np.ndarray]:
    """Gradients of the loss w.r.t. every parameter, given its gradient w.r.t. the logits."""
    grads = {}
    width = config.d_model
    _, normed, inv_std = saved[-1]
    grads["unembedding"] = normed.reshape(-1, width).T @ grad_logits.reshape(-1, config.vocab_size)
    grad_x = _normed_backward(grad_logits @ params["unembedding"].T, normed, inv_std)
    for entry in reversed(saved[:-1]):
        backward = _mlp_backward if entry[0] == "mlp" else _attention_backward_layer
        grad_x = grad_x + backward(params, entry, grad_x, grads, config)
    length = tokens.shape[1]
    grads["position_embedding"] = np.zeros_like(params["position_embedding"])
    grads["position_embedding"][:length] = grad_x.sum(axis=0)
    grads["token_embedding"] = np.zeros_like(params["token_embedding"])
    np.add.at(grads["token_embedding"], tokens.ravel(), grad_x.reshape(-1, width))
    return grads


def _attention_backward_layer(params, entry, grad_x, grads, config: TrainConfig):
    """Fills this layer's projection gradients; returns the gradient reaching its input."""
    _, layer, normed, inv_std, q, k, v, out, lse, merged = entry
    width = config.d_model
    rows = grad_x.reshape(-1, width)
    grads[f"{layer}.w_o"] = merged.reshape(-1, width).T @ rows
    grad_out = split_heads(rows @ params[f"{layer}.w_o"].T, config.num_heads, grad_x.shape[1])
    grad_heads = _causal_attention_backward(grad_out, q, k, v, out, lse, config.attention_scale)
    flat_normed = normed.reshape(-1, width)
    grad_normed = np.zeros_like(flat_normed)
    for name, grad in zip(("w_q", "w_k", "w_v"), grad_heads, strict=True):
        merged_grad = merge_heads(grad)
        grads[f"{layer}.{name}"] = flat_normed.T @ merged_grad
        grad_normed += merged_grad @ params[f"{layer}.{name}"].T
    return _normed_backward(grad_normed.reshape(normed.shape), normed, inv_std)


def _mlp_backward(params, entry, grad_x, grads, config: TrainConfig):
    _, layer, normed, inv_std, hidden = entry
    width = config.d_model
    grads[f"{layer}.mlp_out"] = hidden.reshape(-1, 4 * width).T @ grad_x.reshape(-1, width)
    grads[f"{layer}.mlp_out_bias"] = grad_x.sum(axis=(0, 1))
    grad_hidden = (grad_x @ params[f"{layer}.mlp_out"].T) * (hidden > 0)
    grads[f"{layer}.mlp_in"] = normed.reshape(-1, width).T @ grad_hidden.reshape(-1, 4 * width)
    grads[f"{layer}.mlp_in_bias"] = grad_hidden.sum(axis=(0, 1))
    return _normed_backward(grad_hidden @ params[f"{layer}.mlp_in"].T, normed, inv_std)
