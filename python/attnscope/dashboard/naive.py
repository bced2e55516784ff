"""The textbook attention the cost page times, which lives with the reference as
:func:`attnscope.reference.naive_attention` (the benchmarks import it from there)."""

from __future__ import annotations

from ..reference import naive_attention

__all__ = ["naive_attention"]
