"""What context costs: timing sweeps over sequence length, fitted growth exponents,
extrapolations to long contexts, and the memory of the naive path beside a tiled kernel's."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import pandas as pd
from threadpoolctl import ThreadpoolController

from . import engine
from .naive import naive_attention
from .text import human_bytes, human_seconds

BYTES_F32 = 4
TARGET_LENGTHS = (2_048, 8_192, 200_000)  # GPT-2, GPT-3.5, today's long-context models
SWEEP_WINDOW = 256
NAIVE = "NumPy naive full"
# Below this length a call's fixed costs (Python, waking threads) weigh as much as its
# arithmetic, so the growth exponent is fitted on longer contexts only.
FIT_MIN_N = 512
# The cost page fits each method on its longest lengths only (two doublings), where the
# arithmetic dominates the fixed costs, and warns about a fit this far from what the exact
# counts of visible pairs predict over the same lengths.
FIT_POINTS = 3
EXPONENT_TOLERANCE = 0.2
# One doubling's time ratio, as a power of two, may stray further: it rests on two points,
# the fit on three.
DOUBLING_TOLERANCE = 0.3
# The default sweep's time on the machine serving the page: it stops lengthening the context
# once the next length would not fit, so a fast machine reaches long contexts and a slow one
# stops early instead of hanging.
SWEEP_SECONDS = 10.0
# The share of a sweep's time spent lengthening the context; the rest times the longest
# points again, in rounds, so that a busy moment does not decide a fit.
LENGTHEN_SHARE = 0.6
RETIME_ROUNDS = 5  # at most this many rounds of re-timing, so a fast machine ends early


class SweepTooLarge(ValueError):
    """A sweep whose inputs alone would not fit the memory budget; the message says why."""


def lengths(shortest: int, longest: int) -> list[int]:
    """Powers of two from `shortest` to `longest` (both rounded to powers of two)."""
    low = 2 ** round(math.log2(max(shortest, 1)))
    high = 2 ** round(math.log2(max(longest, low)))
    return [2**p for p in range(int(math.log2(low)), int(math.log2(high)) + 1)]


def naive_bytes(n: int, heads: int = 1) -> int:
    """Extra memory of the materialised path: the float32 n×n scores and their exponentials."""
    return 2 * heads * n * n * BYTES_F32


def tiled_bytes(n: int, head_dim: int, heads: int = 1) -> int:
    """Memory of q, k, v and the output in float32: all a tiled kernel needs besides a tile."""
    return 4 * heads * n * head_dim * BYTES_F32


def torch_installed() -> bool:
    """Whether PyTorch could be imported (without paying for importing it)."""
    return importlib.util.find_spec("torch") is not None


def _torch_sdpa() -> Callable | None:
    try:
        import torch
        import torch.nn.functional as functional
    except ImportError:
        return None

    def run(q, k, v, is_causal: bool = False):
        with torch.no_grad():
            tq, tk, tv = (torch.from_numpy(a)[None, None] for a in (q, k, v))
            return functional.scaled_dot_product_attention(tq, tk, tv, is_causal=is_causal)

    return run


def methods(include_torch: bool = True) -> dict[str, tuple[Callable, bool]]:
    """Name -> (function(q, k, v), needs n² memory) for every method the sweep can time."""
    name = "attnscope" if engine.compiled_available() else "reference (fallback)"
    materialises = not engine.compiled_available()
    table: dict[str, tuple[Callable, bool]] = {
        f"{name} full": (lambda q, k, v: engine.attention_output(q, k, v), materialises),
        f"{name} causal": (
            lambda q, k, v: engine.attention_output(q, k, v, is_causal=True),
            materialises,
        ),
        f"{name} window {SWEEP_WINDOW}": (
            lambda q, k, v: engine.attention_output(q, k, v, is_causal=True, window=SWEEP_WINDOW),
            materialises,
        ),
        NAIVE: (naive_attention, True),
    }
    torch_sdpa = _torch_sdpa() if include_torch else None
    if torch_sdpa is not None:
        table["PyTorch SDPA full"] = (torch_sdpa, False)
    return table


POINT_SECONDS = 0.04  # the least time one point of a sweep spends repeating its call


def time_call(
    function: Callable[[], object],
    budget_seconds: float = POINT_SECONDS,
    min_repeats: int = 3,
    max_repeats: int = 50,
    give_up_seconds: float | None = None,
) -> float:
    """Best wall time of `function` over repeated calls: fast calls repeat until
    `budget_seconds` have passed (at most `max_repeats` times), slower ones at least
    `min_repeats` times unless that would take over `give_up_seconds` (default: four budgets).
    The best run is the one that other work on the machine disturbed least; the first also
    pays for warming caches."""
    give_up = 4 * budget_seconds if give_up_seconds is None else give_up_seconds
    start = time.perf_counter()
    best = math.inf
    for calls in range(1, max_repeats + 1):
        t0 = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if spent >= budget_seconds and (calls >= min_repeats or spent >= give_up):
            break
    return best


_BLAS = ThreadpoolController()


def time_naive(
    function: Callable[[], object], max_threads: int, give_up_seconds: float | None = None
) -> float:
    """Best time of the NumPy path with its BLAS on one thread and on `max_threads`, never
    more threads than the engine gets. NumPy's BLAS splits a product evenly between its
    threads and waits for the slowest, so on a busy machine more threads can be far slower."""
    best = math.inf
    # Most threads first: BLAS workers keep spinning a while after a call, and the one-thread
    # run gives them time to settle before the next method is timed.
    for threads in sorted({1, max(1, max_threads)}, reverse=True):
        with _BLAS.limit(limits=threads, user_api="blas"):
            best = min(best, time_call(function, give_up_seconds=give_up_seconds))
    return best


def sweep(
    sizes: list[int],
    head_dim: int = 64,
    *,
    memory_budget: int = 256 * 2**20,
    time_limit: float = 2.0,
    include_torch: bool = True,
    progress: Callable[[float, str], None] | None = None,
    seed: int = 0,
    threads: int | None = None,
    total_seconds: float | None = None,
) -> pd.DataFrame:
    """Time every method at every length, each point the best of a few runs (at least three
    unless one run takes over a second). A method stops once its next point would need more
    than `memory_budget` bytes of n² matrices or (judging by growth so far) more than
    `time_limit` seconds. With `total_seconds`, the sweep stops lengthening before a length
    whose points (judged the same way) would pass :data:`LENGTHEN_SHARE` of that time, then
    times each method's longest points again in rounds for the rest of it. Points not run are
    recorded with a status saying why. The NumPy path's BLAS gets at most `threads` threads
    (default: the engine's).

    Returns columns: n, method, seconds, gflops, status.
    """
    if sizes and tiled_bytes(max(sizes), head_dim) > memory_budget:
        raise SweepTooLarge(
            f"q, k, v and the output alone need {tiled_bytes(max(sizes), head_dim) / 2**20:,.0f}"
            f" MiB at n = {max(sizes):,}, above the {memory_budget / 2**20:,.0f} MiB budget: "
            "choose a shorter longest length or a larger budget."
        )
    table = methods(include_torch)
    threads = engine.get_threads() if threads is None else threads
    rng = np.random.default_rng(seed)
    rows = []
    stopped: dict[str, str] = {}
    last_time: dict[str, float] = {}
    steps = len(sizes) * len(table)
    done = 0
    started = time.perf_counter()
    previous_n = None
    for n in sizes:
        if total_seconds is not None and previous_n is not None:
            # Each method still going runs three times, grown as n² since the last length,
            # or for time_call's budget if that is longer. The cheapest go on first, so a
            # window keeps lengthening after full attention has had to stop.
            ahead = sorted(
                (max(POINT_SECONDS, 3 * seconds * (n / previous_n) ** 2), name)
                for name, seconds in last_time.items()
                if name not in stopped and not (table[name][1] and naive_bytes(n) > memory_budget)
            )
            room = LENGTHEN_SHARE * total_seconds - (time.perf_counter() - started)
            for seconds, name in ahead:
                room -= seconds
                if room < 0:
                    stopped[name] = f"skipped: the sweep's {total_seconds:g} s would run out"
        previous_n = n
        q, k, v = (rng.standard_normal((n, head_dim), dtype=np.float32) for _ in range(3))
        for name, (function, materialises) in table.items():
            done += 1
            if progress is not None:
                progress(done / steps, f"{name} at n = {n:,}")
            status = stopped.get(name)
            if status is None and materialises and naive_bytes(n) > memory_budget:
                status = f"skipped: needs {naive_bytes(n) / 2**20:,.0f} MiB for n² matrices"
            if status is None and last_time.get(name, 0.0) * 4.5 > time_limit:
                status = f"skipped: would take about {last_time[name] * 4:.1f} s"
            if status is not None:
                stopped[name] = status
                rows.append({"n": n, "method": name, "seconds": np.nan, "status": status})
                continue
            call = partial(function, q, k, v)
            seconds = (
                time_naive(call, threads, give_up_seconds=1.0)
                if name == NAIVE
                else time_call(call, give_up_seconds=1.0)
            )
            last_time[name] = seconds
            rows.append({"n": n, "method": name, "seconds": seconds, "status": "measured"})
    frame = pd.DataFrame(rows, columns=["n", "method", "seconds", "status"])
    if total_seconds is not None:
        _retime_longest(frame, table, head_dim, started + total_seconds, seed)
    frame["gflops"] = [
        _flops(int(n), head_dim, str(m)) / s / 1e9 if s == s else np.nan
        for n, m, s in zip(frame["n"], frame["method"], frame["seconds"], strict=True)
    ]
    return frame


def _retime_longest(
    frame: pd.DataFrame,
    table: dict[str, tuple[Callable, bool]],
    head_dim: int,
    deadline: float,
    seed: int,
) -> None:
    """Time the longest points of every engine method again, in up to :data:`RETIME_ROUNDS`
    rounds that visit each point once, keeping each point's best time, until the next round
    would end past `deadline` (a perf_counter value). A busy moment on a shared machine
    slows a different point in each round, so the best of the rounds is the least disturbed.
    The NumPy path keeps its own timing (the best of two BLAS thread counts). Changes `frame`
    in place."""
    points = []
    for method, (function, _) in table.items():
        if method == NAIVE:
            continue
        top = _measured(frame, method).iloc[-FIT_POINTS:]
        points += [(index, function, int(n)) for index, n in zip(top.index, top["n"], strict=True)]
    inputs = {}
    for _, _, n in points:
        rng = np.random.default_rng((seed, n))
        inputs[n] = [rng.standard_normal((n, head_dim), dtype=np.float32) for _ in range(3)]
    for _ in range(RETIME_ROUNDS if points else 0):
        # A short call repeats for time_call's budget, a long one runs once.
        round_seconds = sum(
            max(POINT_SECONDS, frame.loc[index, "seconds"]) for index, _, _ in points
        )
        if time.perf_counter() + 1.5 * round_seconds > deadline:
            return
        for index, function, n in points:
            seconds = time_call(partial(function, *inputs[n]), min_repeats=1)
            frame.loc[index, "seconds"] = min(frame.loc[index, "seconds"], seconds)


def _flops(n: int, head_dim: int, method: str) -> float:
    """4·L·S·D for full attention; only the visible pairs for causal and windowed runs."""
    return 4.0 * visible_pairs(n, mask_kind(method)) * head_dim


MASK_KINDS = ("full", "causal", "window")


def mask_kind(method: str) -> str:
    """Which mask a sweep method runs, from its name: "window", "causal" or "full"."""
    if "window" in method:
        return "window"
    return "causal" if "causal" in method else "full"


def visible_pairs(n: int, kind: str, window: int = SWEEP_WINDOW) -> int:
    """The exact number of (query, key) pairs that take part in self-attention over n
    tokens: n² for full attention, n(n+1)/2 for causal, and for a causal window of `window`
    keys each query i sees min(i + 1, window) of them."""
    if n < 0 or int(n) != n:
        raise ValueError(f"n must be a whole number >= 0, got {n}")
    if kind == "full":
        return n * n
    if kind == "causal":
        return n * (n + 1) // 2
    if kind == "window":
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        ramp = min(window, n)  # the first queries see every key before them
        return ramp * (ramp + 1) // 2 + (n - ramp) * window
    raise ValueError(f"kind must be one of {', '.join(MASK_KINDS)}, got {kind!r}")


def fit_exponent(frame: pd.DataFrame, method: str, min_points: int = 3, min_n: int = FIT_MIN_N):
    """Fit ``seconds ≈ c·n^p`` on the measured points of `method` with n ≥ `min_n`, where the
    arithmetic dominates; on the longest `min_points` points when fewer reach `min_n`.
    Returns ``(p, c)``, or None with fewer than `min_points` measured points."""
    measured = frame[(frame["method"] == method) & (frame["status"] == "measured")]
    measured = measured[measured["seconds"] > 0].sort_values("n")
    if len(measured) < min_points:
        return None
    large = measured[measured["n"] >= min_n]
    points = large if len(large) >= min_points else measured.iloc[-min_points:]
    slope, intercept = np.polyfit(np.log(points["n"]), np.log(points["seconds"]), 1)
    return float(slope), float(math.exp(intercept))


def _measured(frame: pd.DataFrame, method: str) -> pd.DataFrame:
    """The measured points of `method` with a positive time, shortest first."""
    rows = frame[(frame["method"] == method) & (frame["status"] == "measured")]
    return rows[rows["seconds"] > 0].sort_values("n")


def seconds_per_pair(
    frame: pd.DataFrame, method: str, points: int = FIT_POINTS
) -> tuple[int, float] | None:
    """``(n, seconds per visible query–key pair)`` of `method`: the least over its `points`
    longest measured lengths, where fixed costs weigh least. Other work on the machine only
    ever adds time, so the least is the best estimate of the work itself (on a tie, the
    longer length). None when the method was never measured."""
    measured = _measured(frame, method).iloc[-points:]
    if measured.empty:
        return None
    kind = mask_kind(method)
    per_pair = [
        (float(seconds) / visible_pairs(int(n), kind), -int(n))
        for n, seconds in zip(measured["n"], measured["seconds"], strict=True)
    ]
    best, negative_n = min(per_pair)
    return -negative_n, best


def growth_table(frame: pd.DataFrame, points: int = FIT_POINTS) -> pd.DataFrame:
    """Per method: the exponent p of ``time ≈ c·nᵖ`` fitted on its `points` longest measured
    lengths, the exponent the exact counts of visible pairs give over the same lengths, the
    measured time ratio when n doubles at the longest length and the ratio the pair counts
    give, and whether both are near what is expected: the fit within
    :data:`EXPONENT_TOLERANCE`, the doubling's ratio within :data:`DOUBLING_TOLERANCE` as a
    power of two. A method with fewer than `points` measured
    lengths has no fit (NaN, ``within`` False)."""
    rows = []
    for method in dict.fromkeys(frame["method"]):
        kind = mask_kind(method)
        measured = _measured(frame, method)
        row = {
            "method": method,
            "fitted on": "too few lengths",
            "fitted p": math.nan,
            "expected p": math.nan,
            "time when n doubles": math.nan,
            "expected ×": math.nan,
            "within": False,
        }
        if len(measured) >= points:
            top = measured.iloc[-points:]
            first, last = int(top["n"].iloc[0]), int(top["n"].iloc[-1])
            fitted, _ = fit_exponent(frame, method, min_points=points, min_n=math.inf)
            expected = math.log(visible_pairs(last, kind) / visible_pairs(first, kind)) / math.log(
                last / first
            )
            row.update(
                {
                    "fitted on": f"n = {first:,}–{last:,}",
                    "fitted p": fitted,
                    "expected p": expected,
                    "within": abs(fitted - expected) <= EXPONENT_TOLERANCE,
                }
            )
            half = measured[measured["n"] == last // 2]
            if len(half):
                doubling = float(top["seconds"].iloc[-1]) / float(half["seconds"].iloc[0])
                expected_doubling = visible_pairs(last, kind) / visible_pairs(last // 2, kind)
                row["time when n doubles"] = doubling
                row["expected ×"] = expected_doubling
                row["within"] = row["within"] and (
                    abs(math.log2(doubling / expected_doubling)) <= DOUBLING_TOLERANCE
                )
        rows.append(row)
    return pd.DataFrame(rows)


def growth_shown(growth: pd.DataFrame) -> pd.DataFrame:
    """:func:`growth_table` as the page shows it: rounded numbers and a verdict per fit."""
    verdicts = [
        "too few lengths to fit"
        if fitted != fitted
        else "as expected"
        if within
        else "⚠ outside the expected range: not used"
        for fitted, within in zip(growth["fitted p"], growth["within"], strict=True)
    ]
    return pd.DataFrame(
        {
            "method": growth["method"],
            "fitted on": growth["fitted on"],
            "fitted p (time ∝ nᵖ)": growth["fitted p"].round(2),
            "expected p": growth["expected p"].round(2),
            "time when n doubles": [_times(r) for r in growth["time when n doubles"]],
            "expected": [_times(r) for r in growth["expected ×"]],
            "fit": verdicts,
        }
    )


def _times(ratio: float) -> str:
    return "—" if ratio != ratio else f"×{ratio:.1f}"


def projections_table(
    frame: pd.DataFrame, targets=TARGET_LENGTHS, memory_budget: int | None = None
) -> pd.DataFrame:
    """Seconds at each target length per method: measured when the sweep reached it, else
    estimated as the measured time per visible query–key pair (:func:`seconds_per_pair`, from
    the method's longest lengths) times the exact number of visible pairs at the target
    (labelled so, with a warning when the method's n² matrices would not fit
    `memory_budget`). No fitted exponent is
    extrapolated: a noisy exponent raised to a 100× longer context would swamp the estimate."""
    materialising = {name for name, (_, needs_n2) in methods(False).items() if needs_n2}
    rows = []
    for method in dict.fromkeys(frame["method"]):
        per_pair = seconds_per_pair(frame, method)
        for n in targets:
            hit = _measured(frame, method)
            hit = hit[hit["n"] == n]
            if len(hit):
                rows.append(
                    {"method": method, "n": n, "seconds": hit["seconds"].iloc[0], "how": "measured"}
                )
            elif per_pair is not None:
                longest, seconds = per_pair
                pairs = visible_pairs(n, mask_kind(method))
                too_big = (
                    method in materialising
                    and memory_budget is not None
                    and naive_bytes(n) > memory_budget
                )
                rows.append(
                    {
                        "method": method,
                        "n": n,
                        "seconds": seconds * pairs,
                        "how": f"estimated: time per pair at n = {longest:,} × {pairs:,} pairs"
                        + (
                            f"; would need {human_bytes(naive_bytes(n))} for its n² matrices"
                            if too_big
                            else ""
                        ),
                    }
                )
    return pd.DataFrame(rows, columns=["method", "n", "seconds", "how"])


def timeline(frame: pd.DataFrame, fitted: dict[str, tuple[float, float] | None]) -> pd.DataFrame:
    """The measured times, then each fitted method extrapolated from its longest measured
    length to every longer target length. Columns: n, method, seconds, kind ("measured" or
    "extrapolated")."""
    measured = frame[frame["status"] == "measured"]
    rows = []
    for method, fit in fitted.items():
        if fit is None:
            continue
        exponent, constant = fit
        last = measured[measured["method"] == method]["n"].max()
        for n in [last, *[t for t in TARGET_LENGTHS if t > last]]:
            rows.append(
                {
                    "n": n,
                    "method": method,
                    "seconds": constant * n**exponent,
                    "kind": "extrapolated",
                }
            )
    columns = ["n", "method", "seconds", "kind"]
    return pd.concat(
        [measured.assign(kind="measured")[columns], pd.DataFrame(rows, columns=columns)]
    )


def estimate_timeline(frame: pd.DataFrame, targets=TARGET_LENGTHS) -> pd.DataFrame:
    """The measured times, then each method's estimate (:func:`projections_table`'s time per
    visible pair) from its longest measured length to every longer target length. Columns:
    n, method, seconds, kind ("measured" or "estimated")."""
    measured = frame[frame["status"] == "measured"]
    rows = []
    for method in dict.fromkeys(frame["method"]):
        per_pair = seconds_per_pair(frame, method)
        if per_pair is None:
            continue
        longest, seconds = per_pair
        kind = mask_kind(method)
        for n in [longest, *[t for t in targets if t > longest]]:
            rows.append(
                {
                    "n": n,
                    "method": method,
                    "seconds": seconds * visible_pairs(n, kind),
                    "kind": "estimated",
                }
            )
    columns = ["n", "method", "seconds", "kind"]
    return pd.concat(
        [measured.assign(kind="measured")[columns], pd.DataFrame(rows, columns=columns)]
    )


def stopped_methods(frame: pd.DataFrame) -> pd.DataFrame:
    """For each method the sweep stopped, the first length it skipped and why (n, method,
    status)."""
    return frame[frame["status"] != "measured"].drop_duplicates("method")[["n", "method", "status"]]


def projections_shown(projections: pd.DataFrame) -> pd.DataFrame:
    """:func:`projections_table` as readable times, methods × target lengths: ``*`` marks an
    estimate, ``†`` one whose n² matrices would not fit the memory budget."""
    times = [
        human_seconds(seconds)
        + ("" if how == "measured" else " *")
        + (" †" if "need" in how else "")
        for seconds, how in zip(projections["seconds"], projections["how"], strict=True)
    ]
    return (
        projections.assign(time=times)
        .pivot(index="method", columns="n", values="time")
        .rename(columns="n = {:,}".format)
    )


def results_csv(frame: pd.DataFrame, projections: pd.DataFrame, **context) -> str:
    """The sweep's rows, then the estimated projections, as CSV; `context` (threads,
    head_dim, engine, ...) becomes constant columns so a file says how it was made."""
    estimated = projections[projections["how"] != "measured"].rename(columns={"how": "status"})
    rows = pd.concat(
        [frame.assign(estimated=False), estimated.assign(estimated=True)],
        ignore_index=True,
    )
    return rows.assign(**context).to_csv(index=False)


def memory_frame(sizes: list[int], head_dim: int) -> pd.DataFrame:
    """Bytes of the naive path's n² matrices vs a tiled kernel's inputs and output."""
    rows = []
    for n in sizes:
        rows.append({"n": n, "path": "naive: n×n scores + weights", "MiB": naive_bytes(n) / 2**20})
        rows.append(
            {"n": n, "path": "tiled: q, k, v, output", "MiB": tiled_bytes(n, head_dim) / 2**20}
        )
    return pd.DataFrame(rows)
