"""`MultiHeadAttention`: projections, every head at once, output projection. Argument checks
here, the work in Rust."""

from __future__ import annotations

import math

import numpy as np

from ._attention import context_threads
from ._checks import array_of, flag, float_dtype, whole_number
from ._engine import core
from ._kv_cache import KVCache
from ._torch_state import layer_weights
from .masks import Mask

__all__ = ["MultiHeadAttention"]

_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")


def _xavier_uniform(rng: np.random.Generator, rows: int, cols: int, dtype) -> np.ndarray:
    bound = math.sqrt(6.0 / (rows + cols)) if rows + cols else 0.0
    return rng.uniform(-bound, bound, size=(rows, cols)).astype(dtype)


class MultiHeadAttention:
    """Multi-head attention as a layer, in the chapter's notation.

    ``Q = x·W_Q``, ``K = x·W_K``, ``V = x·W_V`` (plus biases) are split into heads, every head
    attends at once, and the joined heads are projected back with ``W_O``. The whole forward
    runs in Rust in one call with the GIL released.

    Args:
        embed_dim: width ``E`` of the token embeddings (and of the output).
        num_heads: query heads ``Hq``; ``E`` must be a multiple of it (``Dh = E / Hq``).
        num_kv_heads: key/value heads ``Hkv`` (default ``Hq``); fewer gives grouped-query
            attention, 1 multi-query attention. ``Hq`` must be a multiple of it.
        bias: whether the four projections have biases.
        seed: seed of the deterministic initialisation (Xavier-uniform weights, zero biases).
        dtype: ``numpy.float32`` or ``numpy.float64``.
        kdim, vdim: widths of the key and value inputs for cross-attention (default ``E``).

    Attributes:
        w_q: ``(E, Hq·Dh)``.  w_k: ``(kdim, Hkv·Dh)``.  w_v: ``(vdim, Hkv·Dh)``.
        w_o: ``(Hq·Dh, E)``.  b_q, b_k, b_v, b_o: one per column, or ``None``.
        They are plain arrays: assign new ones (same shapes and dtype) to change the layer.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        *,
        num_kv_heads=None,
        bias=True,
        seed=None,
        dtype=np.float32,
        kdim=None,
        vdim=None,
    ):
        embed_dim = whole_number(embed_dim, "embed_dim", low=1)
        num_heads = whole_number(num_heads, "num_heads", low=1)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_kv_heads = whole_number(num_kv_heads, "num_kv_heads", low=1)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self._dtype = float_dtype(dtype)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else whole_number(kdim, "kdim", low=1)
        self.vdim = embed_dim if vdim is None else whole_number(vdim, "vdim", low=1)
        kv_width = num_kv_heads * self.head_dim
        rng = np.random.default_rng(seed)
        self.w_q = _xavier_uniform(rng, embed_dim, embed_dim, self._dtype)
        self.w_k = _xavier_uniform(rng, self.kdim, kv_width, self._dtype)
        self.w_v = _xavier_uniform(rng, self.vdim, kv_width, self._dtype)
        self.w_o = _xavier_uniform(rng, embed_dim, embed_dim, self._dtype)
        use_bias = flag(bias, "bias")
        zeros = (lambda n: np.zeros(n, dtype=self._dtype)) if use_bias else (lambda n: None)
        self.b_q = zeros(embed_dim)
        self.b_k = zeros(kv_width)
        self.b_v = zeros(kv_width)
        self.b_o = zeros(embed_dim)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, bias={self.b_q is not None}, dtype={self.dtype})"
        )

    def new_cache(self, *, batch=1, capacity=None, storage=None, max_len=None, sinks=0) -> KVCache:
        """An empty :class:`KVCache` that fits this layer (see it for the arguments)."""
        return KVCache(
            self.num_kv_heads,
            self.head_dim,
            batch=batch,
            dtype=self.dtype,
            capacity=capacity,
            storage=storage,
            max_len=max_len,
            sinks=sinks,
        )

    def _parameters(self) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        matrices = [array_of(getattr(self, n), n, self._dtype, (2,)) for n in _WEIGHT_NAMES]
        biases = [
            None if getattr(self, n) is None else array_of(getattr(self, n), n, self._dtype, (1,))
            for n in _BIAS_NAMES
        ]
        return matrices, biases

    def __call__(
        self,
        query,
        key=None,
        value=None,
        *,
        attn_mask=None,
        key_padding_mask=None,
        is_causal=False,
        need_weights=False,
        cache=None,
    ):
        """Runs the layer.

        Args:
            query: ``(B, L, E)``, or ``(L, E)`` for one unbatched sequence.
            key: ``(B, S, kdim)``; defaults to ``query`` (self-attention).
            value: ``(B, S, vdim)``; defaults to ``key``.
            attn_mask: bool (True = may attend, as in :func:`scaled_dot_product_attention`;
                PyTorch's bool masks mean the opposite) or float (added to the scores),
                broadcastable to ``(B, Hq, L, S)`` (unbatched: ``(Hq, L, S)``), or an
                :mod:`attnscope.masks` expression (not with ``key_padding_mask``).
            key_padding_mask: bool ``(B, S)`` (unbatched ``(S,)``), True = padding: that key
                is ignored, as in PyTorch.
            is_causal: query ``i`` sees keys ``j <= i`` (top-left, as PyTorch).
            need_weights: also return the per-head weights ``(B, Hq, L, S)`` (PyTorch averages
                heads unless ``average_attn_weights=False``).
            cache: a :class:`KVCache`: the new tokens' keys and values are appended and the
                queries attend over the whole cache, causally with bottom-right alignment
                (``S`` is then the cache length). Self-attention only. On error the cache is
                left as it was.

        Returns:
            The output ``(B, L, E)`` (``(L, E)`` unbatched), or ``(output, weights)``. A query
            that sees no key gets attention output zeros (so its output is ``b_o``).
        """
        dtype = self._dtype
        query = array_of(query, "query", dtype, (2, 3))
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be an attnscope.KVCache, got {type(cache).__name__}")
            if (key is not None and key is not query) or (value is not None and value is not key):
                raise ValueError(
                    "cache= runs self-attention: leave key and value out (they are the query)"
                )
            if cache.dtype != dtype:
                raise TypeError(
                    f"cache holds {cache.dtype} but the layer computes in {dtype}; create it "
                    f"with dtype=numpy.{dtype} (or layer.new_cache())"
                )
        key = query if key is None else array_of(key, "key", dtype, (2, 3))
        value = key if value is None else array_of(value, "value", dtype, (2, 3))
        unbatched = query.ndim == 2
        for name, array in (("key", key), ("value", value)):
            if array.ndim != query.ndim:
                raise ValueError(
                    f"{name} has shape {array.shape} but query has shape {query.shape}; "
                    "both batched (B, N, E) or both unbatched (N, E)"
                )
        padding = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, np.ndarray) or key_padding_mask.dtype != np.bool_:
                raise TypeError(
                    "key_padding_mask must be a bool numpy array (True = padding), got "
                    f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}"
                )
            expected_ndim = 1 if unbatched else 2
            if key_padding_mask.ndim != expected_ndim:
                layout = "(S,)" if unbatched else "(B, S)"
                raise ValueError(
                    f"key_padding_mask must be {layout}, got shape {key_padding_mask.shape}"
                )
            padding = key_padding_mask[None] if unbatched else key_padding_mask
        if unbatched:
            query, key, value = query[None], key[None], value[None]
        matrices, biases = self._parameters()
        result = core().multi_head_attention_forward(
            query,
            key,
            value,
            *matrices,
            *biases,
            self.num_heads,
            self.num_kv_heads,
            attn_mask._expr if isinstance(attn_mask, Mask) else attn_mask,
            padding,
            is_causal,
            need_weights,
            None if cache is None else cache._core,
            context_threads(),
        )
        if not unbatched:
            return result
        if isinstance(result, tuple):
            return result[0][0], result[1][0]
        return result[0]

    @classmethod
    def from_torch(cls, module_or_state_dict, num_heads=None) -> MultiHeadAttention:
        """A layer with the weights of a ``torch.nn.MultiheadAttention`` (or its state dict).

        Converts ``in_proj_weight``/``in_proj_bias`` (or ``q_proj_weight``, ``k_proj_weight``,
        ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``) and ``out_proj.*``,
        transposing them to the ``x·W`` orientation, so outputs and per-head weights match
        PyTorch's. torch is not needed to call this with a dict of NumPy arrays.

        Args:
            module_or_state_dict: an ``nn.MultiheadAttention``, or a mapping of its state-dict
                names to tensors or arrays.
            num_heads: required with a mapping (a state dict does not record it); with a
                module it must be ``None`` or equal ``module.num_heads``.

        Note: PyTorch's default input layout is ``(L, B, E)`` unless ``batch_first=True``;
        this layer takes ``(B, L, E)``. Dropout is not applied (use the module in eval mode
        to compare).
        """
        num_heads, weights = layer_weights(module_or_state_dict, num_heads)
        layer = cls(
            weights["w_o"].shape[1],
            num_heads,
            bias=weights["b_q"] is not None or weights["b_o"] is not None,
            dtype=weights["w_o"].dtype,
            kdim=weights["w_k"].shape[0],
            vdim=weights["w_v"].shape[0],
        )
        for name, array in weights.items():
            setattr(layer, name, array)
        return layer
