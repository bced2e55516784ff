"""`KVCache`: the past keys and values of token-by-token decoding. Argument checks here, the
work in Rust."""

from __future__ import annotations

import numpy as np

from ._attention import check_window, context_threads
from ._checks import array_of, float_dtype, whole_number
from ._engine import core, core_available
from .masks import Mask

__all__ = ["KVCache"]


#: The storages a float32 cache can keep its keys and values in, as the engine lists them (a
#: float64 cache keeps float64). Empty without the engine, where no cache can be made.
STORAGES: tuple[str, ...] = core().STORAGES if core_available() else ()


class KVCache:
    """The keys and values of the tokens generated so far, for decoding one token at a time.

    Holds keys and values of shape ``(batch, num_kv_heads, len, head_dim)`` in buffers with
    spare room; when the room runs out it at least doubles, so a long generation copies each
    key a bounded number of times (no O(n²) copying). Attention reads the buffers in place.

    Args:
        num_kv_heads: key/value heads held.
        head_dim: width of each head.
        batch: sequences decoded side by side.
        dtype: ``numpy.float32`` or ``numpy.float64``: the compute dtype of ``append``,
            ``attend`` and their results.
        capacity: tokens to make room for up front (``None``: grow as needed).
        storage: how keys and values are kept. ``None`` or the dtype's name: as given.
            For float32 caches also ``"bfloat16"``, ``"float16"`` (2 bytes a value) or
            ``"int8"`` (blocks of 32 values sharing one float32 scale, ``max|x|/127``, per
            token and head: 1.125 bytes a value). ``append`` converts once; attention reads
            the stored values and accumulates in float32. A float64 cache stores float64.
        max_len: keep at most this many tokens (``None``: unbounded). Once full, the oldest
            tokens after the first ``sinks`` are evicted, as StreamingLLM does.
        sinks: the first tokens a bounded cache never evicts (``0 <= sinks <= max_len``).

    Positions: the cache stores keys exactly as given (rotated by the caller, if the model
    rotates them), and the queries of ``attend`` see the kept tokens with bottom-right causal
    alignment: the ``L`` queries are the last ``L`` kept tokens.

    Example::

        cache = attnscope.KVCache(8, 64, storage="int8", max_len=4096, sinks=4)
        cache.append(k, v)                 # (1, 8, n, 64) each
        out = cache.attend(q)              # (1, 8, L, 64); query i sees keys <= len - L + i
    """

    def __init__(
        self,
        num_kv_heads,
        head_dim,
        *,
        batch=1,
        dtype=np.float32,
        capacity=None,
        storage=None,
        max_len=None,
        sinks=0,
    ):
        self._dtype = float_dtype(dtype)
        if storage is None:
            storage = str(self._dtype)
        elif not isinstance(storage, str):
            raise TypeError(f"storage must be a str or None, got {type(storage).__name__}")
        self._core = core().KvCacheCore(
            whole_number(num_kv_heads, "num_kv_heads", low=1),
            whole_number(head_dim, "head_dim", low=1),
            whole_number(batch, "batch", low=1),
            str(self._dtype),
            0 if capacity is None else whole_number(capacity, "capacity", low=0),
            storage,
            None if max_len is None else whole_number(max_len, "max_len", low=1),
            whole_number(sinks, "sinks", low=0),
        )

    @property
    def storage(self) -> str:
        """How keys and values are kept: ``"float32"``, ``"float64"``, ``"bfloat16"``,
        ``"float16"`` or ``"int8"``."""
        return self._core.storage

    @property
    def max_len(self) -> int | None:
        """The most tokens kept (``None``: unbounded)."""
        return self._core.max_len

    @property
    def sinks(self) -> int:
        """The first tokens a bounded cache never evicts."""
        return self._core.sinks

    @property
    def num_kv_heads(self) -> int:
        return self._core.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self._core.head_dim

    @property
    def batch(self) -> int:
        return self._core.batch

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held, in their storage: ``2 · batch · num_kv_heads ·
        len`` rows of ``head_dim`` values (int8 rows count their block scales; the spare room
        is not counted, see :attr:`capacity`)."""
        return self._core.nbytes

    @property
    def capacity(self) -> int:
        """Rows allocated per head: tokens that fit before the buffers grow (a bounded cache
        never grows past ``max_len + (max_len - sinks)`` rows)."""
        return self._core.capacity

    def __len__(self) -> int:
        """Tokens held."""
        return len(self._core)

    def __repr__(self) -> str:
        return (
            f"KVCache(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"batch={self.batch}, dtype={self.dtype}, storage={self.storage!r}, "
            f"max_len={self.max_len}, sinks={self.sinks}, len={len(self)})"
        )

    def append(self, k, v) -> None:
        """Appends ``k`` and ``v``, each ``(batch, num_kv_heads, n, head_dim)``, converted to
        the storage (a long chunk's heads on the worker threads of :func:`threads` or
        :func:`set_num_threads`). A bounded cache then keeps its sinks and most recent tokens
        (of a chunk longer than fits, only its last ones).

        Raises:
            TypeError: not arrays of the cache's dtype.
            ValueError: shapes that do not fit the cache, or ``k`` and ``v`` of different
                lengths. The cache is left exactly as it was.
        """
        k = array_of(k, "k", self._dtype, (4,))
        v = array_of(v, "v", self._dtype, (4,))
        self._core.append(k, v, context_threads())

    def attend(self, q, *, scale=None, window=None, enable_gqa=False, attn_mask=None) -> np.ndarray:
        """Attention of the newest ``L`` tokens' queries over the whole cache.

        Args:
            q: ``(batch, num_heads, L, head_dim)``; the ``L`` queries are the last ``L``
                tokens appended, so query ``i`` sees keys ``j <= len - L + i`` (bottom-right
                causal alignment).
            scale: multiplies ``Q·Kᵀ``; defaults to ``1/sqrt(head_dim)``.
            window: ``w`` keeps each query's ``w`` most recent keys; ``(left, right)`` as in
                :func:`attnscope.scaled_dot_product_attention`.
            enable_gqa: allow ``num_heads`` to be a multiple of ``num_kv_heads``.
            attn_mask: an :mod:`attnscope.masks` expression over the ``(L, len)`` queries
                and keys, intersected with the causal rule (``M.sinks(4) | M.window(1023, 0,
                alignment="bottom_right")`` keeps StreamingLLM's keys).

        Returns:
            ``(batch, num_heads, L, head_dim)`` in the cache's dtype.
        """
        q = array_of(q, "q", self._dtype, (4,))
        if attn_mask is not None and not isinstance(attn_mask, Mask):
            raise TypeError(
                "attn_mask must be an attnscope.masks expression or None, got "
                f"{type(attn_mask).__name__}"
            )
        return self._core.attend(
            q,
            scale,
            None if window is None else check_window(window),
            enable_gqa,
            context_threads(),
            None if attn_mask is None else attn_mask._expr,
        )

    def reset(self) -> None:
        """Forgets every token (the buffers are kept for the next sequence)."""
        self._core.reset()
