"""Interleaved timing: every contender runs once per round and the reported number is the median.

The machines these benchmarks run on are shared and noisy. When contender A runs for a whole
minute and then B runs, A and B see different machines. Alternating them round by round (and
rotating who goes first) lets both see the same noise, so their ratio holds even when the
absolute times drift.

In rows of slow calls, each sample starts after a short pause. The thread pools of BLAS
libraries (OpenBLAS) and of OpenMP keep spinning for up to ~0.1 s after a call returns, and
without the pause those threads would take cores away from whichever contender runs next.
Rows of fast calls get no pause. Their calls do not wake whole thread pools, and a pause
would let the cores idle, so that the next call pays for waking them. On a virtual machine
that cost can be far larger than the call itself.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Plan", "Timing", "interleave"]

# A single call slower than this is its own warmup: a second warmup call would only cost time.
_SLOW_CALL_S = 2.0
# Rows whose slowest call is faster than this get no settle pause (see the module docstring).
_SETTLE_MIN_CALL_S = 1e-3


@dataclass(frozen=True)
class Plan:
    """How long to spend on one benchmark row.

    Attributes:
        budget_s: wall time the timed rounds of a row should take in total.
        min_repeats: rounds that always run (the median needs a few samples).
        max_repeats: rounds that never run beyond this, however cheap the calls are.
        min_sample_s: a sample loops a fast call until it lasts about this long, so that
            microsecond calls are not just timer noise.
        settle_s: idle pause before each sample, so that the previous contender's spinning
            worker threads have gone to sleep. It applies only to rows whose slowest call
            takes 1 ms or more.
    """

    budget_s: float
    min_repeats: int
    max_repeats: int
    min_sample_s: float
    settle_s: float = 0.12


@dataclass
class Timing:
    """Seconds per call of one contender: the median and the samples it came from."""

    median_s: float
    repeats: int
    calls_per_sample: int
    samples_s: list[float] = field(repr=False)


def _time_calls(call: Callable[[], object], count: int, settle_s: float) -> float:
    if settle_s > 0:
        time.sleep(settle_s)
    start = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - start) / count


def interleave(contenders: dict[str, Callable[[], object]], plan: Plan) -> dict[str, Timing]:
    """Time each zero-argument call in `contenders` in alternating rounds, after warmup.

    Returns a :class:`Timing` per name. Each call is warmed up (twice, unless one call takes
    over 2 s) before the rounds start. The number of rounds is what fits `plan.budget_s`
    (pauses included), clamped to the plan's bounds.
    """
    names = list(contenders)
    per_call = {}
    for name in names:
        first = _time_calls(contenders[name], 1, 0.0)
        if first > _SLOW_CALL_S:
            per_call[name] = first
        else:
            per_call[name] = min(first, _time_calls(contenders[name], 1, 0.0))
    settle_s = plan.settle_s if max(per_call.values()) >= _SETTLE_MIN_CALL_S else 0.0
    calls_per_sample = {
        name: max(1, math.ceil(plan.min_sample_s / max(per_call[name], 1e-9))) for name in names
    }
    round_s = sum(per_call[name] * calls_per_sample[name] + settle_s for name in names)
    repeats = int(min(plan.max_repeats, max(plan.min_repeats, plan.budget_s // max(round_s, 1e-9))))

    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(
                    _time_calls(contenders[name], calls_per_sample[name], settle_s)
                )
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: Timing(
            median_s=statistics.median(samples[name]),
            repeats=repeats,
            calls_per_sample=calls_per_sample[name],
            samples_s=samples[name],
        )
        for name in names
    }
