"""A ``torch.nn.MultiheadAttention`` state dict read as NumPy arrays, each checked and named
when it does not fit: what :meth:`MultiHeadAttention.from_torch` converts. torch is not
imported."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (without importing torch) or anything array-like, as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) not in ("torch.float32", "torch.float64"):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _state_matrix(arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A state-dict weight: a 2-D float array, else an error naming the entry."""
    weight = arrays[name]
    if not np.issubdtype(weight.dtype, np.floating):
        raise TypeError(f"{name} has dtype {weight.dtype}; weights must be floating point")
    if weight.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (out_features, in_features), got shape {weight.shape}"
        )
    return weight


def _state_bias(arrays: Mapping[str, np.ndarray], name: str, length: int) -> np.ndarray | None:
    """A state-dict bias of `length` floats, None when absent, else an error naming it."""
    bias = arrays.get(name)
    if bias is None:
        return None
    if not np.issubdtype(bias.dtype, np.floating):
        raise TypeError(f"{name} has dtype {bias.dtype}; biases must be floating point")
    if bias.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {bias.shape}")
    return bias


def _input_projections(
    arrays: Mapping[str, np.ndarray], embed_dim: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The query, key and value projection weights of a state dict, packed or separate, each
    checked against `embed_dim` (from out_proj.weight)."""
    if "in_proj_weight" in arrays:
        packed = _state_matrix(arrays, "in_proj_weight")
        if packed.shape != (3 * embed_dim, embed_dim):
            raise ValueError(
                f"in_proj_weight has shape {packed.shape}, expected "
                f"(3 * embed_dim, embed_dim) = {(3 * embed_dim, embed_dim)}"
            )
        q_weight, k_weight, v_weight = np.split(packed, 3, axis=0)
    else:
        missing = [
            name
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            if name not in arrays
        ]
        if missing:
            raise ValueError(f"the state dict has no in_proj_weight and no {missing}")
        q_weight = _state_matrix(arrays, "q_proj_weight")
        k_weight = _state_matrix(arrays, "k_proj_weight")
        v_weight = _state_matrix(arrays, "v_proj_weight")
        for name, weight in (
            ("q_proj_weight", q_weight),
            ("k_proj_weight", k_weight),
            ("v_proj_weight", v_weight),
        ):
            if weight.shape[0] != embed_dim:
                raise ValueError(
                    f"{name} has shape {weight.shape}, expected (embed_dim, ...) with "
                    f"embed_dim = {embed_dim} (from out_proj.weight)"
                )
        if q_weight.shape != (embed_dim, embed_dim):
            raise ValueError(
                f"q_proj_weight has shape {q_weight.shape}, expected "
                f"(embed_dim, embed_dim) = {(embed_dim, embed_dim)}"
            )
    return q_weight, k_weight, v_weight


def layer_weights(
    module_or_state_dict, num_heads: int | None
) -> tuple[int, dict[str, np.ndarray | None]]:
    """The number of heads and the layer's eight parameters (``w_q`` ... ``b_o``, ``x·W``
    orientation, contiguous float32 or float64; an absent bias is None) of a
    ``torch.nn.MultiheadAttention`` or its state dict, each refused with an error naming it
    when it does not fit (see :meth:`MultiHeadAttention.from_torch`)."""
    source = module_or_state_dict
    if hasattr(source, "state_dict") and callable(source.state_dict):
        module_heads = getattr(source, "num_heads", None)
        if num_heads is not None and num_heads != module_heads:
            raise ValueError(f"num_heads={num_heads} but the module has num_heads={module_heads}")
        num_heads = module_heads
        if getattr(source, "add_zero_attn", False):
            raise ValueError("add_zero_attn=True is not supported")
        state = source.state_dict()
    elif isinstance(source, Mapping):
        if num_heads is None:
            raise ValueError("num_heads is required when converting a state dict")
        state = source
    else:
        raise TypeError(
            "module_or_state_dict must be a torch.nn.MultiheadAttention or a mapping of "
            f"its state-dict names to arrays, got {type(source).__name__}"
        )
    arrays = {name: _to_numpy(tensor) for name, tensor in state.items()}
    for unsupported in ("bias_k", "bias_v"):
        if arrays.get(unsupported) is not None:
            raise ValueError(f"{unsupported} (add_bias_kv=True) is not supported")
    if "out_proj.weight" not in arrays:
        raise ValueError(
            f"no 'out_proj.weight' in the state dict; found {sorted(arrays)} — is this an "
            "nn.MultiheadAttention?"
        )
    out_weight = _state_matrix(arrays, "out_proj.weight")
    embed_dim = out_weight.shape[0]
    q_weight, k_weight, v_weight = _input_projections(arrays, embed_dim)
    in_bias = _state_bias(arrays, "in_proj_bias", 3 * embed_dim)
    out_bias = _state_bias(arrays, "out_proj.bias", embed_dim)
    dtype = np.float64 if q_weight.dtype == np.float64 else np.float32

    q_bias, k_bias, v_bias = (None,) * 3 if in_bias is None else np.split(in_bias, 3)
    parameters = {
        "w_q": q_weight.T,
        "w_k": k_weight.T,
        "w_v": v_weight.T,
        "w_o": out_weight.T,
        "b_q": q_bias,
        "b_k": k_bias,
        "b_v": v_bias,
        "b_o": out_bias,
    }
    return num_heads, {
        name: None if array is None else np.ascontiguousarray(array, dtype=dtype)
        for name, array in parameters.items()
    }
