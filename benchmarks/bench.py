"""attnscope against NumPy and torch: one process, same thread count, interleaved runs, medians.

    python benchmarks/bench.py                 # full sizes: a few minutes on 2 cores
    python benchmarks/bench.py --quick         # smaller sizes: well under a minute
    python benchmarks/bench.py --threads 1 --rows dense,decode --no-write
    python benchmarks/bench.py --isa avx2 --rows dense,backward   # every contender at AVX2

It first prints the machine's measured limits (SGEMM rate, memory read bandwidth). Then it
prints one table row per case with the case's target and verdict, and writes the result files
(unless ``--no-write``): ``benchmarks/results/latest.json`` and ``latest.md`` for a full run of
every row, which then regenerates the docs' tables; ``latest-LEVEL`` for a run held to one
instruction set; ``quick``, ``smoke`` or ``partial`` otherwise (see
:func:`report.results_stem`). Every row also checks attnscope's output against the float64
reference. A row whose error exceeds ``ERROR_TOLERANCE`` fails, however fast it is.

``--isa LEVEL`` holds the engine's kernels to LEVEL and torch to the matching limits, which
are environment variables torch reads when it is imported (see :mod:`instruction_sets`); the
SGEMM roof is then measured at LEVEL too. A level this CPU cannot run is refused (exit 2).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import attnscope as ats
import instruction_sets
import limits
import numpy as np
import peak_memory
import peers
import report
from attnscope import reference
from report import Row
from timing import Plan, Timing, interleave

__all__ = ["GROUPS", "PRESETS", "Benchmark", "Preset", "main", "run"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets, fixed for the full sizes. DENSE_TARGETS holds (full, causal) per Preset.dense entry.
DENSE_TARGETS = ((1.0, 1.15), (1.0, 1.0))
WINDOW_TARGET = 20.0  # x torch, which has no window argument and gets the same bool mask
DOUBLING_TARGET = 2.1  # at most this much more time when L doubles under a fixed window
DECODE_TARGET = 1.8  # x torch
DECODE_BANDWIDTH_TARGET = 0.9  # fraction of the measured memory read bandwidth
# Speed-up of a decoding step over float32 storage, per compressed KV-cache storage.
STORAGE_TARGETS = {"bfloat16": 1.8, "float16": 1.8, "int8": 3.0}
TINY_TARGET = 2.0  # x torch, per call
SCALING_TARGET = 1.8  # speed-up from 1 to 2 threads
PEAK_MEMORY_TARGET_MIB = 64.0  # beyond inputs and output
MHA_TARGET = 1.0  # x nn.MultiheadAttention
# Sparse masks: (x torch with the equivalent dense bool mask) per pattern, and times relative
# to attnscope's own dense-free equivalents (at most).
SPARSE_TORCH_TARGETS = {"longformer": 25.0, "documents": 12.0, "bigbird": 10.0}
LONGFORMER_WINDOW_TARGET = 1.3  # x plain window=512
SINKS_WINDOW_TARGET = 1.2  # x window alone
DOCUMENTS_SEPARATE_TARGET = 1.3  # x the documents as separate calls
SCORE_MOD_TARGET = 1.15  # softcap / ALiBi time over the same call without them
BACKWARD_TARGET = 1.5  # forward + backward, x torch SDPA forward + backward (autograd)
BACKWARD_MEMORY_TARGET_MIB = 64.0  # beyond inputs, outputs and gradients


@dataclass(frozen=True)
class Preset:
    """Sizes for one run of the benchmark.

    Attributes:
        dense: ``(heads, length, head_dim)`` per dense case; each runs full and causal.
        window_length, window: the sliding-window case, then the same at twice the length.
        decode: ``(heads, keys, head_dim)`` for one query against a cache of `keys`.
        decode_kv_heads: key/value heads of the grouped-query decode case, which has the
            decode case's query heads, keys and head_dim.
        tiny: ``(heads, length, head_dim)`` of the call-overhead case.
        scaling_length: L=S of the 1-vs-2-thread case (8 heads, head_dim 64).
        peak_length: L=S of the causal peak-memory case (8 heads, head_dim 64).
        mha: ``(embed_dim, heads, length)`` of the MultiHeadAttention case.
        backward: ``(heads, length, head_dim)`` of the forward + backward cases (full, causal).
        backward_peak_length: L=S of the causal backward peak-memory case (1 head, head_dim
            64: the extra memory does not grow with heads, the run time does).
        sgemm_size, bandwidth_bytes: sizes of the two limit measurements.
        plan: how long each row is timed.
        sparse_length: L=S of the sparse-mask cases against attnscope's own equivalents (8
            heads, head_dim 64).
        sparse_torch_length: L=S of the sparse-mask cases against torch with a dense bool mask.
        sparse_peak_length: L=S of the Longformer expression's peak-memory case.
        score_mods: ``(heads, length, head_dim)`` of the softcap and ALiBi cases.
    """

    name: str
    dense: tuple[tuple[int, int, int], ...]
    window_length: int
    window: int
    decode: tuple[int, int, int]
    decode_kv_heads: int
    tiny: tuple[int, int, int]
    scaling_length: int
    peak_length: int
    mha: tuple[int, int, int]
    backward: tuple[int, int, int]
    backward_peak_length: int
    sgemm_size: int
    bandwidth_bytes: int
    plan: Plan
    sparse_length: int
    sparse_torch_length: int
    sparse_peak_length: int
    score_mods: tuple[int, int, int]


# Each Preset field for the three presets, side by side: (full, quick, smoke). "smoke" holds
# tiny sizes for the test suite: it checks that every row runs and is correct; its times mean
# nothing.
_PRESET_NAMES = ("full", "quick", "smoke")
_PRESET_SIZES = {
    "dense": (
        ((8, 4096, 64), (16, 2048, 128)),
        ((8, 1024, 64), (16, 512, 128)),
        ((2, 96, 16), (2, 64, 32)),
    ),
    "window_length": (16384, 2048, 256),
    "window": (256, 256, 32),
    "decode": ((32, 32768, 128), (32, 8192, 128), (4, 512, 32)),
    "decode_kv_heads": (8, 8, 2),
    "tiny": ((4, 16, 16), (4, 16, 16), (4, 16, 16)),
    "scaling_length": (4096, 1024, 128),
    "peak_length": (65536, 8192, 512),
    "mha": ((512, 8, 2048), (512, 8, 512), (64, 4, 48)),
    "backward": ((8, 2048, 64), (8, 512, 64), (2, 96, 16)),
    "backward_peak_length": (65536, 8192, 512),
    "sgemm_size": (4096, 2048, 256),
    "bandwidth_bytes": (2**30, 2**28, 2**24),
    "plan": (
        Plan(budget_s=6.0, min_repeats=3, max_repeats=30, min_sample_s=0.05),
        Plan(budget_s=1.0, min_repeats=3, max_repeats=20, min_sample_s=0.02),
        Plan(budget_s=0.01, min_repeats=2, max_repeats=2, min_sample_s=0.0, settle_s=0.0),
    ),
    "sparse_length": (32768, 4096, 2048),
    "sparse_torch_length": (8192, 2048, 256),
    "sparse_peak_length": (65536, 8192, 512),
    "score_mods": ((8, 4096, 64), (8, 1024, 64), (2, 96, 16)),
}
PRESETS = {
    name: Preset(name=name, **{field: sizes[i] for field, sizes in _PRESET_SIZES.items()})
    for i, name in enumerate(_PRESET_NAMES)
}

# Row groups, in the order they run; --rows picks a subset.
GROUPS = ("dense", "window", "decode", "tiny", "scaling", "memory", "mha", "sparse", "backward")


def _verdict(row: Row, unmeasured: str) -> str:
    error = row.max_rel_error
    if error is not None and not error <= peers.ERROR_TOLERANCE:
        return "FAIL (error)"
    if row.met is None:
        return f"n/a ({unmeasured})"
    return "PASS" if row.met else "FAIL"


class Benchmark:
    """Runs the row groups of one preset at one thread count and collects :class:`Row` s.

    Args:
        preset: the sizes.
        threads: threads for attnscope and torch (and NumPy's BLAS, when the caller limits it).
        naive_budget_bytes: the NumPy naive peer runs only where its score matrix fits this.
        torch: the torch module, or None to leave torch out.
        log: called with one progress line per row.
        simd_level: the instruction set the engine is held to (None: its own choice); the
            SGEMM roof and the peak-memory processes run at it too.
    """

    def __init__(
        self,
        preset: Preset,
        threads: int,
        naive_budget_bytes: int,
        torch=None,
        log: Callable[[str], None] = print,
        simd_level: str | None = None,
    ):
        self.preset = preset
        self.simd_level = simd_level
        self.threads = threads
        self.naive_budget_bytes = naive_budget_bytes
        self.torch = torch
        self.log = log
        self.rng = np.random.default_rng(0)
        self.read_bandwidth_gbs: float | None = None
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        """Use `threads` threads in attnscope and torch."""
        ats.set_num_threads(threads)
        if self.torch is not None:
            self.torch.set_num_threads(threads)

    def inputs(self, shape, count=3) -> list[np.ndarray]:
        """`count` float32 standard-normal arrays of `shape`."""
        return [self.rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]

    def measure_limits(self) -> dict:
        """SGEMM rate and memory read bandwidth at this benchmark's thread count."""
        self.log("measuring limits: SGEMM and memory read bandwidth")
        level = self.simd_level
        coretype = instruction_sets.openblas_coretype(level) if level else None
        sgemm = limits.measure_sgemm(
            self.threads,
            self.preset.sgemm_size,
            self.torch,
            level=level,
            openblas_coretype=coretype,
        )
        bandwidth = limits.measure_read_bandwidth(
            self.threads, self.preset.bandwidth_bytes, self.torch
        )
        self.set_threads(self.threads)  # the measurements may change torch's thread count
        self.read_bandwidth_gbs = bandwidth["gbs"]
        return {"sgemm": sgemm, "read_bandwidth": bandwidth}

    def run(self, groups=GROUPS) -> list[Row]:
        """The rows of the chosen groups, in :data:`GROUPS` order."""
        rows = []
        for group in GROUPS:
            if group not in groups:
                continue
            try:
                rows += getattr(self, f"{group}_rows")()
            except Exception as error:  # one broken case must not hide the others
                message = " ".join(str(error).split())[:120]
                self.log(f"{group}: {type(error).__name__}: {message}")
                rows.append(
                    Row(
                        id=group,
                        label=f"{group} (did not run)",
                        target="—",
                        verdict=f"ERROR ({type(error).__name__}: {message})",
                    )
                )
            finally:
                self.set_threads(self.threads)
        return rows

    # ---- helpers shared by the rows ----

    def _time(self, contenders, plan: Plan | None = None) -> dict[str, Timing]:
        return interleave(contenders, plan or self.preset.plan)

    def _add_sdpa_peers(
        self, row, contenders, query, key, value, rules, *, torch_causal, torch_mask=None
    ) -> None:
        """Add the torch and NumPy naive contenders of an SDPA row, or say why they are absent."""
        batch, heads, num_queries, _ = query.shape
        num_keys = key.shape[-2]
        if self.torch is None:
            row.cells["torch"] = "n/a (no torch)"
        else:
            call, backend = peers.torch_sdpa_call(
                self.torch, query, key, value, is_causal=torch_causal, attn_mask=torch_mask
            )
            contenders["torch"] = call
            how = "bool mask" if torch_mask is not None else "is_causal" if torch_causal else ""
            row.notes.append(f"torch backend: {backend}" + (f" ({how})" if how else ""))
        masked = rules.get("is_causal", False) or rules.get("window") is not None
        need = peers.naive_bytes(batch, heads, num_queries, num_keys, masked)
        if need > self.naive_budget_bytes:
            row.cells["numpy"] = f"skipped: would need {need / 2**30:.1f} GiB"
            return
        hidden = None
        if masked:
            hidden = ~peers.visible_rows(np.arange(num_queries), num_queries, num_keys, **rules)
            hidden = hidden if hidden.any() else None
        # A group of query heads shares one key head: its rows become one taller query block.
        # (No mask here: each head's rows would need their own copy of it.)
        kv_heads = key.shape[1]
        if kv_heads != heads and hidden is None:
            query = query.reshape(batch, kv_heads, heads // kv_heads * num_queries, -1)
        contenders["numpy"] = lambda: peers.naive_attention(query, key, value, hidden)

    @staticmethod
    def _record_times(row, timings) -> None:
        for name in report.PEERS:
            if name in timings:
                row.cells[name] = timings[name].median_s
        repeats = {t.repeats for t in timings.values()}
        row.notes.append(f"median of {max(repeats)} interleaved rounds")

    @staticmethod
    def _torch_ratio(row, timings, target) -> None:
        """Set result/met from torch time / attnscope time (None without torch)."""
        if "torch" not in timings:
            return
        ratio = timings["torch"].median_s / timings["attnscope"].median_s
        row.metrics["ratio"] = ratio
        row.result = f"{ratio:.2f}× torch"
        row.met = ratio >= target

    def _sdpa_row(self, row_id, label, shape, rules, target) -> Row:
        """An SDPA case timed against torch (flash path) and the NumPy naive peer."""
        heads, length, head_dim = shape
        row = Row(id=row_id, label=label, target=f"≥ {target:.2f}× torch")
        self.log(label)
        query, key, value = self.inputs((1, heads, length, head_dim))
        contenders = {
            "attnscope": lambda: ats.scaled_dot_product_attention(query, key, value, **rules)
        }
        self._add_sdpa_peers(
            row, contenders, query, key, value, rules, torch_causal=rules["is_causal"]
        )
        timings = self._time(contenders)
        self._record_times(row, timings)
        pairs = peers.visible_pairs(length, length, **rules)
        row.gflops = 4 * heads * pairs * head_dim / timings["attnscope"].median_s / 1e9
        self._torch_ratio(row, timings, target)
        out = ats.scaled_dot_product_attention(query, key, value, **rules)
        row.max_rel_error = peers.max_relative_error(out, query, key, value, **rules)
        row.verdict = _verdict(row, "no torch")
        return row

    # ---- the row groups ----

    def dense_rows(self) -> list[Row]:
        """Full and causal attention at the two dense shapes."""
        rows = []
        for (heads, length, head_dim), targets in zip(
            self.preset.dense, DENSE_TARGETS, strict=True
        ):
            for causal, target in zip((False, True), targets, strict=True):
                kind = "causal" if causal else "full"
                rows.append(
                    self._sdpa_row(
                        f"sdpa_{kind}_h{heads}_d{head_dim}",
                        f"B1 H{heads} L=S={length} D{head_dim} {kind}",
                        (heads, length, head_dim),
                        {"is_causal": causal},
                        target,
                    )
                )
        return rows

    def window_rows(self) -> list[Row]:
        """Causal sliding window vs torch given the same window as a bool mask; then 2x length."""
        length, window = self.preset.window_length, self.preset.window
        heads, head_dim = 8, 64
        rules = {"is_causal": True, "window": window}
        label = f"B1 H{heads} L=S={length} D{head_dim} causal window {window}"
        self.log(label)
        row = Row(id="window", label=label, target=f"≥ {WINDOW_TARGET:.0f}× torch (bool mask)")
        doubled = Row(
            id="window_doubling",
            label=f"same window, L=S={2 * length}: time vs L={length}",
            target=f"≤ {DOUBLING_TARGET:.1f}× time",
        )
        query, key, value = self.inputs((1, heads, length, head_dim))
        query2, key2, value2 = self.inputs((1, heads, 2 * length, head_dim))
        contenders = {
            "attnscope": lambda: ats.scaled_dot_product_attention(query, key, value, **rules),
            "attnscope_2L": lambda: ats.scaled_dot_product_attention(query2, key2, value2, **rules),
        }
        torch_mask = None
        if self.torch is not None:
            torch_mask = peers.visible_rows(np.arange(length), length, length, **rules)
        self._add_sdpa_peers(
            row, contenders, query, key, value, rules, torch_causal=False, torch_mask=torch_mask
        )
        if torch_mask is not None:
            row.notes.append("SDPA has no window argument, so torch gets it as an L×S bool mask")
        timings = self._time(contenders)
        self._record_times(row, timings)
        flops = 4 * heads * head_dim * peers.visible_pairs(length, length, **rules)
        row.gflops = flops / timings["attnscope"].median_s / 1e9
        self._torch_ratio(row, timings, WINDOW_TARGET)
        out = ats.scaled_dot_product_attention(query, key, value, **rules)
        row.max_rel_error = peers.max_relative_error(out, query, key, value, **rules)
        row.verdict = _verdict(row, "no torch")

        time_ratio = timings["attnscope_2L"].median_s / timings["attnscope"].median_s
        doubled.cells = {"attnscope": timings["attnscope_2L"].median_s}
        flops2 = 4 * heads * head_dim * peers.visible_pairs(2 * length, 2 * length, **rules)
        doubled.gflops = flops2 / timings["attnscope_2L"].median_s / 1e9
        doubled.metrics["time_ratio"] = time_ratio
        doubled.result = f"{time_ratio:.2f}× the time"
        doubled.met = time_ratio <= DOUBLING_TARGET
        doubled.notes.append(f"timed in the same rounds as L={length}")
        out2 = ats.scaled_dot_product_attention(query2, key2, value2, **rules)
        doubled.max_rel_error = peers.max_relative_error(out2, query2, key2, value2, **rules)
        doubled.verdict = _verdict(doubled, "")
        return [row, doubled]

    def decode_rows(self) -> list[Row]:
        """One new query against a long cache, with as many kv heads as query heads and then
        grouped: both bound by reading K and V once."""
        query_heads = self.preset.decode[0]
        return [
            self._decode_row("decode", kv_heads=query_heads),
            self._decode_row("decode_gqa", kv_heads=self.preset.decode_kv_heads),
            *self._storage_rows(kv_heads=query_heads),
            *self._storage_rows(kv_heads=self.preset.decode_kv_heads),
        ]

    def _storage_rows(self, kv_heads: int) -> list[Row]:
        """The decode case with the cache stored compressed: each storage's step timed in
        the same interleaved rounds as float32 storage, and the speed-up over it."""
        query_heads, num_keys, head_dim = self.preset.decode
        grouped = kv_heads != query_heads
        heads = f"Hq{query_heads} / Hkv{kv_heads}" if grouped else f"H{query_heads}"
        (query,) = self.inputs((1, query_heads, 1, head_dim), count=1)
        key, value = self.inputs((1, kv_heads, num_keys, head_dim), count=2)
        caches = {}
        for storage in ("float32", *STORAGE_TARGETS):
            caches[storage] = ats.KVCache(kv_heads, head_dim, storage=storage)
            caches[storage].append(key, value)
        calls = {
            storage: (lambda cache=cache: cache.attend(query, enable_gqa=grouped))
            for storage, cache in caches.items()
        }
        self.log(f"decode storages: {heads}, {num_keys} keys")
        timings = self._time(calls)
        exact = calls["float32"]()
        rows = []
        for storage, target in STORAGE_TARGETS.items():
            suffix = "_gqa" if grouped else ""
            row = Row(
                id=f"decode_{storage}{suffix}",
                label=f"decode, {storage} cache: 1 query vs {num_keys} keys, {heads} D{head_dim}",
                target=f"≥ {target:.1f}× the float32-storage step",
            )
            seconds = timings[storage].median_s
            row.cells["attnscope"] = seconds
            row.gflops = 4 * query_heads * num_keys * head_dim / seconds / 1e9
            ratio = timings["float32"].median_s / seconds
            row.metrics.update(
                {
                    "speedup_vs_float32": ratio,
                    "float32_step_s": timings["float32"].median_s,
                    "bandwidth_gbs": caches[storage].nbytes / seconds / 1e9,
                    "cache_bytes": caches[storage].nbytes,
                }
            )
            if self.read_bandwidth_gbs:
                row.metrics["bandwidth_fraction"] = (
                    row.metrics["bandwidth_gbs"] / self.read_bandwidth_gbs
                )
            row.result = (
                f"{ratio:.2f}× float32 storage, {row.metrics['bandwidth_gbs']:.1f} GB/s of "
                f"{caches[storage].nbytes / 2**20:.0f} MiB"
            )
            row.met = ratio >= target
            out = calls[storage]()
            # Exact on what the cache holds: the float64 reference over the stored values.
            stored = (reference.stored_values(x, storage) for x in (key, value))
            row.max_rel_error = peers.max_relative_error(
                out, query, *stored, is_causal=True, causal_alignment="bottom_right"
            )
            row.metrics["rel_error_vs_float32"] = float(
                np.abs(out - exact).max() / np.abs(exact).max()
            )
            row.notes.append(
                f"median of {timings[storage].repeats} rounds interleaved with float32 storage; "
                f"error vs float32 storage {row.metrics['rel_error_vs_float32']:.1e}"
            )
            row.verdict = "PASS" if row.met else "FAIL"
            rows.append(row)
        return rows

    def _decode_row(self, row_id: str, kv_heads: int) -> Row:
        """One query (of the preset's decode shape) against a KVCache with `kv_heads` heads."""
        query_heads, num_keys, head_dim = self.preset.decode
        grouped = kv_heads != query_heads
        heads = f"Hq{query_heads} / Hkv{kv_heads}" if grouped else f"H{query_heads}"
        label = f"decode: 1 query vs {num_keys} cached keys, {heads} D{head_dim}"
        self.log(label)
        row = Row(
            id=row_id,
            label=label,
            target=f"≥ {DECODE_TARGET:.1f}× torch and "
            f"≥ {DECODE_BANDWIDTH_TARGET:.0%} of read bandwidth",
        )
        (query,) = self.inputs((1, query_heads, 1, head_dim), count=1)
        key, value = self.inputs((1, kv_heads, num_keys, head_dim), count=2)
        cache = ats.KVCache(kv_heads, head_dim, batch=1, dtype=np.float32)
        cache.append(key, value)

        def attend():
            return cache.attend(query, enable_gqa=grouped)

        row.notes.append("attnscope: KVCache.attend" + (", enable_gqa" if grouped else ""))
        contenders = {"attnscope": attend}
        # One query at the bottom-right diagonal sees every key: torch needs no mask.
        rules = {"is_causal": True, "causal_alignment": "bottom_right"}
        self._add_sdpa_peers(row, contenders, query, key, value, rules, torch_causal=False)
        timings = self._time(contenders)
        self._record_times(row, timings)
        seconds = timings["attnscope"].median_s
        row.gflops = 4 * query_heads * num_keys * head_dim / seconds / 1e9
        row.metrics["bandwidth_gbs"] = (key.nbytes + value.nbytes) / seconds / 1e9
        if "torch" in timings:
            row.metrics["ratio"] = timings["torch"].median_s / seconds
        row.max_rel_error = peers.max_relative_error(attend(), query, key, value, **rules)
        self.judge_decode(row)
        return row

    def judge_decode(self, row: Row) -> None:
        """Set the decode row's result and verdict from its metrics and the bandwidth limit.

        This is separate from the timing because the limit is measured again after the
        rows, and the verdict is then judged once more against the better limit.
        """
        ratio, bandwidth = row.metrics.get("ratio"), row.metrics["bandwidth_gbs"]
        parts = [] if ratio is None else [f"{ratio:.2f}× torch"]
        row.met = None if ratio is None else ratio >= DECODE_TARGET
        if self.read_bandwidth_gbs:
            fraction = bandwidth / self.read_bandwidth_gbs
            row.metrics["bandwidth_fraction"] = fraction
            parts.append(f"{bandwidth:.1f} GB/s = {fraction:.0%} of read BW")
            if row.met is not None:
                row.met = row.met and fraction >= DECODE_BANDWIDTH_TARGET
        else:
            parts.append(f"{bandwidth:.1f} GB/s")
            row.met = None
        row.result = ", ".join(parts)
        row.verdict = _verdict(row, "no torch" if self.torch is None else "no bandwidth limit")

    def tiny_rows(self) -> list[Row]:
        """A very small call, where per-call overhead is everything."""
        heads, length, head_dim = self.preset.tiny
        label = f"B1 H{heads} L=S={length} D{head_dim} full, per call"
        return [self._sdpa_row("tiny", label, self.preset.tiny, {"is_causal": False}, TINY_TARGET)]

    def scaling_rows(self) -> list[Row]:
        """attnscope alone on 1 thread and on 2, same call."""
        length, heads, head_dim = self.preset.scaling_length, 8, 64
        label = f"threads 1 → 2, B1 H{heads} L=S={length} D{head_dim} full"
        self.log(label)
        row = Row(id="scaling", label=label, target=f"≥ {SCALING_TARGET:.1f}× speed-up")
        if limits.usable_cpus() < 2:
            row.verdict = "n/a (needs 2 CPUs)"
            return [row]
        query, key, value = self.inputs((1, heads, length, head_dim))

        def on_threads(threads):
            def call():
                ats.set_num_threads(threads)
                return ats.scaled_dot_product_attention(query, key, value)

            return call

        try:
            timings = self._time({"1": on_threads(1), "2": on_threads(2)})
            outputs = [on_threads(threads)() for threads in (1, 2)]
        finally:
            ats.set_num_threads(self.threads)
        speedup = timings["1"].median_s / timings["2"].median_s
        row.cells = {"attnscope": timings["2"].median_s}
        row.gflops = 4 * heads * length * length * head_dim / timings["2"].median_s / 1e9
        row.metrics.update(speedup=speedup, one_thread_s=timings["1"].median_s)
        row.result = f"{speedup:.2f}× speed-up"
        row.met = speedup >= SCALING_TARGET
        identical = np.array_equal(outputs[0], outputs[1])
        row.notes += [
            f"1 thread: {report.format_seconds(timings['1'].median_s)}; time shown is 2 threads",
            f"outputs bitwise identical across thread counts: {'yes' if identical else 'NO'}",
        ]
        row.max_rel_error = peers.max_relative_error(outputs[1], query, key, value)
        row.verdict = _verdict(row, "")
        return [row]

    def memory_rows(self) -> list[Row]:
        """Peak memory of a long causal call without weights, in a fresh process."""
        shape = length, heads, head_dim = self.preset.peak_length, 8, 64
        label = f"peak memory, B1 H{heads} L=S={length} D{head_dim} causal"
        flops = 4 * peers.visible_pairs(length, length, is_causal=True)
        return [self._peak_row("peak_memory", label, shape, flops, PEAK_MEMORY_TARGET_MIB)]

    def _peak_row(
        self,
        row_id: str,
        label: str,
        shape: tuple[int, int, int],
        flops_per_dim: int,
        target_mib: float,
        *,
        beyond: str = "inputs+output",
        call: str = "call",
        inputs: str = "inputs",
        outputs: str = "output",
        **child,
    ) -> Row:
        """One call of `shape` (length, heads, head_dim) measured in a fresh process
        (:mod:`peak_memory`): the MiB it needs beyond `beyond` against `target_mib`, its time,
        and its GFLOP/s at `flops_per_dim` flops per head and per unit of head_dim (4 per
        visible pair for a forward). `child` goes to :func:`peak_memory.run_in_child`; `call`,
        `inputs` and `outputs` name them in the row's note."""
        length, heads, head_dim = shape
        row = Row(id=row_id, label=label, target=f"≤ {target_mib:.0f} MiB beyond {beyond}")
        self.log(label)
        measured = peak_memory.run_in_child(
            length, heads, head_dim, self.threads, simd_level=self.simd_level, **child
        )
        row.cells = {"attnscope": measured["seconds"]}
        row.gflops = flops_per_dim * heads * head_dim / measured["seconds"] / 1e9
        row.metrics["extra_mib"] = measured["extra_mib"]
        row.result = f"{measured['extra_mib']:.1f} MiB"
        row.met = measured["extra_mib"] <= target_mib
        row.max_rel_error = measured["max_rel_error"]
        row.notes.append(
            f"fresh process, one {call}; {inputs} {measured['inputs_mib']:.0f} MiB, {outputs} "
            f"{measured['output_mib']:.0f} MiB; peak counter reset: "
            f"{'yes' if measured['peak_counter_reset'] else 'no (upper bound)'}"
        )
        row.verdict = _verdict(row, "")
        return row

    def mha_rows(self) -> list[Row]:
        """The whole self-attention block (projections included) vs nn.MultiheadAttention."""
        embed_dim, heads, length = self.preset.mha
        label = f"MultiHeadAttention E{embed_dim} H{heads} B1 L{length}"
        self.log(label)
        row = Row(id="mha", label=label, target=f"≥ {MHA_TARGET:.1f}× nn.MultiheadAttention")
        (x,) = self.inputs((1, length, embed_dim), count=1)
        contenders = {}
        if self.torch is None:
            mha = ats.MultiHeadAttention(embed_dim, heads, seed=0)
            row.cells["torch"] = "n/a (no torch)"
        else:
            self.torch.manual_seed(0)
            module = self.torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True)
            mha = ats.MultiHeadAttention.from_torch(module)
            contenders["torch"] = peers.torch_mha_call(self.torch, module, x)
            row.notes.append("torch: eval, inference_mode, need_weights=False (fused fast path)")
        contenders = {"attnscope": lambda: mha(x), **contenders}
        names = [f"{kind}_{part}" for kind in "wb" for part in "qkvo"]
        weights = {name: getattr(mha, name) for name in names}
        if peers.naive_bytes(1, heads, length, length, False) <= self.naive_budget_bytes:
            contenders["numpy"] = lambda: peers.naive_multi_head_attention(x, weights, heads)
        timings = self._time(contenders)
        self._record_times(row, timings)
        flops = 8 * length * embed_dim**2 + 4 * length * length * embed_dim
        row.gflops = flops / timings["attnscope"].median_s / 1e9
        row.notes.append("GFLOP/s counts the four projections and the attention")
        self._torch_ratio(row, timings, MHA_TARGET)
        if row.result:
            row.result = row.result.replace("torch", "nn.MHA")
        weights64 = {
            k: None if w is None else np.asarray(w, np.float64) for k, w in weights.items()
        }
        expected = peers.naive_multi_head_attention(x.astype(np.float64), weights64, heads)
        got = np.asarray(mha(x))
        row.max_rel_error = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
        if "torch" in contenders:
            # Same module, so the two outputs agree only if from_torch copied it faithfully.
            torch_out = contenders["torch"]().numpy()
            gap = float(np.max(np.abs(got - torch_out)) / np.max(np.abs(expected)))
            row.notes.append(f"attnscope vs torch output: max rel. difference {gap:.1e}")
        row.verdict = _verdict(row, "no torch")
        return [row]

    # ---- sparse masks and score modifiers ----

    def sparse_rows(self) -> list[Row]:
        """Mask expressions against attnscope's own equivalents, against torch with the same
        pattern as a dense bool mask, the score modifiers' cost, and an expression's memory."""
        return [
            *self._sparse_self_rows(),
            *(self._sparse_torch_row(name) for name in SPARSE_TORCH_TARGETS),
            *self._score_mod_rows(),
            self._sparse_peak_row(),
        ]

    def _relative_row(self, row, contenders, mine, theirs, target, inputs, mask) -> Row:
        """Times `mine` against `theirs` (both attnscope) in the same rounds; met if the
        ratio of times is at most `target`."""
        timings = self._time(contenders)
        self._record_times(row, timings)
        ratio = timings[mine].median_s / timings[theirs].median_s
        row.notes.append(f"{theirs}: {report.format_seconds(timings[theirs].median_s)}")
        row.metrics["time_ratio"] = ratio
        row.result = f"{ratio:.2f}× {theirs}"
        row.met = ratio <= target
        query, key, value = inputs
        out = ats.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        row.max_rel_error = peers.max_relative_error_masked(out, query, key, value, mask)
        length = query.shape[-2]
        pairs = mask.layout(length, length, block=256).visible_pairs
        row.gflops = 4 * query.shape[1] * query.shape[-1] * pairs / timings[mine].median_s / 1e9
        row.verdict = _verdict(row, "")
        return row

    def _sparse_self_rows(self) -> list[Row]:
        length, heads, head_dim = self.preset.sparse_length, 8, 64
        shape = f"B1 H{heads} L=S={length} D{head_dim}"
        inputs = self.inputs((1, heads, length, head_dim))
        query, key, value = inputs
        sdpa = ats.scaled_dot_product_attention
        rows = []

        longformer = peers.MASK_PATTERNS["longformer"](length)
        label = f"{shape} Longformer: causal window 512 + 16 global tokens"
        self.log(label)
        row = Row(
            id="sparse_longformer", label=label, target=f"≤ {LONGFORMER_WINDOW_TARGET}× window"
        )
        contenders = {
            "attnscope": lambda: sdpa(query, key, value, attn_mask=longformer),
            "window=512": lambda: sdpa(query, key, value, is_causal=True, window=512),
        }
        rows.append(
            self._relative_row(
                row,
                contenders,
                "attnscope",
                "window=512",
                LONGFORMER_WINDOW_TARGET,
                inputs,
                longformer,
            )
        )

        sinks = peers.MASK_PATTERNS["sinks_window"](length)
        label = f"{shape} causal, sinks(4) or window(1024)"
        self.log(label)
        row = Row(id="sparse_sinks_window", label=label, target=f"≤ {SINKS_WINDOW_TARGET}× window")
        contenders = {
            "attnscope": lambda: sdpa(query, key, value, attn_mask=sinks),
            "window=1024": lambda: sdpa(query, key, value, is_causal=True, window=1024),
        }
        rows.append(
            self._relative_row(
                row, contenders, "attnscope", "window=1024", SINKS_WINDOW_TARGET, inputs, sinks
            )
        )

        documents = peers.MASK_PATTERNS["documents"](length)
        count = -(-length // 2048)
        label = f"{shape} {count} packed documents of 2048, causal"
        self.log(label)
        row = Row(
            id="sparse_documents",
            label=label,
            target=f"≤ {DOCUMENTS_SEPARATE_TARGET}× separate calls",
        )
        parts = [slice(start, start + 2048) for start in range(0, length, 2048)]

        def separate():
            return [
                sdpa(query[:, :, p], key[:, :, p], value[:, :, p], is_causal=True) for p in parts
            ]

        contenders = {
            "attnscope": lambda: sdpa(query, key, value, attn_mask=documents),
            "separate calls": separate,
        }
        rows.append(
            self._relative_row(
                row,
                contenders,
                "attnscope",
                "separate calls",
                DOCUMENTS_SEPARATE_TARGET,
                inputs,
                documents,
            )
        )
        return rows

    def _sparse_torch_row(self, name: str) -> Row:
        """A pattern as an expression against torch SDPA given its dense bool mask."""
        length, heads, head_dim = self.preset.sparse_torch_length, 8, 64
        target = SPARSE_TORCH_TARGETS[name]
        label = f"B1 H{heads} L=S={length} D{head_dim} {name} vs torch (dense bool mask)"
        self.log(label)
        row = Row(id=f"sparse_{name}_torch", label=label, target=f"≥ {target:.0f}× torch")
        inputs = self.inputs((1, heads, length, head_dim))
        query, key, value = inputs
        mask = peers.MASK_PATTERNS[name](length)
        contenders = {
            "attnscope": lambda: ats.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        }
        if self.torch is None:
            row.cells["torch"] = "n/a (no torch)"
        else:
            call, backend = peers.torch_sdpa_call(
                self.torch, query, key, value, attn_mask=mask.to_dense(length, length)
            )
            contenders["torch"] = call
            row.notes.append(f"torch backend: {backend} (bool mask, {length}² bytes)")
        row.cells["numpy"] = "—"
        timings = self._time(contenders)
        self._record_times(row, timings)
        self._torch_ratio(row, timings, target)
        pairs = mask.layout(length, length, block=256).visible_pairs
        row.gflops = 4 * heads * head_dim * pairs / timings["attnscope"].median_s / 1e9
        row.notes.append(f"visible fraction {pairs / length**2:.4f}")
        out = contenders["attnscope"]()
        row.max_rel_error = peers.max_relative_error_masked(out, query, key, value, mask)
        row.verdict = _verdict(row, "no torch")
        return row

    def _score_mod_rows(self) -> list[Row]:
        """Softcap and ALiBi against the same causal call without them, in the same rounds."""
        heads, length, head_dim = self.preset.score_mods
        inputs = self.inputs((1, heads, length, head_dim))
        query, key, value = inputs
        slopes = 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)
        sdpa = ats.scaled_dot_product_attention
        mods = {"softcap": {"softcap": 30.0}, "alibi": {"alibi_slopes": slopes}}
        contenders = {"plain": lambda: sdpa(query, key, value, is_causal=True)}
        for name, extra in mods.items():
            contenders[name] = lambda extra=extra: sdpa(query, key, value, is_causal=True, **extra)
        label = f"B1 H{heads} L=S={length} D{head_dim} causal"
        self.log(f"{label}: softcap and ALiBi")
        timings = self._time(contenders)
        rows = []
        for name, extra in mods.items():
            row = Row(
                id=f"score_mod_{name}",
                label=f"{label} with {name}",
                target=f"≤ {SCORE_MOD_TARGET:.2f}× without",
            )
            ratio = timings[name].median_s / timings["plain"].median_s
            row.cells = {"attnscope": timings[name].median_s}
            pairs = peers.visible_pairs(length, length, is_causal=True)
            row.gflops = 4 * heads * head_dim * pairs / timings[name].median_s / 1e9
            row.notes.append(f"without: {report.format_seconds(timings['plain'].median_s)}")
            row.metrics["time_ratio"] = ratio
            row.result = f"{ratio:.3f}× the time"
            row.met = ratio <= SCORE_MOD_TARGET
            out = contenders[name]()
            row.max_rel_error = _score_mod_error(out, query, key, value, extra)
            row.verdict = _verdict(row, "")
            rows.append(row)
        return rows

    def _sparse_peak_row(self) -> Row:
        """Peak memory of a Longformer expression, in a fresh process."""
        shape = length, heads, head_dim = self.preset.sparse_peak_length, 8, 64
        label = f"peak memory, B1 H{heads} L=S={length} D{head_dim} Longformer expression"
        pairs = peers.MASK_PATTERNS["longformer"](length).layout(length, length, block=256)
        flops = 4 * pairs.visible_pairs
        return self._peak_row(
            "sparse_peak_memory", label, shape, flops, PEAK_MEMORY_TARGET_MIB, mask="longformer"
        )

    def backward_rows(self) -> list[Row]:
        """Forward + backward against torch SDPA under autograd; the backward's peak memory."""
        heads, length, head_dim = self.preset.backward
        rows = []
        for causal in (False, True):
            kind = "causal" if causal else "full"
            label = f"forward+backward B1 H{heads} L=S={length} D{head_dim} {kind}"
            self.log(label)
            row = Row(id=f"backward_{kind}", label=label, target=f"≥ {BACKWARD_TARGET:.2f}× torch")
            query, key, value, grad_out = self.inputs((1, heads, length, head_dim), count=4)

            def ours(causal=causal, query=query, key=key, value=value, grad_out=grad_out):
                out, lse = ats.scaled_dot_product_attention(
                    query, key, value, is_causal=causal, return_lse=True
                )
                return ats.scaled_dot_product_attention_backward(
                    grad_out, query, key, value, out, lse, is_causal=causal
                )

            contenders = {"attnscope": ours}
            if self.torch is None:
                row.cells["torch"] = "n/a (no torch)"
            else:
                contenders["torch"] = peers.torch_sdpa_backward_call(
                    self.torch, query, key, value, grad_out, is_causal=causal
                )
                row.notes.append("torch: SDPA forward, then torch.autograd.grad of its output")
            timings = self._time(contenders)
            self._record_times(row, timings)
            pairs = peers.visible_pairs(length, length, is_causal=causal)
            # Forward 2 products of L·S·D, backward 5 (FlashAttention-2's count).
            row.gflops = 14 * heads * pairs * head_dim / timings["attnscope"].median_s / 1e9
            row.notes.append("GFLOP/s counts 7 products (forward 2, backward 5)")
            self._torch_ratio(row, timings, BACKWARD_TARGET)
            grads = ours()
            expected = reference.scaled_dot_product_attention_backward(
                grad_out[:, :2], query[:, :2], key[:, :2], value[:, :2], is_causal=causal
            )
            row.max_rel_error = max(
                float(np.max(np.abs(got[:, :2] - want)) / np.max(np.abs(want)))
                for got, want in zip(grads, expected, strict=True)
            )
            row.notes.append("error: gradients of the first 2 heads vs the float64 reference")
            row.verdict = _verdict(row, "no torch")
            rows.append(row)
        rows.append(self._backward_memory_row())
        return rows

    def _backward_memory_row(self) -> Row:
        shape = length, heads, head_dim = self.preset.backward_peak_length, 1, 64
        return self._peak_row(
            "backward_peak_memory",
            f"backward peak memory, B1 H{heads} L=S={length} D{head_dim} causal",
            shape,
            10 * peers.visible_pairs(length, length, is_causal=True),
            BACKWARD_MEMORY_TARGET_MIB,
            beyond="inputs+outputs+grads",
            call="backward call",
            inputs="inputs (q, k, v, out, lse, grad_out)",
            outputs="gradients",
            backward=True,
        )


def _score_mod_error(out, query, key, value, extra) -> float:
    """Max error of a causal call with score modifiers on sampled query rows, relative to the
    largest reference output (rows keep their positions: the keys are sliced to match)."""
    length = query.shape[-2]
    errors, scale = [], 0.0
    for row in peers._spread(length, 16):
        expected = reference.scaled_dot_product_attention(
            query[:, :, row : row + 1],
            key[:, :, : row + 1],
            value[:, :, : row + 1],
            is_causal=True,
            causal_alignment="bottom_right",
            **extra,
        )
        errors.append(np.max(np.abs(out[:, :, row : row + 1] - expected)))
        scale = max(scale, float(np.max(np.abs(expected))))
    return float(max(errors) / max(scale, 1e-300))


def _numpy_thread_limit(threads: int):
    """A context that limits NumPy's BLAS to `threads` (threadpoolctl), and how it was done."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext(), "not controlled (threadpoolctl not installed)"
    return threadpool_limits(limits=threads, user_api="blas"), f"{threads} (threadpoolctl)"


def run(
    preset: str = "full",
    threads: int | None = None,
    groups=GROUPS,
    naive_budget_gib: float = 2.0,
    use_torch: bool = True,
    log: Callable[[str], None] = print,
    command: str = "",
    isa: str | None = None,
) -> dict:
    """Measure the limits and the rows; returns the result dict that is written as JSON.

    With `isa`, the engine runs held to that instruction set, and the SGEMM roof is measured
    at it. torch is held to it only if :func:`instruction_sets.apply_torch_limits` ran before
    torch was imported (:func:`main` does that); the result's ``meta`` says what torch ran at.

    Raises:
        ValueError: `isa` is not a level this CPU and engine can run.
    """
    if isa is not None:
        reason = instruction_sets.unsupported_reason(isa)
        if reason:
            raise ValueError(f"isa: {reason}")
    threads = threads or limits.usable_cpus()
    torch = peers.load_torch() if use_torch else None
    limit, numpy_threads = _numpy_thread_limit(threads)
    load_before = limits.load_average()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if isa is not None:
        instruction_sets.force(isa)
    try:
        with limit:
            bench = Benchmark(
                PRESETS[preset], threads, int(naive_budget_gib * 2**30), torch, log, isa
            )
            simd_level = instruction_sets.active_level()
            at_start = bench.measure_limits()
            log(f"limits at {threads} threads: {report.describe_limits(at_start)}")
            rows = bench.run(groups)
            # Other work on a shared machine only ever lowers a measured limit, so the limits
            # are measured again at the end and the better of the two counts.
            measured_limits = limits.best_limits([at_start, bench.measure_limits()])
    finally:
        if isa is not None:
            instruction_sets.force(None)
    bench.read_bandwidth_gbs = measured_limits["read_bandwidth"]["gbs"]
    for row in rows:
        if "speedup_vs_float32" in row.metrics:  # a compressed-storage decode row
            fraction = row.metrics["bandwidth_gbs"] / bench.read_bandwidth_gbs
            row.metrics["bandwidth_fraction"] = fraction
        elif "bandwidth_gbs" in row.metrics:  # the float32 decode rows
            bench.judge_decode(row)
    return {
        "meta": {
            "preset": preset,
            "threads": threads,
            "numpy_threads": numpy_threads,
            "torch": torch.__version__ if torch is not None else "not installed",
            "numpy": np.__version__,
            "attnscope": ats.__version__,
            "date": started,
            "command": command,
            "machine": limits.machine_info(),
            "load_average": {"start": load_before, "end": limits.load_average()},
            "error_tolerance": peers.ERROR_TOLERANCE,
            "naive_budget_gib": naive_budget_gib,
            "simd_level": simd_level,
            "isa": isa,
            **_torch_level(torch, isa),
            "roof_source": measured_limits["sgemm"]["how"],
        },
        "limits": measured_limits,
        "rows": report.rows_to_json(rows),
    }


def _torch_level(torch, isa: str | None) -> dict:
    """What torch ran at: its ATen capability, the limit variables set, and whether it was
    held to `isa` (it was not if it had been imported before the limits were set)."""
    if torch is None:
        return {"torch_cpu_capability": None, "torch_limits": {}}
    in_effect = instruction_sets.torch_limits_in_effect()
    level = {"torch_cpu_capability": instruction_sets.torch_capability(torch)}
    level["torch_limits"] = in_effect
    if isa is not None and in_effect != instruction_sets.torch_limits(isa):
        level["torch_note"] = f"torch was not held to {isa}: it was imported before its limits"
    return level


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark attnscope against NumPy and torch (see benchmarks/README.md)."
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="smaller sizes (well under a minute)")
    sizes.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    parser.add_argument(
        "--rows", default=",".join(GROUPS), help=f"comma-separated groups of {','.join(GROUPS)}"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no files")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out even if present")
    parser.add_argument(
        "--naive-budget-gib",
        type=float,
        default=2.0,
        help="run the NumPy naive peer only where its score matrix fits this (default 2)",
    )
    parser.add_argument(
        "--isa",
        choices=instruction_sets.LEVELS,
        default=None,
        help="hold the engine, torch and the SGEMM roof to one instruction set; the results "
        "go to latest-LEVEL.json",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the result files")
    args = parser.parse_args(argv)
    groups = [group.strip() for group in args.rows.split(",") if group.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown row groups {unknown}; choose from {', '.join(GROUPS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    args.groups = groups
    args.preset = "quick" if args.quick else "smoke" if args.smoke else "full"
    args.stem = report.results_stem(args.preset, args.isa, set(groups) == set(GROUPS))
    return args


def main(argv=None) -> int:
    """Command-line entry point; exit status 0 even when a target is missed."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if not ats.core_available():
        print("attnscope's compiled engine is not importable; build it with `make build`.")
        return 2

    def log(line):
        print(f"[bench] {line}", file=sys.stderr, flush=True)

    if args.isa is not None:
        reason = instruction_sets.unsupported_reason(args.isa)
        if reason:
            print(f"bench.py: --isa {args.isa} refused: {reason}", file=sys.stderr)
            return 2
        if not args.no_torch:
            # torch reads these once, when it is imported: set them before run() imports it.
            held = instruction_sets.apply_torch_limits(args.isa)
            log(f"torch held to {args.isa}: {held or 'its own default on this CPU'}")

    results = run(
        preset=args.preset,
        threads=args.threads,
        groups=args.groups,
        naive_budget_gib=args.naive_budget_gib,
        use_torch=not args.no_torch,
        log=log,
        command=shlex.join(["python", "benchmarks/bench.py", *argv]),
        isa=args.isa,
    )
    print(report.markdown_report(results))
    if not args.no_write:
        for path in report.write_results(results, args.out, args.stem):
            log(f"wrote {path}")
        if args.stem.startswith("latest") and args.out.resolve() == RESULTS_DIR:
            _update_docs(log)
    return 0


def _update_docs(log: Callable[[str], None]) -> None:
    """Regenerate the docs' tables from the result files a full run has just written."""
    try:
        changed = report.update_docs()
    except (ValueError, KeyError, OSError) as error:  # a block asks for a row this run lacks
        log(
            f"docs not regenerated ({error}); fix it, then run `python benchmarks/report.py --docs`"
        )
        return
    log("docs regenerated: " + (", ".join(p.name for p in changed) or "already up to date"))


if __name__ == "__main__":
    sys.exit(main())
