"""Peak memory of one causal attention call, measured in a fresh process.

The engine allocates in Rust, which tracemalloc cannot see, so the process's resident set is
read from the kernel. The inputs are created first and the call is warmed up on a small slice.
Then the peak-RSS counter is reset (``/proc/self/clear_refs``), the call runs once, and the
new peak minus the resident set before the call minus the output array is what the call
needed beyond its inputs and output.

Run as a script it prints one JSON object; :func:`run_in_child` does that for the benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

import numpy as np

__all__ = ["measure", "measure_backward", "run_in_child"]


def _status_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style line of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _run_once(call):
    """``call()`` run once: its result, the seconds it took, the bytes the peak resident set
    rose above the resident set before it, and whether the peak counter could be reset first.
    When it could not, the peak so far stands in for the resident set before; the inputs are
    made without temporaries, so the two are close."""
    gc.collect()
    rss_before = _status_kib("VmRSS")
    resettable = rss_before is not None and _reset_peak()
    if not resettable:
        rss_before = _peak_kib()
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    return result, seconds, (_peak_kib() - rss_before) * 1024, resettable


def measure(length: int, heads: int, head_dim: int, threads: int, mask: str = "") -> dict:
    """Run causal attention on ``(1, heads, length, head_dim)`` float32 inputs once, under
    the mask expression named `mask` (see ``peers.MASK_PATTERNS``) when one is given.

    Returns the MiB used beyond inputs and output, the seconds the call took, and the
    sampled float64 error.
    """
    import attnscope as ats
    from peers import MASK_PATTERNS, max_relative_error, max_relative_error_masked

    expression = MASK_PATTERNS[mask](length) if mask else None
    options = {"attn_mask": expression} if mask else {"is_causal": True}

    ats.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shape = (1, heads, length, head_dim)
    query, key, value = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    warm = slice(0, min(length, 64))
    ats.scaled_dot_product_attention(
        query[:, :, warm], key[:, :, warm], value[:, :, warm], is_causal=True
    )
    out, seconds, grown, resettable = _run_once(
        lambda: ats.scaled_dot_product_attention(query, key, value, **options)
    )
    if mask:
        error = max_relative_error_masked(out, query, key, value, expression)
    else:
        error = max_relative_error(out, query, key, value, is_causal=True)

    extra_bytes = grown - out.nbytes
    return {
        "extra_mib": max(extra_bytes, 0) / 2**20,
        "inputs_mib": 3 * query.nbytes / 2**20,
        "output_mib": out.nbytes / 2**20,
        "seconds": seconds,
        "peak_counter_reset": resettable,
        "max_rel_error": error,
    }


def measure_backward(length: int, heads: int, head_dim: int, threads: int) -> dict:
    """Run the causal backward pass on ``(1, heads, length, head_dim)`` float32 inputs once.

    The forward runs first (its output and log-sum-exp are inputs of the backward). Returns
    the MiB the backward used beyond its inputs and the three gradients it returns, the
    seconds it took, and the sampled float64 error of ``grad_value``'s last rows.
    """
    import attnscope as ats

    ats.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shape = (1, heads, length, head_dim)
    query, key, value, grad_out = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    out, lse = ats.scaled_dot_product_attention(query, key, value, is_causal=True, return_lse=True)
    warm = slice(0, min(length, 64))
    ats.scaled_dot_product_attention_backward(
        *(x[:, :, warm] for x in (grad_out, query, key, value, out)),
        lse[:, :, warm],
        is_causal=True,
    )
    grads, seconds, grown, resettable = _run_once(
        lambda: ats.scaled_dot_product_attention_backward(
            grad_out, query, key, value, out, lse, is_causal=True
        )
    )
    grads_bytes = sum(grad.nbytes for grad in grads)
    extra_bytes = grown - grads_bytes
    # The last keys are seen only by the last queries: their dV is a small exact sum to check.
    tail = slice(length - 16, length)
    weights = ats.scaled_dot_product_attention(
        query[:, :, tail],
        key,
        value,
        is_causal=True,
        causal_alignment="bottom_right",
        return_weights=True,
    )[1].astype(np.float64)
    expected = np.swapaxes(weights[..., tail], -1, -2) @ grad_out[:, :, tail].astype(np.float64)
    error = np.max(np.abs(grads[2][:, :, tail] - expected)) / np.max(np.abs(expected))
    return {
        "extra_mib": max(extra_bytes, 0) / 2**20,
        "inputs_mib": (5 * query.nbytes + lse.nbytes) / 2**20,
        "output_mib": grads_bytes / 2**20,
        "seconds": seconds,
        "peak_counter_reset": resettable,
        "max_rel_error": float(error),
    }


def run_in_child(
    length: int,
    heads: int,
    head_dim: int,
    threads: int,
    mask: str = "",
    *,
    backward: bool = False,
    simd_level: str | None = None,
) -> dict:
    """:func:`measure` (or :func:`measure_backward`) in a fresh Python process, so earlier
    allocations cannot hide a peak; `simd_level` holds the child's engine to that level."""
    numbers = [str(length), str(heads), str(head_dim), str(threads)]
    done = subprocess.run(
        [sys.executable, __file__, *numbers, *(["--mask", mask] if mask else [])]
        + (["--backward"] if backward else [])
        + (["--simd-level", simd_level] if simd_level else []),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Command line: ``peak_memory.py LENGTH HEADS HEAD_DIM THREADS`` prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("length", "heads", "head_dim", "threads"):
        parser.add_argument(name, type=int)
    parser.add_argument("--mask", default="", help="a mask expression of peers.MASK_PATTERNS")
    parser.add_argument("--backward", action="store_true", help="measure the backward pass")
    parser.add_argument("--simd-level", default=None, help="hold the engine to this level")
    args = parser.parse_args()
    if args.simd_level:
        from attnscope import _core

        _core.force_simd_level(args.simd_level)
    if args.backward:
        result = measure_backward(args.length, args.heads, args.head_dim, args.threads)
    else:
        result = measure(args.length, args.heads, args.head_dim, args.threads, args.mask)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
