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
print(sorted(times)[len(times) // 2])
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
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def measure_sgemm(threads: int, size: int, torch=None, repeats: int = 3) -> dict:
    """Median float32 ``size x size`` matmul rate at `threads` threads, in GFLOP/s.

    NumPy's matmul runs in a child process with `threads` BLAS threads and without the
    OpenBLAS tuning variables. ``torch.mm`` is measured too when torch is given. The faster
    of the two counts, since either library may miss the CPU's widest vector units
    (MKL, for one, does not use AVX-512 on AMD CPUs). Both rates are reported.
    """
    flops = 2.0 * size**3
    env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_TUNING_VARS}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-c", _NUMPY_SGEMM_CHILD, str(size), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rates = {"numpy": flops / float(done.stdout.strip()) / 1e9}
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
    best = max(rates, key=rates.get)
    names = {"numpy": "numpy matmul, OpenBLAS tuning vars unset", "torch": "torch.mm"}
    return {
        "gflops": rates[best],
        "rates_gflops": rates,
        "how": f"{size}x{size} float32, {names[best]}",
    }


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
