"""Mask expressions: sparse attention patterns the engine evaluates a tile at a time.

A mask says which key ``j`` each query ``i`` may see. Build one from the patterns below,
combine them with ``&`` (both), ``|`` (either) and ``~`` (not), and pass it as ``attn_mask=`` to
:func:`attnscope.scaled_dot_product_attention`. The engine never builds the ``L x S`` matrix:
it sorts each tile of (query rows, keys) into empty (skipped), full (no per-pair check) or
partial (checked pair by pair), so the cost follows the visible pairs. ``to_dense`` and
``layout`` run the same code, for teaching and testing.

Example::

    from attnscope import masks as M
    longformer = M.causal() & (M.window(511, 0) | M.global_tokens(range(16)))
    out = ats.scaled_dot_product_attention(q, k, v, attn_mask=longformer)

Positions are indices into the queries (``i``, ``0 <= i < L``) and keys (``j``, ``0 <= j < S``).
``c(i)`` is the diagonal: ``i`` for ``alignment="top_left"`` and ``i + S - L`` for
``"bottom_right"``, as in :func:`attnscope.scaled_dot_product_attention`.

Limits, each refused with a ``ValueError`` that names what was too large:

- Every size and distance is an int from 0 to ``2**63 - 1`` (the engine's index range), and so
  is every position and document id; a larger value is refused when the pattern is built, the
  window's sides included (``None`` is the unbounded side). ``random_blocks``' seed takes any
  value below ``2**64``.
- An expression may nest ``&``, ``|`` and ``~`` at most :data:`MAX_DEPTH` (1024) levels deep,
  a single pattern being one level, and hold at most :data:`MAX_NODES` patterns and operators
  in all. Both are checked when the expression is built, so the engine's evaluation never goes
  deeper. A long chain such as ``functools.reduce(operator.or_, patterns)`` is one level per
  pattern; combining pairwise (a balanced tree) keeps thousands of patterns a few levels deep.
- ``global_tokens`` positions must be queries or keys of the call: a position past both ``L``
  and ``S`` is refused when the mask is used, since it names no token. (``sinks(n)`` and
  ``window`` larger than the sequence mean "all of it" instead, as their sizes are counts and
  distances, not tokens.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import is_whole_number, whole_number
from ._engine import core

__all__ = [
    "EMPTY",
    "FULL",
    "MAX_DEPTH",
    "MAX_NODES",
    "PARTIAL",
    "Mask",
    "MaskLayout",
    "causal",
    "dilated",
    "document",
    "fixed",
    "from_array",
    "global_tokens",
    "prefix_lm",
    "random_blocks",
    "sinks",
    "strided",
    "window",
]

#: Tile states of :class:`MaskLayout`.
EMPTY, PARTIAL, FULL = 0, 1, 2

#: The deepest expression allowed: levels of ``&``, ``|`` and ``~`` nesting, a pattern being
#: one level (the engine's ``MAX_MASK_DEPTH``).
MAX_DEPTH = 1024
#: The most patterns and operators one expression may hold (``m = m & m`` doubles it).
MAX_NODES = 1 << 16
# The largest size, distance or position: the engine indexes with 64-bit integers.
_LARGEST = 2**63 - 1


class Mask:
    """An immutable mask expression. Build it with this module's functions; combine with
    ``&``, ``|`` and ``~``. Two masks are equal when they are the same expression.

    The expression lives in the engine (``_expr``, an ``attnscope._core.MaskExpr``), which
    shares the operands of ``&``, ``|`` and ``~`` rather than copying them: combining is
    constant time, and equality and the text of :func:`repr` are computed without recursion,
    so no depth allowed here reaches Python's recursion limit. An expression deeper than
    :data:`MAX_DEPTH` or with more than :data:`MAX_NODES` patterns and operators is refused
    when it is built."""

    __slots__ = ("_expr",)

    def __init__(self, expr):
        """Wraps the engine's expression `expr`; this module's functions build them."""
        object.__setattr__(self, "_expr", expr)

    def __setattr__(self, name, value):
        raise AttributeError("a mask expression is immutable; combine masks to make a new one")

    def __delattr__(self, name):
        raise AttributeError("a mask expression is immutable")

    def __repr__(self) -> str:
        """Each pattern as the call that builds it, ``&`` and ``|`` in parentheses, ``~`` as a
        prefix: ``(causal() & ~sinks(4))``."""
        return repr(self._expr)

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Mask(self._expr & other._expr)

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Mask(self._expr | other._expr)

    def __invert__(self) -> Mask:
        return Mask(~self._expr)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self._expr == other._expr

    def __hash__(self) -> int:
        return hash(self._expr)

    def __bool__(self):
        raise TypeError("a mask expression has no truth value; use & | ~ to combine masks")

    @property
    def _nodes(self) -> int:
        """Patterns and operators in the expression (a shared operand counted each time)."""
        return self._expr.nodes

    def to_dense(self, num_queries: int, num_keys: int) -> np.ndarray:
        """The ``(L, S)`` bool matrix of visible pairs (True = may attend).

        Raises:
            ValueError: negative sizes, or a pattern that does not fit them (document ids or
                a ``from_array`` mask of another length).
        """
        return self._expr.to_dense(_count(num_queries, "num_queries"), _count(num_keys, "num_keys"))

    def dense_rows(self, num_queries: int, num_keys: int, rows) -> np.ndarray:
        """Rows ``rows`` (query indices) of :meth:`to_dense`, without building the rest: a
        sample of a mask too long to hold, ``(len(rows), S)``."""
        num_queries = _count(num_queries, "num_queries")
        num_keys = _count(num_keys, "num_keys")
        return self._expr.dense_rows(num_queries, num_keys, _positions(rows, "rows"))

    def layout(self, num_queries: int, num_keys: int, *, block: int = 64) -> MaskLayout:
        """Which ``block x block`` tiles of the ``(L, S)`` matrix are empty, partial or full,
        and the fraction of visible pairs (counted exactly).

        The engine's own tiles are 64 queries by 256 keys; any ``block`` shows the same picture
        at another grain.
        """
        num_queries = _count(num_queries, "num_queries")
        num_keys = _count(num_keys, "num_keys")
        block = _count(block, "block")
        states, visible = self._expr.layout(num_queries, num_keys, block)
        states.setflags(write=False)
        return MaskLayout(states, block, num_queries, num_keys, int(visible))


@dataclass(frozen=True)
class MaskLayout:
    """The tiles of a mask at sizes ``(L, S)``.

    Attributes:
        states: ``(ceil(L / block), ceil(S / block))`` uint8 array: :data:`EMPTY` (0, no
            visible pair: skipped), :data:`PARTIAL` (1, some visible: checked pair by pair) or
            :data:`FULL` (2, all visible: computed without checks).
        block: tile side.
        num_queries, num_keys: ``L`` and ``S``.
        visible_pairs: the exact number of visible (query, key) pairs.
    """

    states: np.ndarray
    block: int
    num_queries: int
    num_keys: int
    visible_pairs: int

    @property
    def visible_fraction(self) -> float:
        """Visible pairs over all ``L·S`` pairs (0.0 for an empty matrix)."""
        total = self.num_queries * self.num_keys
        return self.visible_pairs / total if total else 0.0

    def counts(self) -> dict[str, int]:
        """How many tiles are empty, partial and full."""
        return {
            name: int((self.states == state).sum())
            for name, state in (("empty", EMPTY), ("partial", PARTIAL), ("full", FULL))
        }


def _count(value, name: str) -> int:
    """A whole number within the engine's index range (the patterns check their own bounds)."""
    return whole_number(value, name, low=0, high=_LARGEST)


def _positions(values, name: str) -> np.ndarray:
    """Integer `values` (a list, range or integer array) as a 1-D int64 array; values outside
    int64 are refused rather than wrapped. The engine keeps its own copy."""
    if isinstance(values, np.ndarray):
        array = values
        if array.dtype == np.bool_ or not (
            array.size == 0 or np.issubdtype(array.dtype, np.integer)
        ):
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    else:
        # Python ints as they are: NumPy would turn one past int64 into uint64, float or object.
        array = np.asarray(list(values) if isinstance(values, range) else values, dtype=object)
        for value in array.flat:
            if not is_whole_number(value):
                raise TypeError(f"{name} must hold integers, got {type(value).__name__}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and (int(array.max()) > _LARGEST or int(array.min()) < -_LARGEST - 1):
        outside = int(array.max()) if int(array.max()) > _LARGEST else int(array.min())
        raise ValueError(f"{name} must hold values within int64 (<= 2**63 - 1), got {outside}")
    return np.asarray(array, dtype=np.int64)


def causal(alignment: str = "top_left") -> Mask:
    """Key ``j`` is visible to query ``i`` iff ``j <= c(i)`` (the past and the present)."""
    return Mask(core().MaskExpr.causal(alignment))


def window(left, right=..., *, alignment: str = "top_left") -> Mask:
    """Keys within a band around the diagonal: visible iff ``c(i) - left <= j <= c(i) + right``.

    ``left`` and ``right`` are distances (ints >= 0), or None for an unbounded side; ``right``
    left out means the same as ``left``. ``window(w - 1)`` is SDPA's ``window=w``;
    ``causal() & window(511, 0)`` keeps the 512 most recent keys (Mistral's sliding window).
    """
    sides = []
    for side, label in ((left, "left"), (left if right is ... else right, "right")):
        if side is None:
            sides.append(None)
        elif not is_whole_number(side):
            raise TypeError(f"window {label} must be an int >= 0 or None, got {side!r}")
        elif side < 0:
            raise ValueError(f"window {label} must be >= 0 or None, got {side}")
        elif side > _LARGEST:
            raise ValueError(
                f"window {label} must be <= 2**63 - 1, got {side}; use None for no bound"
            )
        else:
            sides.append(int(side))
    return Mask(core().MaskExpr.window(sides[0], sides[1], alignment))


def prefix_lm(prefix_len: int) -> Mask:
    """Prefix-LM (T5, PaLM): every query sees the first ``prefix_len`` keys (a bidirectional
    prefix) and the keys up to itself: visible iff ``j < prefix_len or j <= i``."""
    return Mask(core().MaskExpr.prefix_lm(_count(prefix_len, "prefix_len")))


def document(ids, kv_ids=None) -> Mask:
    """Packed sequences: visible iff ``ids[i] == kv_ids[j]`` (query and key in the same
    document). ``kv_ids`` defaults to ``ids`` (then ``L == S``). With :func:`causal` this is
    training or prefill on packed documents without padding.

    ``ids`` must have ``L`` entries and ``kv_ids`` ``S``; that is checked when the mask is used.
    Sorted ids (documents one after another) let whole tiles be skipped or taken.
    """
    query_ids = _positions(ids, "ids")
    key_ids = None if kv_ids is None else _positions(kv_ids, "kv_ids")
    return Mask(core().MaskExpr.document(query_ids, key_ids))


def global_tokens(positions) -> Mask:
    """Longformer's global attention: the tokens at ``positions`` see every key and every
    query sees them: visible iff ``i in positions or j in positions``.

    Each position must be a query or a key of the call (``< max(L, S)``); one past both is
    refused when the mask is used."""
    return Mask(core().MaskExpr.global_tokens(_positions(positions, "positions")))


def sinks(n: int) -> Mask:
    """Attention sinks (StreamingLLM): the first ``n`` keys are visible to every query:
    visible iff ``j < n``."""
    return Mask(core().MaskExpr.sinks(_count(n, "n")))


def strided(stride: int) -> Mask:
    """The Sparse Transformer's strided pattern: visible iff ``(i - j) % stride == 0`` (every
    ``stride``-th key counting back from the query). Combine with :func:`causal` and a
    :func:`window` of ``stride`` keys for the paper's strided attention."""
    return Mask(core().MaskExpr.strided(_count(stride, "stride")))


def fixed(block: int, summary: int = 1) -> Mask:
    """The Sparse Transformer's fixed pattern: queries see their own block of ``block``
    positions, and the last ``summary`` positions of every block act as summaries anyone may
    read: visible iff ``i // block == j // block or j % block >= block - summary``."""
    return Mask(core().MaskExpr.fixed(_count(block, "block"), _count(summary, "summary")))


def dilated(window: int, dilation: int) -> Mask:
    """A dilated sliding window (Longformer): visible iff ``|i - j| <= window`` and
    ``|i - j| % dilation == 0``."""
    return Mask(core().MaskExpr.dilated(_count(window, "window"), _count(dilation, "dilation")))


def random_blocks(block: int, per_row: int, seed: int = 0) -> Mask:
    """BigBird's random attention: split queries and keys into blocks of ``block``; each query
    block sees ``per_row`` distinct key blocks drawn from ``seed`` (all of them when there are
    fewer). The draw depends only on the seed, the query block and the number of key blocks,
    so it is the same on every machine and every call."""
    block = _count(block, "block")
    per_row = _count(per_row, "per_row")
    seed = whole_number(seed, "seed", low=0, high=2**64 - 1)
    return Mask(core().MaskExpr.random_blocks(block, per_row, seed))


def from_array(mask) -> Mask:
    """Any ``(L, S)`` bool matrix (True = may attend), copied: the escape hatch for patterns
    the others cannot express. Its shape must be the call's ``(L, S)``."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy.ndarray of bools, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (L, S), got shape {mask.shape}")
    return Mask(core().MaskExpr.from_array(mask))
