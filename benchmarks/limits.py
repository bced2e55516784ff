"""The machine's physical limits at a given thread count, measured rather than quoted.

* SGEMM GFLOP/s: the rate a tuned matrix multiply reaches. Attention is matmul-shaped, so no
  attention kernel should be expected to go much faster.
* Memory read bandwidth: how fast a large array can be streamed. This bounds decoding, which
  reads the whole KV cache once per query.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "best_limits",
    "load_average",
    "machine_info",
    "measure_read_bandwidth",
    "measure_sgemm",
    "usable_cpus",
]

# Variables that pin OpenBLAS to a slower code path or cache size on some machines. They are
# cleared only in the child process that measures NumPy's SGEMM, so that it gives the
# machine's rate rather than the setting's.
_OPENBLAS_TUNING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_NUMPY_SGEMM_CHILD = """
import sys, time, numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
a @ a
times = []
for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
try:  # the OpenBLAS core the matmul ran on, to confirm an OPENBLAS_CORETYPE hold
    from threadpoolctl import threadpool_info
    cores = {i.get("architecture") for i in threadpool_info() if i["internal_api"] == "openblas"}
except ImportError:
    cores = set()
print(sorted(times)[len(times) // 2], ",".join(sorted(map(str, cores))) or "unknown")
"""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average: above the CPU count, other work shares the machine."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags that name the vector instruction sets the engine and its peers choose between.
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "asimd", "sve")


def _simd_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    """CPU model, core counts, memory, OS and Python: enough to tell two result files apart."""
    memory_gib = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gib": None if memory_gib is None else round(memory_gib, 1),
        "simd_flags": _simd_flags(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def measure_sgemm(
    threads: int,
    size: int,
    torch=None,
    repeats: int = 3,
    level: str | None = None,
    openblas_coretype: str | None = None,
) -> dict:
    """Median float32 ``size x size`` matmul rate at `threads` threads, in GFLOP/s.

    NumPy's matmul runs in a child process with `threads` BLAS threads and without the
    OpenBLAS tuning variables. ``torch.mm`` is measured too when torch is given. The faster
    of the two counts, since either library may miss the CPU's widest vector units
    (MKL, for one, does not use AVX-512 on AMD CPUs). Both rates are reported.

    With `level` (an instruction set the benchmark holds every contender to), the roof must
    be measured at that level too: torch is then expected to run under that level's limits
    (set before it was imported), and NumPy's OpenBLAS is held with ``OPENBLAS_CORETYPE =
    openblas_coretype``. NumPy's rate counts only if OpenBLAS reports that core, or when
    there is no torch; then the description says it was not held.
    """
    flops = 2.0 * size**3
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_TUNING_VARS}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if level is not None and openblas_coretype:
        env["OPENBLAS_CORETYPE"] = openblas_coretype
    done = subprocess.run(
        [sys.executable, "-c", _NUMPY_SGEMM_CHILD, str(size), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, openblas_core = done.stdout.split()
    rates = {"numpy": flops / float(seconds) / 1e9}
    names = {"numpy": "numpy matmul, OpenBLAS tuning vars unset", "torch": "torch.mm"}
    counted = {"numpy", "torch"}
    if level is not None:
        names["torch"] = f"torch.mm under the {level} limits"
        if openblas_coretype and openblas_core == openblas_coretype:
            names["numpy"] = f"numpy matmul, OpenBLAS held to its {openblas_coretype} kernels"
        else:
            names["numpy"] = (
                f"numpy matmul, OpenBLAS at its own choice ({openblas_core} kernels), "
                f"not held to {level}"
            )
            if torch is not None:
                counted.discard("numpy")
    if torch is not None:
        torch.set_num_threads(threads)
        a = torch.randn(size, size, dtype=torch.float32)
        torch.mm(a, a)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, a)
            times.append(time.perf_counter() - start)
        rates["torch"] = flops / statistics.median(times) / 1e9
    best = max(counted & set(rates), key=rates.get)
    measured = {
        "gflops": rates[best],
        "rates_gflops": rates,
        "how": f"{size}x{size} float32, {names[best]}",
    }
    if level is not None:
        measured["level"] = level
        measured["not_counted"] = {name: names[name] for name in sorted(set(rates) - counted)}
    return measured


def _numpy_threaded_sum(chunks, pool) -> float:
    # NumPy's reductions release the GIL, so one chunk per thread streams in parallel.
    return sum(pool.map(np.add.reduce, chunks))


def measure_read_bandwidth(threads: int, nbytes: int, torch=None, repeats: int = 5) -> dict:
    """Median rate, in GB/s, at which `threads` threads can sum a float32 array of `nbytes`.

    NumPy sums one chunk per thread. If torch is given, ``torch.sum`` is measured too, and
    the faster of the two is taken as the limit (both rates are reported).
    """
    array = np.ones(nbytes // 4, dtype=np.float32)
    rates = {}
    with ThreadPoolExecutor(threads) as pool:
        chunks = np.array_split(array, threads)
        rates["numpy"] = _median_rate(lambda: _numpy_threaded_sum(chunks, pool), nbytes, repeats)
    if torch is not None:
        torch.set_num_threads(threads)
        tensor = torch.from_numpy(array)
        rates["torch"] = _median_rate(lambda: tensor.sum(), nbytes, repeats)
    best = max(rates, key=rates.get)
    return {
        "gbs": rates[best],
        "rates_gbs": rates,
        "how": f"sum of a {nbytes / 2**30:.2f} GiB float32 array ({best})",
    }


def _median_rate(call, nbytes, repeats) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def best_limits(measurements: list[dict]) -> dict:
    """Per limit, the best of several ``{"sgemm": ..., "read_bandwidth": ...}`` measurements.

    Other load on the machine can only lower a measured rate, so the highest one is the
    closest to what the machine can do. Every measurement is kept under ``"measurements"``.
    """
    return {
        "sgemm": max((m["sgemm"] for m in measurements), key=lambda m: m["gflops"]),
        "read_bandwidth": max((m["read_bandwidth"] for m in measurements), key=lambda m: m["gbs"]),
        "measurements": measurements,
    }
