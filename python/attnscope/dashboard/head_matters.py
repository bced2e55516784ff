"""The computing behind the Real model page's view "Does this head matter?".

Where a head looks is one question; whether the model uses it is another. For the chapter's
sentence, continued so that SmolLM2 has to name who was tired, this module measures for every
head how strongly "she" attends to "nurse", what removing the head (zero or mean ablation) does
to the log-probability of the answer, and how much of the she-versus-he preference patching the
head alone carries back. Nothing here draws: :mod:`attnscope.dashboard.head_matters_charts`
makes the charts and :mod:`attnscope.dashboard.head_matters_view` lays them out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

import attnscope.models as am

from . import real_model as rm

MODEL = rm.CAUSAL_MODEL
# The chapter's sentence, continued so that the next word says who was tired: SmolLM2 answers
# "nurse" after "she" and "doctor" after "he".
SENTENCE = "The doctor fired the nurse because she was tired. The tired"
NOUNS = ("nurse", "doctor")
PREDICTION = "prediction"  # the target choice "whatever the model predicts"
# Every head is ablated once per kind, so the page reads short texts only.
MAX_TOKENS = 40
# Below this the two ablations are taken to agree that a head does nothing.
NEGLIGIBLE = 0.05
_PRONOUN = re.compile(r"\b(she|he)\b", re.IGNORECASE)

Progress = Callable[[float, str], None]


def swap_pronoun(text: str) -> str | None:
    """`text` with every she and he swapped (case kept), or None when it has neither."""
    if not _PRONOUN.search(text):
        return None

    def swapped(match: re.Match) -> str:
        word = match.group(0)
        other = "he" if word.lower() == "she" else "she"
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _PRONOUN.sub(swapped, text)


def word_id(model: am.Model, word: str) -> int | None:
    """The token id of `word` following a space, or None when it takes several tokens."""
    ids = model.tokenize(" " + word)[1]
    return int(ids[0]) if ids.size == 1 else None


def token_label(model: am.Model, token_id: int) -> str:
    """A token as a reader sees it (byte-level BPE marks turned into plain text)."""
    return rm.display_tokens([model.tokenizer.id_to_token(int(token_id)) or str(token_id)])[0]


@dataclass(frozen=True, eq=False)
class Analysis:
    """Every head of `model` on one text: where it looks, and what removing it does.

    ``table`` has a row per head: layer, head, attention (the source token's weight on the
    looked-at token), zero and mean (the change of log p(target) when the head is ablated
    that way). ``patching`` has layer, head and share (of the clean-minus-corrupt logit
    difference between ``patch_pair`` that patching the head restores), or is None with
    ``patch_note`` saying why.
    """

    trace: am.Trace
    tokens: list[str]
    source: int
    looked_at: int
    target: int
    target_label: str
    table: pd.DataFrame
    patching: pd.DataFrame | None
    patch_pair: tuple[str, str] | None
    counterfactual: str | None
    patch_note: str

    @property
    def source_word(self) -> str:
        return self.tokens[self.source]

    @property
    def looked_at_word(self) -> str:
        return self.tokens[self.looked_at]


def analyse(
    model: am.Model, text: str, target: str = PREDICTION, progress: Progress | None = None
) -> Analysis:
    """Ablate and patch every head of `model` on `text`.

    Args:
        target: ``"prediction"`` (the model's own likeliest next token) or one of
            :data:`NOUNS`.
        progress: called with (fraction done, what is running).

    Raises:
        rm.ReadingError: an empty or too long text, or a target word that is not one token.
    """
    if not model.is_causal:
        raise rm.ReadingError(f"{model.name} predicts no next token: pick a causal model.")
    ids = model.tokenize(text)[1]
    if ids.size == 0:
        raise rm.ReadingError("Type some text: this one gives no tokens.")
    if ids.size > MAX_TOKENS:
        raise rm.ReadingError(
            f"That text is {ids.size} tokens long; this view ablates every head of it, twice, "
            f"so it reads at most {MAX_TOKENS} tokens. Shorten the text."
        )
    trace = model.encode(ids=ids)
    tokens = rm.display_tokens(trace.tokens)
    target_id = _target_id(model, trace, target)
    source, looked_at = _source_and_noun(tokens, target_id, model)
    steps = 3 if swap_pronoun(text) is not None else 2

    def stage(index: int, label: str) -> Callable[[float], None] | None:
        if progress is None:
            return None
        return lambda done: progress((index + done) / steps, label)

    effects = {
        how: am.head_effects(
            model, ids=ids, target=target_id, ablation=how, progress=stage(i, f"{how} ablation")
        )
        for i, how in enumerate(("zero", "mean"))
    }
    layers, heads = effects["zero"].shape
    table = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "attention": trace.attentions[:, :, source, looked_at].ravel().astype(float),
            "zero": effects["zero"].ravel(),
            "mean": effects["mean"].ravel(),
        }
    )
    patching, pair, counterfactual, note = _patching(
        model, text, trace, target_id, stage(2, "patching")
    )
    return Analysis(
        trace,
        tokens,
        source,
        looked_at,
        target_id,
        token_label(model, target_id),
        table,
        patching,
        pair,
        counterfactual,
        note,
    )


def _target_id(model: am.Model, trace: am.Trace, target: str) -> int:
    if target == PREDICTION:
        return int(np.argmax(trace.logits[-1]))
    token = word_id(model, target)
    if token is None:
        raise rm.ReadingError(f"'{target}' is not a single token for {model.name}.")
    return token


def _source_and_noun(tokens: list[str], target_id: int, model: am.Model) -> tuple[int, int]:
    """The looking token (the last she/he, else the last token) and the looked-at one (the
    target word where the text has it, else the first of the nouns it has, else the first
    token)."""
    lowered = [token.lower() for token in tokens]
    pronouns = [i for i, token in enumerate(lowered) if token in ("she", "he")]
    source = pronouns[-1] if pronouns else len(tokens) - 1
    wanted = [token_label(model, target_id).lower(), *NOUNS]
    for word in wanted:
        if word in lowered[: source + 1]:
            return source, lowered.index(word)
    return source, 0


def _patching(model, text, trace, target_id, progress):
    """The patching table for `text` against its pronoun-swapped twin, or why there is none."""
    counterfactual = swap_pronoun(text)
    if counterfactual is None:
        return None, None, None, "The text has no she or he to swap, so there is nothing to patch."
    corrupt = model.tokenize(counterfactual)[1]
    if corrupt.size != trace.ids.size:
        return None, None, counterfactual, "The swapped text has another number of tokens."
    nouns = {word: word_id(model, word) for word in NOUNS}
    if None in nouns.values():
        return None, None, counterfactual, "The nouns are not single tokens for this model."
    # The pair: the noun the clean text prefers (the target if it is one of them) vs the other.
    logits = trace.logits[-1]
    first = next((w for w, i in nouns.items() if i == target_id), None)
    if first is None:
        first = max(nouns, key=lambda word: logits[nouns[word]])
    second = next(word for word in NOUNS if word != first)
    try:
        shares = am.patching_effects(
            model, trace.ids, corrupt, nouns[first], nouns[second], progress=progress
        )
    except ValueError as problem:
        return None, None, counterfactual, str(problem)
    layers, heads = shares.shape
    frame = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            "share": shares.ravel(),
        }
    )
    return frame, (first, second), counterfactual, ""


def top_heads(frame: pd.DataFrame, column: str, count: int = 3, largest: bool = True) -> str:
    """'layer 24 head 6 (−0.38), …': the `count` heads with the largest (or smallest) values."""
    ordered = frame.sort_values(column, ascending=not largest).head(count)
    return ", ".join(
        f"layer {row.layer} head {row.head} ({getattr(row, column):+.2f})"
        for row in ordered.itertuples()
    )


def disagreement(table: pd.DataFrame) -> str:
    """Where zero and mean ablation disagree most, and why they can (or that they agree)."""
    gap = (table["zero"] - table["mean"]).abs()
    row = table.loc[gap.idxmax()]
    zero, mean = float(row["zero"]), float(row["mean"])
    if max(abs(zero), abs(mean)) < NEGLIGIBLE:
        return "Zero and mean ablation agree here: no head moves the answer much either way."
    both_matter = table[["zero", "mean"]].abs().min(axis=1) >= NEGLIGIBLE
    flipped = int((both_matter & (np.sign(table["zero"]) != np.sign(table["mean"]))).sum())
    flips = f" {flipped} heads even change sign between the two." if flipped else ""
    return (
        f"Zero and mean ablation disagree most on layer {int(row['layer'])} head "
        f"{int(row['head'])}: zeroing it changes log p by {zero:+.2f}, replacing its output at "
        f"every position by its average over the sentence by {mean:+.2f}.{flips} Zeroing "
        "removes everything the head writes, including the part it writes everywhere and the "
        "later layers may count on; the mean keeps that part and removes only what differs "
        "from token to token, such as what she read from nurse."
    )


def next_tokens(
    model: am.Model, ids: np.ndarray, layer: int, head: int, ablation: str, count: int = 8
) -> pd.DataFrame:
    """The likeliest next tokens with and without one head: token, before, after (both
    probabilities), the union of the `count` likeliest of each run, likeliest first."""
    before = probabilities(model.encode(ids=ids).logits[-1])
    after = probabilities(
        model.encode(ids=ids, ablate=[(layer, head)], ablation=ablation).logits[-1]
    )
    chosen = np.union1d(np.argsort(-before)[:count], np.argsort(-after)[:count])
    chosen = chosen[np.argsort(-np.maximum(before[chosen], after[chosen]))]
    return pd.DataFrame(
        {
            "token": [token_label(model, i) for i in chosen],
            "before": before[chosen],
            "after": after[chosen],
        }
    )


def probabilities(logits: np.ndarray) -> np.ndarray:
    """softmax(logits) in float64."""
    values = logits.astype(np.float64)
    values = np.exp(values - values.max())
    return values / values.sum()
