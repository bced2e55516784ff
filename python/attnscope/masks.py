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
#: one level. The engine refuses deeper specs too.
MAX_DEPTH = 1024
#: The most patterns and operators one expression may hold (``m = m & m`` doubles it).
MAX_NODES = 1 << 16
# The largest size, distance or position: the engine indexes with 64-bit integers.
_LARGEST = 2**63 - 1


class Mask:
    """An immutable mask expression. Build it with this module's functions; combine with
    ``&``, ``|`` and ``~``. Two masks are equal when they are the same expression.

    Combining is constant time: the text of :func:`repr` is written only when asked for, and
    equality and the text are computed without recursion, so no depth allowed here reaches
    Python's recursion limit. An expression deeper than :data:`MAX_DEPTH` or with more than
    :data:`MAX_NODES` patterns and operators is refused when it is built."""

    __slots__ = ("_spec", "_text", "_children", "_depth", "_nodes", "_hash")

    def __init__(self, spec: tuple, text: str):
        # A pattern: its spec for the engine and its text, both small.
        for name, value in (
            ("_spec", spec),
            ("_text", text),
            ("_children", ()),
            ("_depth", 1),
            ("_nodes", 1),
            ("_hash", hash(text)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def _combine(cls, operator: str, *children: Mask) -> Mask:
        """``operator`` ("and", "or" or "not") over ``children``, checked against the limits."""
        depth = 1 + max(child._depth for child in children)
        if depth > MAX_DEPTH:
            raise ValueError(
                f"mask expression would be {depth} levels deep; at most MAX_DEPTH = {MAX_DEPTH} "
                "levels of & | ~ nesting are allowed (combine patterns as a balanced tree, "
                "e.g. pairwise, instead of a long chain)"
            )
        nodes = 1 + sum(child._nodes for child in children)
        if nodes > MAX_NODES:
            raise ValueError(
                f"mask expression would hold {nodes} patterns and operators; at most "
                f"MAX_NODES = {MAX_NODES} are allowed"
            )
        mask = object.__new__(cls)
        for name, value in (
            ("_spec", (operator, *(child._spec for child in children))),
            ("_text", None),  # written by __repr__ when first asked for
            ("_children", children),
            ("_depth", depth),
            ("_nodes", nodes),
            ("_hash", hash((operator, *(child._hash for child in children)))),
        ):
            object.__setattr__(mask, name, value)
        return mask

    def __setattr__(self, name, value):
        raise AttributeError("a mask expression is immutable; combine masks to make a new one")

    def __delattr__(self, name):
        raise AttributeError("a mask expression is immutable")

    def __repr__(self) -> str:
        if self._text is None:
            object.__setattr__(self, "_text", _expression_text(self))
        return self._text

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Mask._combine("and", self, other)

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Mask._combine("or", self, other)

    def __invert__(self) -> Mask:
        return Mask._combine("not", self)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return self._hash == other._hash and _same_spec(self._spec, other._spec)

    def __hash__(self) -> int:
        return self._hash

    def __bool__(self):
        raise TypeError("a mask expression has no truth value; use & | ~ to combine masks")

    def to_dense(self, num_queries: int, num_keys: int) -> np.ndarray:
        """The ``(L, S)`` bool matrix of visible pairs (True = may attend).

        Raises:
            ValueError: negative sizes, or a pattern that does not fit them (document ids or
                a ``from_array`` mask of another length).
        """
        num_queries = _count(num_queries, "num_queries")
        num_keys = _count(num_keys, "num_keys")
        return core().mask_to_dense(self._spec, num_queries, num_keys)

    def dense_rows(self, num_queries: int, num_keys: int, rows) -> np.ndarray:
        """Rows ``rows`` (query indices) of :meth:`to_dense`, without building the rest: a
        sample of a mask too long to hold, ``(len(rows), S)``."""
        num_queries = _count(num_queries, "num_queries")
        num_keys = _count(num_keys, "num_keys")
        picked = _positions(rows, "rows")
        if (picked < 0).any():
            raise ValueError(f"rows must be >= 0, got {int(picked.min())}")
        return core().mask_dense_rows(self._spec, num_queries, num_keys, picked.tolist())

    def layout(self, num_queries: int, num_keys: int, *, block: int = 64) -> MaskLayout:
        """Which ``block x block`` tiles of the ``(L, S)`` matrix are empty, partial or full,
        and the fraction of visible pairs (counted exactly).

        The engine's own tiles are 64 queries by 256 keys; any ``block`` shows the same picture
        at another grain.
        """
        num_queries = _count(num_queries, "num_queries")
        num_keys = _count(num_keys, "num_keys")
        block = _count(block, "block", minimum=1)
        states, visible = core().mask_layout(self._spec, num_queries, num_keys, block)
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


_OPERATOR_SYMBOLS = {"and": " & ", "or": " | "}


def _expression_text(mask: Mask) -> str:
    """The text of an expression, written with an explicit stack (no recursion): each pattern
    as its constructor call, ``&`` and ``|`` in parentheses, ``~`` as a prefix."""
    pieces: list[str] = []
    pending: list[Mask | str] = [mask]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            pieces.append(item)
        elif item._text is not None:
            pieces.append(item._text)
        elif item._spec[0] == "not":
            pending += [item._children[0], "~"]
        else:
            left, right = item._children
            pending += [")", right, _OPERATOR_SYMBOLS[item._spec[0]], left, "("]
    return "".join(pieces)


def _same_spec(a, b) -> bool:
    """Whether two specs are the same expression, compared with an explicit stack."""
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if a is b:
            continue
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            if not (
                isinstance(a, np.ndarray)
                and isinstance(b, np.ndarray)
                and a.shape == b.shape
                and bool(np.array_equal(a, b))
            ):
                return False
        elif isinstance(a, tuple) and isinstance(b, tuple):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif type(a) is not type(b) or a != b:
            return False
    return True


def _count(value, name: str, minimum: int = 0, maximum: int = _LARGEST) -> int:
    """A whole number (not a bool) from `minimum` to `maximum`."""
    return whole_number(value, name, low=minimum, high=maximum)


def _alignment(alignment) -> bool:
    """Whether `alignment` is bottom-right."""
    if alignment not in ("top_left", "bottom_right") or not isinstance(alignment, str):
        raise ValueError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    return alignment == "bottom_right"


def _positions(values, name: str) -> np.ndarray:
    """A read-only 1-D int64 copy of integer `values` (a list, range or integer array); values
    outside int64 are refused rather than wrapped."""
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
    copy = np.ascontiguousarray(array, dtype=np.int64).copy()
    copy.setflags(write=False)
    return copy


def causal(alignment: str = "top_left") -> Mask:
    """Key ``j`` is visible to query ``i`` iff ``j <= c(i)`` (the past and the present)."""
    bottom_right = _alignment(alignment)
    text = "causal()" if not bottom_right else "causal(alignment='bottom_right')"
    return Mask(("causal", bottom_right), text)


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
    bottom_right = _alignment(alignment)
    text = f"window({sides[0]}, {sides[1]}"
    text += ", alignment='bottom_right')" if bottom_right else ")"
    return Mask(("window", sides[0], sides[1], bottom_right), text)


def prefix_lm(prefix_len: int) -> Mask:
    """Prefix-LM (T5, PaLM): every query sees the first ``prefix_len`` keys (a bidirectional
    prefix) and the keys up to itself: visible iff ``j < prefix_len or j <= i``."""
    prefix_len = _count(prefix_len, "prefix_len")
    return Mask(("prefix_lm", prefix_len), f"prefix_lm({prefix_len})")


def document(ids, kv_ids=None) -> Mask:
    """Packed sequences: visible iff ``ids[i] == kv_ids[j]`` (query and key in the same
    document). ``kv_ids`` defaults to ``ids`` (then ``L == S``). With :func:`causal` this is
    training or prefill on packed documents without padding.

    ``ids`` must have ``L`` entries and ``kv_ids`` ``S``; that is checked when the mask is used.
    Sorted ids (documents one after another) let whole tiles be skipped or taken.
    """
    query_ids = _positions(ids, "ids")
    key_ids = None if kv_ids is None else _positions(kv_ids, "kv_ids")
    text = f"document({_short(query_ids)}"
    text += ")" if key_ids is None else f", kv_ids={_short(key_ids)})"
    return Mask(("document", query_ids, key_ids), text)


def global_tokens(positions) -> Mask:
    """Longformer's global attention: the tokens at ``positions`` see every key and every
    query sees them: visible iff ``i in positions or j in positions``.

    Each position must be a query or a key of the call (``< max(L, S)``); one past both is
    refused when the mask is used."""
    array = _positions(positions, "positions")
    if (array < 0).any():
        raise ValueError(f"positions must be >= 0, got {int(array.min())}")
    unique = np.unique(array)
    unique.setflags(write=False)
    return Mask(("global_tokens", unique), f"global_tokens({_short(unique)})")


def sinks(n: int) -> Mask:
    """Attention sinks (StreamingLLM): the first ``n`` keys are visible to every query:
    visible iff ``j < n``."""
    n = _count(n, "n")
    return Mask(("sinks", n), f"sinks({n})")


def strided(stride: int) -> Mask:
    """The Sparse Transformer's strided pattern: visible iff ``(i - j) % stride == 0`` (every
    ``stride``-th key counting back from the query). Combine with :func:`causal` and a
    :func:`window` of ``stride`` keys for the paper's strided attention."""
    stride = _count(stride, "stride", minimum=1)
    return Mask(("strided", stride), f"strided({stride})")


def fixed(block: int, summary: int = 1) -> Mask:
    """The Sparse Transformer's fixed pattern: queries see their own block of ``block``
    positions, and the last ``summary`` positions of every block act as summaries anyone may
    read: visible iff ``i // block == j // block or j % block >= block - summary``."""
    block = _count(block, "block", minimum=1)
    summary = _count(summary, "summary")
    if summary > block:
        raise ValueError(f"summary must be <= block ({block}), got {summary}")
    return Mask(("fixed", block, summary), f"fixed({block}, summary={summary})")


def dilated(window: int, dilation: int) -> Mask:
    """A dilated sliding window (Longformer): visible iff ``|i - j| <= window`` and
    ``|i - j| % dilation == 0``."""
    window = _count(window, "window")
    dilation = _count(dilation, "dilation", minimum=1)
    return Mask(("dilated", window, dilation), f"dilated({window}, {dilation})")


def random_blocks(block: int, per_row: int, seed: int = 0) -> Mask:
    """BigBird's random attention: split queries and keys into blocks of ``block``; each query
    block sees ``per_row`` distinct key blocks drawn from ``seed`` (all of them when there are
    fewer). The draw depends only on the seed, the query block and the number of key blocks,
    so it is the same on every machine and every call."""
    block = _count(block, "block", minimum=1)
    per_row = _count(per_row, "per_row")
    seed = _count(seed, "seed", maximum=2**64 - 1)
    return Mask(
        ("random_blocks", block, per_row, seed),
        f"random_blocks({block}, {per_row}, seed={seed})",
    )


def from_array(mask) -> Mask:
    """Any ``(L, S)`` bool matrix (True = may attend), copied: the escape hatch for patterns
    the others cannot express. Its shape must be the call's ``(L, S)``."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask must be a numpy.ndarray of bools, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (L, S), got shape {mask.shape}")
    copy = np.ascontiguousarray(mask).copy()
    copy.setflags(write=False)
    return Mask(("array", copy), f"from_array(<{copy.shape[0]}x{copy.shape[1]} bool>)")


def _short(values: np.ndarray) -> str:
    """A list for a repr, cut short when long."""
    if values.size <= 8:
        return str(values.tolist())
    head = ", ".join(str(v) for v in values[:4].tolist())
    return f"[{head}, ... ({values.size} values)]"
