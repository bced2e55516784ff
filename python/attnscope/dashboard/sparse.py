"""The computing behind the sparse attention page: attention patterns built from
:mod:`attnscope.masks`, their dense masks and tile maps, the engine timed on a pattern against
the same pattern as a dense bool mask and against full causal attention, the times extrapolated
to long contexts, and a causal LLM's perplexity with a full, a windowed and a sinks + window
cache (StreamingLLM).

Nothing here draws: the page lays these results out with :mod:`.sparse_charts`. The rule of
each pattern lives in :mod:`attnscope.masks` alone; this module only picks the parts.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

import attnscope

from . import budget, engine
from .cost import TARGET_LENGTHS, fit_exponent, time_call
from .text import human_bytes, human_seconds

WINDOW = "Sliding window"
LONGFORMER = "Window + global tokens (Longformer)"
STREAMING = "Sinks + window (StreamingLLM)"
STRIDED = "Strided (Sparse Transformer)"
BIGBIRD = "BigBird: window + global + random blocks"
DOCUMENTS = "Document packing"
PREFIX_LM = "Prefix-LM"
PATTERN_NAMES = (WINDOW, LONGFORMER, STREAMING, STRIDED, BIGBIRD, DOCUMENTS, PREFIX_LM)

EXPRESSION = "mask expression"
DENSE = "dense bool mask"
CAUSAL = "full causal"
TIMED_METHODS = (EXPRESSION, DENSE, CAUSAL)
# A dense bool mask is L×S bytes; the page builds none larger than this (64 MiB is 8,192²), nor
# one past the dashboard's memory budget.
DENSE_MASK_BUDGET = 64 * 2**20
SHORTEST_TIMED = 256
# A Community Cloud app has about 1 GB and 2 cores: a sweep point predicted to take longer
# than this is skipped, not run.
TIME_LIMIT_SECONDS = 2.0


def masks_available() -> bool:
    """Whether this build of attnscope has the mask expressions the page draws and times."""
    return engine.compiled_available() and importlib.util.find_spec("attnscope.masks") is not None


@dataclass(frozen=True)
class Pattern:
    """A pattern picked on the page, with every knob it may use (others are ignored).

    Token counts (window, sinks, stride, block, prefix) stay the same at every length;
    document lengths are given for `drawn_length` tokens and scale with longer sequences.
    """

    kind: str
    window: int = 15  # keys back from the query (15: the query and the 15 keys before it)
    global_positions: tuple[int, ...] = (0, 1)
    sinks: int = 4
    stride: int = 8
    block: int = 8
    random_per_row: int = 2
    global_blocks: int = 1
    seed: int = 0
    document_lengths: tuple[int, ...] = (24, 16, 24)
    drawn_length: int = 64
    prefix: int = 16
    causal: bool = True


def expression(pattern: Pattern, length: int):
    """The :mod:`attnscope.masks` expression of `pattern` for a sequence of `length` tokens.
    The masks module checks every argument: a bad one raises its ValueError or TypeError."""
    from attnscope import masks as M  # noqa: N812  (the name DESIGN.md gives the module)

    kind = pattern.kind
    # A window reaches `window` keys back; under causal nothing ahead is visible anyway.
    ahead = 0 if pattern.causal else pattern.window
    if kind == WINDOW:
        shape = M.window(pattern.window, ahead)
    elif kind == LONGFORMER:
        shape = M.window(pattern.window, ahead) | M.global_tokens(list(pattern.global_positions))
    elif kind == STREAMING:
        shape = M.sinks(pattern.sinks) | M.window(pattern.window, ahead)
    elif kind == STRIDED:
        # The Sparse Transformer's strided heads: the last `stride` keys and every stride-th.
        shape = M.strided(pattern.stride) | M.window(pattern.stride - 1, 0)
    elif kind == BIGBIRD:
        block = pattern.block
        shape = (
            M.random_blocks(block, pattern.random_per_row, pattern.seed)
            | M.window(block)
            | M.global_tokens(list(range(min(pattern.global_blocks * block, length))))
        )
    elif kind == DOCUMENTS:
        shape = M.document(document_ids(pattern.document_lengths, pattern.drawn_length, length))
    elif kind == PREFIX_LM:
        # Bidirectional over the prefix and causal after it: the rule already holds causality.
        return M.prefix_lm(pattern.prefix)
    else:
        raise ValueError(f"pattern must be one of {', '.join(PATTERN_NAMES)}; got {kind!r}")
    return M.causal() & shape if pattern.causal else shape


def document_ids(lengths: tuple[int, ...], drawn_length: int, length: int) -> np.ndarray:
    """One document id per position: document 0 for the first `lengths[0]` tokens, and so on.
    Lengths that add up to `drawn_length` are scaled to `length` (rounded), so a pattern drawn
    at 64 tokens keeps its proportions at 8,192. Others are used as given: ids of the wrong
    length, which the masks module refuses."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and np.all(lengths > 0) and lengths.sum() == drawn_length:
        edges = np.round(np.cumsum(lengths) * (length / drawn_length)).astype(np.int64)
        lengths = np.diff(edges, prepend=0)
    return np.repeat(np.arange(lengths.size, dtype=np.int64), np.maximum(lengths, 0))


def document_split(length: int) -> tuple[int, int, int]:
    """Three packed documents for `length` tokens: 3/8, 1/4 and the rest."""
    first, second = 3 * length // 8, length // 4
    return first, second, length - first - second


# Each knob of a Pattern as the page labels it, and its smallest value. Every value is also at
# most 2**63 - 1 (the masks module's largest size); a seed may reach 2**64 - 1.
KNOBS = {
    "window": ("window (keys back)", 0),
    "sinks": ("sinks", 0),
    "stride": ("stride", 1),
    "block": ("block", 1),
    "random_per_row": ("random blocks per row", 0),
    "global_blocks": ("global blocks", 0),
    "seed": ("seed", 0),
    "prefix": ("prefix", 0),
}
LARGEST = 2**63 - 1


def parse_pattern(kind: str, drawn_length: int, **inputs) -> Pattern:
    """The page's raw inputs as a Pattern: number boxes through :func:`budget.whole_number`,
    the text fields (``global_positions``, ``document_lengths``) through
    :func:`budget.whole_numbers`, and ``causal`` as it is.

    Raises:
        ValueError: a value that is not a whole number in range, or document lengths that do
            not add up to `drawn_length`; the message names the field.
    """
    knobs: dict = {"kind": kind, "drawn_length": drawn_length}
    for name, value in inputs.items():
        if name in KNOBS:
            label, minimum = KNOBS[name]
            largest = 2**64 - 1 if name == "seed" else LARGEST
            knobs[name] = budget.whole_number(value, label, minimum=minimum, maximum=largest)
        elif name == "global_positions":
            knobs[name] = budget.whole_numbers(
                value, "global token positions", minimum=0, maximum=LARGEST
            )
        elif name == "document_lengths":
            lengths = budget.whole_numbers(value, "document lengths", minimum=1, maximum=LARGEST)
            if sum(lengths) != drawn_length:
                raise ValueError(
                    f"document lengths must add up to {drawn_length}, the drawn length; "
                    f"{', '.join(map(str, lengths)) or 'none'} add up to {sum(lengths):,}"
                )
            knobs[name] = lengths
        elif name == "causal":
            knobs[name] = bool(value)
        else:
            raise ValueError(f"a pattern has no knob {name!r}")
    return Pattern(**knobs)


@dataclass(frozen=True)
class MaskPicture:
    """What the page draws of a pattern at a small length: the mask and its tile map."""

    dense: np.ndarray  # (L, L) bool, True = the query sees the key
    tiles: np.ndarray  # (L / block, L / block): 0 empty, 1 partial, 2 full
    tile_counts: dict[str, int]  # how many tiles are empty, partial and full
    block: int
    visible_fraction: float
    expression_text: str


TILE_STATES = ("empty", "partial", "full")  # in the order of the masks module's states


def picture(pattern: Pattern, length: int, block: int) -> MaskPicture:
    """`pattern` at `length` tokens: its dense mask and its tile layout, both from the masks
    module (the page never recomputes a rule)."""
    budget.check(
        budget.estimate_dense_mask(length, length, layout_block=block),
        f"Drawing the mask at L = {length:,}",
        lower="the drawn length or raise the tile size",
    )
    mask = expression(pattern, length)
    dense = np.asarray(mask.to_dense(length, length), dtype=bool)
    layout = mask.layout(length, length, block=block)
    return MaskPicture(
        dense=dense,
        tiles=np.asarray(layout.states),
        tile_counts=layout.counts(),
        block=block,
        visible_fraction=float(layout.visible_fraction),
        expression_text=repr(mask),
    )


# --- Timing ---------------------------------------------------------------------------------


def dense_mask_bytes(length: int) -> int:
    """A dense bool mask holds one byte per (query, key) pair."""
    return length * length


def dense_mask_limit() -> int:
    """The most bytes a dense mask built here may take: the page's own cap or the dashboard's
    memory budget, whichever is smaller."""
    return min(DENSE_MASK_BUDGET, budget.budget_bytes())


def dense_refusal(n: int) -> str | None:
    """Why the dense path does not run at length `n` (its mask would not fit), or None."""
    if dense_mask_bytes(n) <= dense_mask_limit():
        return None
    size = human_bytes(dense_mask_bytes(n))
    return f"not built: its {n:,}×{n:,} bool mask alone needs {size}"


def timed_call(method: str, pattern: Pattern, n: int, q, k, v) -> Callable[[], object] | str:
    """The call that `method` times at length `n`, or the reason it is not run."""
    sdpa = attnscope.scaled_dot_product_attention
    if method == CAUSAL:
        return partial(sdpa, q, k, v, is_causal=True)
    mask = expression(pattern, n)
    if method == EXPRESSION:
        return partial(sdpa, q, k, v, attn_mask=mask)
    return dense_refusal(n) or partial(sdpa, q, k, v, attn_mask=np.asarray(mask.to_dense(n, n)))


def time_method(
    pattern: Pattern, n: int, method: str, head_dim: int = 64, seed: int = 0
) -> tuple[float, str]:
    """``(seconds, "measured")``: the best of a few runs of `method` at length `n` on one head
    of random float32 inputs (:func:`time_call`); or ``(nan, why)`` when it is not run
    (its mask or its inputs would not fit the memory budget)."""
    needed = budget.estimate_attention(n, n, head_dim)
    if needed > budget.budget_bytes():
        return math.nan, f"not run: its inputs need {human_bytes(needed)}"
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, head_dim), dtype=np.float32) for _ in range(3))
    call = timed_call(method, pattern, n, q, k, v)
    if isinstance(call, str):
        return math.nan, call
    return time_call(call), "measured"


def sweep(
    pattern: Pattern,
    sizes: list[int],
    head_dim: int = 64,
    *,
    time_limit: float = TIME_LIMIT_SECONDS,
    progress: Callable[[float, str], None] | None = None,
    measure: Callable[[Pattern, int, str, int], tuple[float, str]] = time_method,
) -> pd.DataFrame:
    """Time the engine on `pattern` (as an expression and as a dense bool mask) and on full
    causal attention at every length with `measure` (:func:`time_method`, or a cached copy of
    it). A method stops once its next point is predicted to take over `time_limit` seconds;
    a dense mask over :func:`dense_mask_limit` bytes is never built. Columns as :func:`cost.sweep`:
    n, method, seconds, status."""
    rows = []
    last_time: dict[str, float] = {}
    steps, done = len(sizes) * len(TIMED_METHODS), 0
    for n in sizes:
        for method in TIMED_METHODS:
            done += 1
            if progress is not None:
                progress(done / steps, f"{method} at n = {n:,}")
            refused = dense_refusal(n) if method == DENSE else None
            if refused is not None:
                seconds, status = math.nan, refused
            elif last_time.get(method, 0.0) * 4.5 > time_limit:
                seconds = math.nan
                status = f"skipped: would take about {human_seconds(last_time[method] * 4)}"
            else:
                seconds, status = measure(pattern, n, method, head_dim)
            if status == "measured":
                last_time[method] = seconds
            rows.append({"n": n, "method": method, "seconds": seconds, "status": status})
    return pd.DataFrame(rows, columns=["n", "method", "seconds", "status"])


def speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """At each length measured for the expression: how many times faster it ran than the
    dense mask and than full causal attention (NaN where the other was not measured)."""
    table = frame.pivot(index="n", columns="method", values="seconds").reindex(
        columns=list(TIMED_METHODS)
    )
    table = table[table[EXPRESSION].notna()]
    return pd.DataFrame(
        {
            "n": table.index,
            "expression": [human_seconds(s) for s in table[EXPRESSION]],
            "× faster than the dense mask": (table[DENSE] / table[EXPRESSION]).round(1).values,
            "× faster than full causal": (table[CAUSAL] / table[EXPRESSION]).round(1).values,
        }
    )


def projections(frame: pd.DataFrame, targets=TARGET_LENGTHS) -> pd.DataFrame:
    """Per method and target length, readable time: measured when the sweep reached it,
    else extrapolated with :func:`fit_exponent` (marked ``*``). The dense path says
    instead what its mask would weigh where it could not be built. Methods × lengths."""
    rows = []
    for method in TIMED_METHODS:
        fit = fit_exponent(frame, method)
        for n in targets:
            hit = frame[(frame["method"] == method) & (frame["n"] == n)]
            if len(hit) and hit["status"].iloc[0] == "measured":
                shown = human_seconds(float(hit["seconds"].iloc[0]))
            elif method == DENSE and dense_mask_bytes(n) > dense_mask_limit():
                shown = f"not built: mask of {human_bytes(dense_mask_bytes(n))}"
            elif fit is not None:
                exponent, constant = fit
                shown = f"{human_seconds(constant * n**exponent)} * (n^{exponent:.2f})"
            else:
                shown = "too few points to extrapolate"
            rows.append({"method": method, "n": n, "time": shown})
    table = pd.DataFrame(rows).pivot(index="method", columns="n", values="time")
    return table.reindex(list(TIMED_METHODS)).rename(columns="n = {:,}".format)


# --- Perplexity: the StreamingLLM effect -----------------------------------------------------

# A long text in plain English for the perplexity runs (about 700 tokens for SmolLM2).
LONG_TEXT = " ".join(
    """A language model reads a text one token at a time and, at every step, guesses the next
    token from the ones before it. To make that guess it compares the current token with every
    earlier token, decides which of them matter, and blends what they carry. This comparison
    is called attention, and it is the heart of every modern chat assistant.

    The comparison has a price. When the text is twice as long, every token has twice as many
    earlier tokens to compare with, and there are twice as many tokens doing the comparing, so
    the work grows four times. Early models stopped at two thousand tokens for that reason.
    Later ones reached eight thousand, and today's models read two hundred thousand tokens at
    once, about the length of a thick novel.

    Three ideas made that jump possible. The first one changes how the work is done, not how
    much of it there is: the scores are computed tile by tile, in fast memory, and never stored
    as one enormous table. The second one limits how far back a token may look: with a sliding
    window, each token only compares itself with the few hundred tokens just before it, so the
    work grows in a straight line with the length of the text. The third one keeps a chosen
    set of long-range links: a few global tokens that everyone sees, a stride that jumps back
    in regular steps, or a handful of random blocks. These are the sparse patterns.

    A sliding window has a surprising weakness. Models learn to park a large share of their
    attention on the very first tokens of a text, whatever those tokens say, simply because
    the weights of a row must add up to one and the first tokens are always there. When a
    window slides past the start of the text, those resting places disappear, the weights
    spill onto tokens that do not deserve them, and the predictions get worse. Keeping the
    first few tokens in the cache, next to the window, gives the attention its resting place
    back. Researchers called those tokens attention sinks, and the trick lets a model stream
    through texts far longer than its window while keeping its memory fixed.

    Consider a simple story to see the effect. Anna owns a small bakery at the corner of the
    market square. Every morning she lights the oven at five, kneads the dough she prepared
    the night before, and shapes the loaves by hand. Her brother Tom delivers the bread to the
    cafes of the old town on his bicycle. On rainy days he wraps the baskets in a blue cloth
    that their grandmother sewed. The cafe owners know the cloth, and when they see it coming
    down the street they put the coffee on. Anna keeps a notebook of every order, and at the
    end of each month she counts how many loaves each cafe took. In winter the cafes order
    more rye bread; in summer they want light rolls for the tourists who sit outside.

    One autumn the oven broke. Anna called the repairman, who said the part would take two
    weeks to arrive. For two weeks she baked in the oven of the school next door, after the
    children had eaten lunch, and Tom delivered the bread in the afternoon instead of the
    morning. The cafes were patient. When the new part arrived, the repairman fixed the oven
    in an hour, and the next morning the smell of fresh bread filled the market square again.
    Tom wrapped the baskets in the blue cloth, although it was not raining, because the cafe
    owners had missed seeing it come down the street.""".split()
)


@dataclass(frozen=True)
class CacheSetting:
    """One way of reading the text: which keys a KV cache keeps for each query."""

    name: str
    window: int | None
    sinks: int


def cache_settings(window: int, sinks: int) -> list[CacheSetting]:
    """Full attention, the window alone, and the same window with `sinks` first tokens kept."""
    return [
        CacheSetting("full attention", None, 0),
        CacheSetting(f"window of {window}", window, 0),
        CacheSetting(f"{sinks} sinks + window of {window}", window, sinks),
    ]


def perplexities(
    read: Callable[[int | None, int], object],
    settings: list[CacheSetting],
    progress: Callable[[float, str], None] | None = None,
) -> pd.DataFrame:
    """The text's perplexity under each setting, from ``read(window, sinks)`` (a model's
    ``perplexity`` on the text, or a cached copy of it). Columns: setting, window, sinks,
    nll (nats per token), perplexity, tokens."""
    rows = []
    for done, setting in enumerate(settings):
        if progress is not None:
            progress(done / len(settings), f"Reading the text with {setting.name}")
        result = read(setting.window, setting.sinks)
        rows.append(
            {
                "setting": setting.name,
                "window": "all" if setting.window is None else str(setting.window),
                "sinks": setting.sinks,
                "nll": result.nll,
                "perplexity": result.ppl,
                "tokens": result.tokens,
            }
        )
    return pd.DataFrame(rows)


def streaming_summary(table: pd.DataFrame) -> str:
    """One sentence on what the sinks did: how much perplexity the window alone lost and how
    much of it keeping the first tokens won back."""
    full, windowed, sunk = (float(p) for p in table["perplexity"].iloc[:3])
    lost = windowed - full
    if lost <= 0 or not math.isfinite(lost):
        return (
            f"Here the window alone did not hurt (perplexity {windowed:.2f} against {full:.2f} "
            "with the whole text): try a smaller window."
        )
    regained = (windowed - sunk) / lost
    return (
        f"The window alone raised perplexity from {full:.2f} to {windowed:.2f}; keeping the "
        f"first tokens brought it to {sunk:.2f}, winning back {regained:.0%} of that loss."
    )
