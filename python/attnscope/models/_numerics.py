"""The NumPy pieces around attention in a transformer block: layer norm, activations and the
MLP."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 over the real line. NumPy has no erf, and this
# error is below float32 rounding of the GELU inputs that reach it, so results match torch.erf
# to float32 precision.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, to within 1.5e-7 (computed in the input's dtype)."""
    sign = np.sign(x)
    magnitude = np.abs(x)
    t = 1.0 / (1.0 + _ERF_P * magnitude)
    a1, a2, a3, a4, a5 = _ERF_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    return sign * (1.0 - poly * np.exp(-magnitude * magnitude))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """GELU as BERT defines it: ``x · Φ(x)`` with the exact normal CDF.

    With :func:`erf`'s form ``erf(z) = sign(z)·(1 - q)``, ``q = poly(t)·exp(-z²)`` and
    ``z = x/√2``, GELU is ``x - x·q/2`` for ``x >= 0`` and ``x·q/2`` below. Computed in two
    buffers, in place: the MLP's widest activation is the largest array of a block, and fresh
    temporaries for each of the formula's steps took twice as long.
    """
    a1, a2, a3, a4, a5 = _ERF_A
    t = np.abs(x)
    t *= _ERF_P / math.sqrt(2.0)
    t += 1.0
    np.reciprocal(t, out=t)
    half_xq = t * a5
    for a in (a4, a3, a2, a1):  # Horner's rule: t·(a1 + t·(a2 + ...))
        half_xq += a
        half_xq *= t
    np.multiply(x, x, out=t)
    t *= -0.5
    np.exp(t, out=t)  # exp(-z²)
    half_xq *= t
    half_xq *= x
    half_xq *= 0.5
    np.subtract(x, half_xq, out=t)
    np.copyto(t, half_xq, where=x < 0)
    return t


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation, the one GPT-2 was trained with (``gelu_new``)."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + np.tanh(inner))


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0)."""
    return np.maximum(x, 0.0)


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": relu,
}


def activation(name: str):
    """The activation a Hugging Face config names (``hidden_act`` / ``activation_function``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Each row to zero mean and unit (biased, as torch) variance, then scaled and shifted."""
    centred = x - x.mean(axis=-1, keepdims=True)
    scale = np.mean(centred * centred, axis=-1, keepdims=True)
    scale += x.dtype.type(eps)
    np.sqrt(scale, out=scale)
    centred /= scale
    centred *= weight
    centred += bias
    return centred


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x · weight + bias``, the bias added in place (weight stored (in, out))."""
    out = x @ weight
    out += bias
    return out


def feed_forward(x: np.ndarray, layer: Mapping[str, np.ndarray], act) -> np.ndarray:
    """A block's MLP, ``act(x · up + up_bias) · down + down_bias``, from a layer's weights."""
    hidden = act(linear(x, layer["up"], layer["up_bias"]))
    return linear(hidden, layer["down"], layer["down_bias"])
