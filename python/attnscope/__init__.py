"""attnscope: fast, exact CPU attention in Rust with a NumPy API.

Example::

    import attnscope as ats
    out = ats.scaled_dot_product_attention(q, k, v, is_causal=True)
"""

from __future__ import annotations

from . import masks
from ._attention import (
    get_num_threads,
    get_weights_memory_limit,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    set_num_threads,
    set_weights_memory_limit,
    threads,
)
from ._engine import core_available
from ._kv_cache import KVCache
from ._layer import MultiHeadAttention

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "core_available",
    "get_num_threads",
    "get_weights_memory_limit",
    "masks",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "set_num_threads",
    "set_weights_memory_limit",
    "threads",
]
