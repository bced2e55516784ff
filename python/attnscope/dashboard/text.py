"""Sentences to words and tokens for every page: the one place a reader's text is split, cut
to a page's limit, refused when empty, tagged with the word classes the designed heads read,
and turned into a fixed random vector per word; and the times and sizes every page writes
for a reader ('12.3 ms', '1.5 GiB').

A tiny rule-based tagger stands in for what a trained model learns: it is enough for the
example sentences and for most short sentences a reader types in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

MAX_TOKENS = 32

# Word classes, in the order of the embedding's one-hot block.
ROLES = ("determiner", "noun", "pronoun", "verb", "adjective", "punctuation", "other")

EXAMPLES = {
    "The cat sleeps": "The cat sleeps in the sun, and the dog barks at the door.",
    "Coreference": "The baby cried because he was hungry.",
    "The doctor and the nurse": "The doctor fired the nurse because she was tired.",
    "Agreement": "The king thanked the queen because he was proud.",
    "Rhyme": "The cat in the hat sat on the mat.",
}

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")

_DETERMINERS = set(
    "the a an this that these those his its their my your our some every each no any".split()
)
_PRONOUNS = set("he she it they him her them i you we me us hers himself herself itself".split())
_VERBS = set(
    """is are was were be been am has have had do does did will would can could should may
    might must sleeps sleep slept fired fires cried cries cry ate eats eat sat sits sit ran runs
    run barks barked bark chased chases saw sees see thanked thanks loves loved love likes liked
    said says gave gives took takes went goes came comes helped helps called told asked wanted
    needed found thought knew made wrote read reads sang sings lost won fell falls left waited
    smiled laughed slept woke wakes plays played""".split()
)
_ADJECTIVES = set(
    """tired hungry happy sad warm cold big small old young red proud angry late sick good bad
    new long little quiet loud brave kind""".split()
)
_MASCULINE = set(
    "he him his himself king man boy father brother son husband prince uncle sir".split()
)
_FEMININE = set(
    "she her hers herself queen woman girl mother sister daughter wife princess aunt".split()
)
_VOWELS = "aeiouy"


class InputError(ValueError):
    """Input a page cannot use; the message is meant for the reader."""


@dataclass(frozen=True)
class Token:
    """One token and the features its designed embedding is made of."""

    text: str
    role: str
    gender: str | None  # "masculine", "feminine" or None
    rime: str | None  # the ending a rhyme compares, for content words


def split_words(sentence: str) -> list[str]:
    """Words, numbers and single punctuation marks, in order."""
    return _TOKEN.findall(sentence)


@dataclass(frozen=True)
class SentenceRule:
    """How a page reads the reader's sentence: at most `max_words` words, the message for a
    sentence with none, and the note when words were left out (formatted with ``count``, the
    words typed, and ``limit``)."""

    max_words: int
    empty: str
    shortened: str

    def words(self, sentence: str) -> tuple[list[str], str | None]:
        """The first `max_words` words of `sentence`, and the note when there were more.

        Raises InputError with the `empty` message for a sentence with no word in it.
        """
        words = split_words(sentence or "")
        if not words:
            raise InputError(self.empty)
        if len(words) <= self.max_words:
            return words, None
        return words[: self.max_words], self.shortened.format(
            count=len(words), limit=self.max_words
        )


HEADS_SENTENCE = SentenceRule(
    MAX_TOKENS,
    empty="Type a sentence with at least one word to see its attention.",
    shortened="That text has {count:,} tokens; the heatmaps show its first {limit} so that "
    "every label stays readable.",
)


def word_vector(word: str, size: int) -> np.ndarray:
    """A fixed standard-normal vector for `word` (any case), seeded by the word itself, so the
    same word gets the same vector on every page and every run, and editing one word changes
    only its own vector."""
    digest = hashlib.blake2b(word.lower().encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "big")).standard_normal(size)


def _rime(word: str) -> str:
    """The last vowel group and what follows it: 'cat' -> 'at', 'sleeps' -> 'eeps'."""
    lower = word.lower()
    end = len(lower)
    position = end - 1
    while position >= 0 and lower[position] not in _VOWELS:
        position -= 1
    while position > 0 and lower[position - 1] in _VOWELS:
        position -= 1
    return lower[max(position, 0) : end]


def _role(word: str, previous_role: str | None) -> str:
    lower = word.lower()
    if not lower[0].isalnum():
        return "punctuation"
    if lower in _DETERMINERS:
        return "determiner"
    if lower in _PRONOUNS:
        return "pronoun"
    if lower in _VERBS:
        return "verb"
    if lower in _ADJECTIVES:
        return "adjective"
    if lower in _OTHER:
        return "other"
    if previous_role in ("determiner", "adjective"):
        return "noun"
    if previous_role in ("noun", "pronoun") and (lower.endswith("s") or lower.endswith("ed")):
        return "verb"
    if lower.endswith("ed") and len(lower) > 4:
        return "verb"
    return "noun"


_OTHER = set(
    """because and or but so in on at to of with for from by after before while when if then
    not very too also as than there here up down out into over under again yes""".split()
)


def tag(words: list[str]) -> list[Token]:
    """Give each word a role, a gender when the word carries one, and a rime for rhymes."""
    tokens: list[Token] = []
    previous_role = None
    for word in words:
        role = _role(word, previous_role)
        lower = word.lower()
        gender = "masculine" if lower in _MASCULINE else "feminine" if lower in _FEMININE else None
        rime = _rime(word) if role in ("noun", "verb", "adjective") and len(word) > 1 else None
        tokens.append(Token(word, role, gender, rime))
        previous_role = role
    return tokens


def gendered_nouns(gender: str) -> list[str]:
    """The nouns whose gender ("masculine" or "feminine") the tagger knows, sorted."""
    words = {"masculine": _MASCULINE, "feminine": _FEMININE}.get(gender)
    if words is None:
        raise ValueError(f"gender must be 'masculine' or 'feminine', got {gender!r}")
    return sorted(words - _PRONOUNS - _DETERMINERS)


def tokenize(sentence: str) -> tuple[list[Token], str | None]:
    """The Heads page's tagged tokens of `sentence`, and a note for the reader when it had to
    be shortened. Raises InputError for a sentence with no word in it."""
    words, note = HEADS_SENTENCE.words(sentence)
    return tag(words), note


# The words the pages use without stopping to explain them, in the order a reader meets them.
GLOSSARY = {
    "query, key, value (Q, K, V)": "Three vectors made from every token's embedding x by "
    "learned matrices: Q = x·W_Q is what the token looks for, K = x·W_K is how it presents "
    "itself to others, V = x·W_V is what it hands over when another token picks it.",
    "softmax": "Turns a row of scores into weights that are positive and sum to 1: "
    "exp(score) over the row's sum of exp. A large gap between scores puts nearly all the "
    "weight on one key.",
    "d_k and √d_k": "d_k is the width of the query and key vectors. A score adds up d_k "
    "products, so it grows like √d_k; dividing by √d_k keeps softmax from saturating.",
    "head, multi-head": "One Q/K/V system is a head. A layer runs several in parallel on "
    "the same tokens, each with its own matrices, so each can follow a different relation.",
    "causal mask": "A token may look only at itself and earlier tokens. Every text generator "
    "uses it; it is the grey triangle on the heatmaps.",
    "bidirectional": "Every token sees every other, before and after it (BERT, encoders).",
    "top_left / bottom_right": "Where the causal diagonal sits when there are fewer queries "
    "than keys. top_left (PyTorch's is_causal) lines query 0 up with key 0; bottom_right "
    "lines the last query up with the last key, which is what decoding with a KV cache needs.",
    "sliding window": "Each token sees only the w most recent keys, so the cost grows like "
    "n·w instead of n².",
    "grouped-query attention (GQA)": "Several query heads share one key/value head. The "
    "model keeps fewer keys and values, so its KV cache shrinks by the group size.",
    "KV cache": "While a model generates, it stores every past token's keys and values so "
    "that each new token only computes its own and reads the stored ones, instead of "
    "recomputing the whole sequence at every step.",
    "FlashAttention": "Computes attention in tiles of queries and keys, keeping a running "
    "maximum and sum per query, so the n×n matrix of scores is never stored.",
    "log-sum-exp (lse)": "log Σ exp(score) over a row's visible keys: with it, any weight is "
    "exp(score − lse). FlashAttention keeps it so the backward pass can rebuild weights.",
    "entropy (nats)": "How spread out a row of weights is: −Σ p·log p with the natural log, "
    "whose unit is the nat. 0 means all weight on one key; log(n) means even over n keys.",
    "perplexity": "exp of the average negative log-probability a model gives each next "
    "token of a text: the number of equally likely choices it was, on average, torn between. "
    "Lower is better.",
    "attention sink, sinks": "Trained models park much of their attention on the first "
    "tokens, whatever they say. StreamingLLM keeps those few 'sink' tokens beside a "
    "sliding window; without them a windowed model's perplexity climbs.",
    "softcap": "Scores squeezed as c·tanh(score/c) before softmax, so none can pass ±c "
    "(Gemma 2 uses it).",
    "ALiBi": "A bias added to every score, slope × distance, per head: far keys lose score "
    "in a straight line, with no position embedding at all.",
    "induction head": "A head that finds where the current token appeared before and looks "
    "at the token that came next, so the model can continue a repeated pattern. It needs "
    "a previous-token head in an earlier layer.",
    "previous-token head": "A head whose every token looks at the token just before it.",
    "int8 / bfloat16 / float16 storage": "Ways to keep a KV cache in fewer bytes: 16-bit "
    "floats halve it; int8 keeps one byte per value plus a scale per block of 32.",
}


# --- numbers as a reader reads them -------------------------------------------------------


def human_seconds(seconds: float) -> str:
    """'850 µs', '12.3 ms', '4.2 s', '3.1 min', '2.0 h'."""
    if seconds != seconds:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def human_bytes(num_bytes: float) -> str:
    """'512 KiB', '3.0 MiB', '1.5 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:,.1f} {unit}"
    return f"{num_bytes:,.0f} B"
