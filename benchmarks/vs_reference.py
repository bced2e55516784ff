"""attnscope against its own executable specification, `attnscope.reference` (float64 NumPy).

The reference materialises every L x S matrix, as a textbook implementation would; this table
shows what the tiled kernel saves over it. Run from the repository root:

    python benchmarks/vs_reference.py            # L = S = 512, 2048, 4096
    python benchmarks/vs_reference.py --quick    # L = S = 256, 512
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attnscope  # noqa: E402
from attnscope import reference  # noqa: E402
from timing import Plan, interleave  # noqa: E402

HEADS, HEAD_DIM = 8, 64


def run(lengths: list[int], threads: int) -> list[dict]:
    """One row per (length, causal): median seconds of each and the float32 error."""
    attnscope.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        shape = (1, HEADS, length, HEAD_DIM)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        for causal in (False, True):
            arguments = {"query": q, "key": k, "value": v, "is_causal": causal}
            timings = interleave(
                {
                    "attnscope": partial(attnscope.scaled_dot_product_attention, **arguments),
                    "reference": partial(reference.scaled_dot_product_attention, **arguments),
                },
                Plan(budget_s=20.0, min_repeats=3, max_repeats=15, min_sample_s=0.02),
            )
            expected = reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
            got = attnscope.scaled_dot_product_attention(q, k, v, is_causal=causal)
            error = float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max()))
            rows.append(
                {
                    "length": length,
                    "causal": causal,
                    "attnscope_s": timings["attnscope"].median_s,
                    "reference_s": timings["reference"].median_s,
                    "error": error,
                }
            )
    return rows


def table(rows: list[dict], threads: int) -> str:
    lines = [
        f"attnscope vs attnscope.reference, B1 H{HEADS} D{HEAD_DIM} float32 inputs, "
        f"{threads} thread(s) for attnscope, medians of interleaved runs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "",
        "| L = S | mask | attnscope | reference (float64 NumPy) | speed-up | max rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['length']} | {'causal' if row['causal'] else 'full'} "
            f"| {row['attnscope_s'] * 1e3:.2f} ms | {row['reference_s'] * 1e3:.1f} ms "
            f"| {row['reference_s'] / row['attnscope_s']:.0f}x | {row['error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    lengths = [256, 512] if args.quick else [512, 2048, 4096]
    print(table(run(lengths, args.threads), args.threads))


if __name__ == "__main__":
    main()
