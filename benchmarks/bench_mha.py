"""The multi-head attention layer and KV-cache decoding, against torch in the same process.

    python benchmarks/bench_mha.py              # 2 threads, the sizes below
    python benchmarks/bench_mha.py --threads 1 --cache-tokens 8192

* Decode: one query token against a cache of ``--cache-tokens`` tokens, 32 heads of width 128
  (and a grouped variant, 32 query heads over 8 kv heads), reported as GB/s of K+V read per
  step next to the machine's measured read bandwidth, and against ``torch.nn.functional.
  scaled_dot_product_attention`` over the same keys.
* Layer: E=512, 8 heads, L=2048 self-attention, ``attnscope.MultiHeadAttention`` converted
  from an ``nn.MultiheadAttention`` (``need_weights=False``), both at the same thread count.

Interleaved rounds, medians; the machine is shared, so read ratios rather than absolute times.
"""

from __future__ import annotations

import argparse

import attnscope as ats
import limits
import numpy as np
from timing import Plan, interleave

PLAN = Plan(budget_s=6.0, min_repeats=5, max_repeats=50, min_sample_s=0.05)


def decode_rows(torch, cache_tokens: int) -> None:
    for kv_heads in (32, 8):
        decode_row(torch, cache_tokens, query_heads=32, kv_heads=kv_heads, head_dim=128)


def decode_row(torch, cache_tokens: int, *, query_heads: int, kv_heads: int, head_dim: int):
    rng = np.random.default_rng(0)
    shape = (1, kv_heads, cache_tokens, head_dim)
    keys = rng.standard_normal(shape, dtype=np.float32)
    values = rng.standard_normal(shape, dtype=np.float32)
    cache = ats.KVCache(kv_heads, head_dim)
    for start in range(0, cache_tokens, 4096):  # filled in prefill-sized appends
        part = slice(start, start + 4096)
        cache.append(keys[:, :, part], values[:, :, part])
    query = rng.standard_normal((1, query_heads, 1, head_dim), dtype=np.float32)
    grouped = kv_heads != query_heads
    contenders = {"attnscope": lambda: cache.attend(query, enable_gqa=grouped)}
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a) for a in (query, keys, values))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        contenders["torch sdpa"] = lambda: sdpa(tq, tk, tv, enable_gqa=grouped)
        difference = np.abs(contenders["attnscope"]() - contenders["torch sdpa"]().numpy())
        assert difference.max() < 1e-4, difference.max()
    timings = interleave(contenders, PLAN)
    read = cache.nbytes
    label = f"decode 1 query, {query_heads} q heads / {kv_heads} kv heads, D={head_dim}"
    print(f"{label}, {cache_tokens} cached tokens ({read / 2**30:.2f} GiB K+V):")
    for name, timing in timings.items():
        print(
            f"  {name:12s} {timing.median_s * 1e3:8.2f} ms  "
            f"{read / timing.median_s / 1e9:6.1f} GB/s of K+V"
        )
    if torch is not None:
        ratio = timings["torch sdpa"].median_s / timings["attnscope"].median_s
        print(f"  attnscope is {ratio:.2f}x torch sdpa")


def layer_row(torch) -> None:
    if torch is None:
        print("layer: torch is not installed, nothing to compare with")
        return
    embed_dim, heads, length = 512, 8, 2048
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(embed_dim, heads, batch_first=True).eval()
    layer = ats.MultiHeadAttention.from_torch(module)
    x = np.random.default_rng(1).standard_normal((1, length, embed_dim), dtype=np.float32)
    tx = torch.from_numpy(x)

    def run_torch():
        with torch.inference_mode():
            return module(tx, tx, tx, need_weights=False)[0]

    difference = np.abs(layer(x) - run_torch().numpy()).max()
    assert difference < 1e-4, difference
    timings = interleave({"attnscope": lambda: layer(x), "torch MHA": run_torch}, PLAN)
    print(f"layer E={embed_dim} H={heads} L={length} B=1 self-attention, need_weights=False:")
    for name, timing in timings.items():
        print(f"  {name:12s} {timing.median_s * 1e3:8.2f} ms")
    ratio = timings["torch MHA"].median_s / timings["attnscope"].median_s
    print(f"  attnscope is {ratio:.2f}x nn.MultiheadAttention (max |diff| {difference:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-tokens", type=int, default=32768)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    ats.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    bandwidth = limits.measure_read_bandwidth(args.threads, 1 << 30, torch=torch)
    print(f"threads {args.threads}, load average {limits.load_average()}")
    print(f"measured read bandwidth: {bandwidth}")
    decode_rows(torch, args.cache_tokens)
    layer_row(torch)


if __name__ == "__main__":
    main()
