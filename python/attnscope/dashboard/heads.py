"""Attention heads built by hand: designed embeddings and projections whose softmax, computed
by the engine, shows the behaviours trained heads are known for.

Each token's embedding ``x`` is a short vector of readable features (its word class, a gender
when it has one, a sinusoidal position, a code for its rhyme). A head is a rule "this query
feature likes that key feature, by so many logits", written as ``W_Q`` and ``W_K`` so that
``x_i · W_Q · W_Kᵀ · x_jᵀ / √d_k`` is exactly that rule. Nothing below sets a weight directly:
the weights are whatever softmax makes of those scores.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from attnscope.reference import visibility

from . import engine
from .text import ROLES, Token, gendered_nouns

HEAD_DIM = 96  # d_k of every designed head; the engine's default scale is 1/sqrt(HEAD_DIM)
# Radians per token: ω_f = π(f + ½)/16. The sum of cos(ω_f·Δ) over these 16 frequencies is 16
# at Δ = 0 and exactly 0 at every other whole distance below 32 (a Dirichlet kernel), so a query
# rotated to a position picks out that one position in any sentence the heads page accepts.
FREQUENCIES = tuple(round(math.pi * (f + 0.5) / 16, 4) for f in range(16))
SLOW_FREQUENCIES = FREQUENCIES[:3]  # a broad bump: "nearby, within about three tokens"
RIME_HASHES = 3  # a rime sets one feature in each of three blocks of 16 (three hashes) ...
RIME_BUCKETS = 16  # ... so two different rimes share all three only by a rare accident
RIME_DIM = RIME_HASHES * RIME_BUCKETS
GENDERS = ("masculine", "feminine")


def _feature_names() -> list[str]:
    names = ["bias", "start"]
    names += [f"role:{role}" for role in ROLES]
    names += [f"gender:{gender}" for gender in GENDERS]  # of nouns
    names += [f"refers to:{gender}" for gender in GENDERS]  # of pronouns
    for omega in FREQUENCIES:
        names += [f"pos:cos {omega}", f"pos:sin {omega}"]
    names += [f"rime:{bucket}" for bucket in range(RIME_DIM)]
    return names


FEATURES = _feature_names()
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURES)}
EMBED_DIM = len(FEATURES)


def _rime_features(rime: str) -> list[int]:
    """Three fixed rime features per rime: equal rimes share all three, others rarely do."""
    digest = hashlib.blake2b(rime.encode(), digest_size=RIME_HASHES).digest()
    return [block * RIME_BUCKETS + byte % RIME_BUCKETS for block, byte in enumerate(digest)]


def embed(tokens: list[Token]) -> np.ndarray:
    """The ``(n, EMBED_DIM)`` float64 embeddings: a readable feature vector per token."""
    x = np.zeros((len(tokens), EMBED_DIM))
    x[:, FEATURE_INDEX["bias"]] = 1.0
    if tokens:
        x[0, FEATURE_INDEX["start"]] = 1.0
    for i, token in enumerate(tokens):
        x[i, FEATURE_INDEX[f"role:{token.role}"]] = 1.0
        if token.gender:
            block = "refers to" if token.role == "pronoun" else "gender"
            x[i, FEATURE_INDEX[f"{block}:{token.gender}"]] = 1.0
        for omega in FREQUENCIES:
            x[i, FEATURE_INDEX[f"pos:cos {omega}"]] = math.cos(omega * i)
            x[i, FEATURE_INDEX[f"pos:sin {omega}"]] = math.sin(omega * i)
        if token.rime:
            for feature in _rime_features(token.rime):
                x[i, FEATURE_INDEX[f"rime:{feature}"]] = 1.0
    return x


@dataclass(frozen=True)
class Offset:
    """A positional preference: query i likes keys near ``i - back`` by ``gain`` logits per
    frequency (all frequencies: sharp, one token; the slow ones: broad, a few tokens)."""

    back: int
    gain: float
    sharp: bool


@dataclass(frozen=True)
class HeadSpec:
    """One designed head: its name, what it does, and its score rule."""

    name: str
    summary: str
    # (query feature, key feature, logits) — how much a query with the first feature likes a
    # key with the second. Features ending in ':*' expand over a block (see _expand).
    terms: tuple[tuple[str, str, float], ...]
    offsets: tuple[Offset, ...] = field(default_factory=tuple)
    values: tuple[str, ...] = tuple(f"role:{role}" for role in ROLES)


HEADS: tuple[HeadSpec, ...] = (
    HeadSpec(
        "Previous token",
        "Local attention: every token looks at the token just before it. The query rotates "
        "each position's sine/cosine pair back by one step, so it lines up with the key of "
        "the previous position and with no other.",
        terms=(),
        offsets=(Offset(back=1, gain=0.6, sharp=True),),
    ),
    HeadSpec(
        "Subject ↔ verb",
        "Verbs look for the nearest noun or pronoun (their subject), and nouns and pronouns "
        "look for a verb. A slow positional bump breaks ties in favour of nearby words; a "
        "token with no partner in sight stays near itself.",
        terms=(
            ("role:verb", "role:noun", 5.0),
            ("role:verb", "role:pronoun", 5.0),
            ("role:noun", "role:verb", 4.0),
            ("role:pronoun", "role:verb", 4.0),
        ),
        offsets=(Offset(back=0, gain=1.5, sharp=False),),
    ),
    HeadSpec(
        "Coreference",
        "Pronouns look back for a noun: the closest one wins, unless gender features agree "
        "with an earlier noun or disagree with the closer one.",
        terms=(
            ("role:pronoun", "role:noun", 6.0),
            ("refers to:masculine", "gender:masculine", 3.0),
            ("refers to:feminine", "gender:feminine", 3.0),
            ("refers to:masculine", "gender:feminine", -3.0),
            ("refers to:feminine", "gender:masculine", -3.0),
        ),
        offsets=(Offset(back=1, gain=1.5, sharp=False),),
    ),
    HeadSpec(
        "Delimiters",
        "Every token looks at the most recent punctuation mark or, before the first one, at "
        "the start of the sentence: the bias feature of every query matches the "
        "'punctuation' and 'start' features of the keys.",
        terms=(("bias", "role:punctuation", 6.0), ("bias", "start", 5.0)),
        offsets=(Offset(back=0, gain=1.0, sharp=False),),
    ),
    HeadSpec(
        "Rhyme",
        "Content words look for an earlier word with the same ending (cat, hat, mat). Each "
        "ending sets three 'rime' features and the query rewards keys that share all three; "
        "a negative sharp positional term keeps a word from choosing itself. With no rhyme "
        "in sight a token rests on the first token, as real heads often do.",
        terms=(("rime:*", "rime:*", 9.0 / RIME_HASHES), ("bias", "start", 7.0)),
        offsets=(Offset(back=0, gain=-0.5, sharp=True),),
    ),
)

HEAD_NAMES = tuple(head.name for head in HEADS)


def _expand(query_feature: str, key_feature: str) -> list[tuple[int, int]]:
    """Index pairs of a term; 'block:*' on both sides pairs a block with itself."""
    if query_feature.endswith(":*"):
        prefix = query_feature[:-1]
        indices = [i for name, i in FEATURE_INDEX.items() if name.startswith(prefix)]
        return [(i, i) for i in indices]
    return [(FEATURE_INDEX[query_feature], FEATURE_INDEX[key_feature])]


def score_rule(head: HeadSpec) -> np.ndarray:
    """The ``(EMBED_DIM, EMBED_DIM)`` matrix ``A`` with score(i, j) = x_i · A · x_jᵀ (logits)."""
    rule = np.zeros((EMBED_DIM, EMBED_DIM))
    for query_feature, key_feature, logits in head.terms:
        for qi, ki in _expand(query_feature, key_feature):
            rule[qi, ki] += logits
    for offset in head.offsets:
        for omega in FREQUENCIES if offset.sharp else SLOW_FREQUENCIES:
            cos_i, sin_i = FEATURE_INDEX[f"pos:cos {omega}"], FEATURE_INDEX[f"pos:sin {omega}"]
            # [cos ωi, sin ωi] rotated back by ω·back, dotted with [cos ωj, sin ωj], is
            # cos(ω(i - back - j)): largest when j = i - back.
            angle = omega * offset.back
            rule[cos_i, cos_i] += offset.gain * math.cos(angle)
            rule[sin_i, sin_i] += offset.gain * math.cos(angle)
            rule[cos_i, sin_i] += -offset.gain * math.sin(angle)
            rule[sin_i, cos_i] += offset.gain * math.sin(angle)
    return rule


def projections(head: HeadSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``W_Q, W_K, W_V`` (each ``EMBED_DIM × HEAD_DIM``) and the key feature of each column.

    ``W_K`` copies the key features the rule reads into the first columns; ``W_Q`` holds the
    rule's matching columns times √d_k, which the engine's 1/√d_k scale then cancels, so that
    ``Q·Kᵀ/√d_k`` is exactly ``x·A·xᵀ``. ``W_V`` copies the head's value features.
    """
    rule = score_rule(head)
    used = [int(i) for i in np.flatnonzero(np.abs(rule).sum(axis=0))]
    if len(used) > HEAD_DIM or len(head.values) > HEAD_DIM:
        raise ValueError(f"head {head.name!r} needs more than {HEAD_DIM} dimensions")
    w_q = np.zeros((EMBED_DIM, HEAD_DIM))
    w_k = np.zeros((EMBED_DIM, HEAD_DIM))
    for column, feature in enumerate(used):
        w_k[feature, column] = 1.0
        w_q[:, column] = rule[:, feature] * math.sqrt(HEAD_DIM)
    w_v = np.zeros((EMBED_DIM, HEAD_DIM))
    for column, feature in enumerate(head.values):
        w_v[FEATURE_INDEX[feature], column] = 1.0
    labels = [FEATURES[i] for i in used] + [""] * (HEAD_DIM - len(used))
    return w_q, w_k, w_v, labels


def head_qkv(tokens: list[Token]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``Q, K, V`` of every designed head, each ``(heads, n, HEAD_DIM)`` float64."""
    x = embed(tokens)
    parts = [projections(head)[:3] for head in HEADS]
    q = np.stack([x @ w_q for w_q, _, _ in parts])
    k = np.stack([x @ w_k for _, w_k, _ in parts])
    v = np.stack([x @ w_v for _, _, w_v in parts])
    return q, k, v


def head_weights(tokens: list[Token], causal: bool = True) -> np.ndarray:
    """The ``(heads, n, n)`` attention weights of every designed head, from the engine."""
    q, k, v = head_qkv(tokens)
    _, weights = engine.attention(q, k, v, is_causal=causal)
    return weights


def head_scores(tokens: list[Token], head_index: int) -> np.ndarray:
    """One head's scaled scores ``Q·Kᵀ/√d_k`` (logits before the mask and softmax)."""
    q, k, _ = head_qkv(tokens)
    return q[head_index] @ k[head_index].T / math.sqrt(HEAD_DIM)


def masked_scores(tokens: list[Token], head_index: int, causal: bool) -> np.ndarray:
    """:func:`head_scores` with the cells the mask hides set to 0, for display."""
    n = len(tokens)
    return np.where(visibility(n, n, is_causal=causal), head_scores(tokens, head_index), 0.0)


READABLE_FEATURES = [name for name in FEATURES if not name.startswith(("pos:", "rime:"))]


def readable_embeddings(tokens: list[Token]) -> np.ndarray:
    """The columns of :func:`embed` a reader can name (:data:`READABLE_FEATURES`: bias, start,
    word class, gender), without the position and rime codes."""
    return embed(tokens)[:, [FEATURE_INDEX[name] for name in READABLE_FEATURES]]


def query_weights_used(head: HeadSpec) -> tuple[np.ndarray, list[str], list[str]]:
    """The part of ``W_Q`` the head's rule fills: the rows of x it reads and the key-space
    columns it writes, with the feature named by each row and each column."""
    w_q, _, _, key_features = projections(head)
    columns = [c for c, feature in enumerate(key_features) if feature]
    rows = [i for i in range(EMBED_DIM) if np.abs(w_q[i, columns]).sum() > 0]
    return (
        w_q[np.ix_(rows, columns)],
        [FEATURES[i] for i in rows],
        [key_features[c] for c in columns],
    )


def rule_table(head: HeadSpec) -> list[dict[str, object]]:
    """The head's rule in words, one row per term, for display next to its matrices."""
    rows: list[dict[str, object]] = [
        {"query feature": q, "key feature": k, "logits": logits} for q, k, logits in head.terms
    ]
    for offset in head.offsets:
        width = "sharp (all frequencies)" if offset.sharp else "broad (slow frequencies)"
        where = "itself" if offset.back == 0 else f"{offset.back} token(s) back"
        rows.append(
            {
                "query feature": "position",
                "key feature": f"position near {where}, {width}",
                "logits": offset.gain,
            }
        )
    return rows


def coreference_gaps(tokens: list[Token], weights: np.ndarray) -> list[str]:
    """Notes for the reader wherever the coreference head's word lists do not cover the
    sentence: a gendered pronoun with no earlier noun of a gender the tagger knows can only
    fall back to the nearest noun. `weights` is the head's ``(n, n)`` weights, to name the
    noun it chose."""
    notes = []
    for position, token in enumerate(tokens):
        if token.role != "pronoun" or token.gender is None:
            continue
        nouns = [t for t in tokens[:position] if t.role == "noun"]
        if not nouns or any(t.gender == token.gender for t in nouns):
            continue
        chosen = tokens[int(np.asarray(weights)[position].argmax())].text
        known = ", ".join(gendered_nouns(token.gender)[:6])
        notes.append(
            f"No noun before '{token.text}' is on this toy head's short {token.gender} word "
            f"list ({known}, …), so it takes the nearest noun, '{chosen}': a guess by "
            "distance, not by meaning. A trained model uses what it learned about the words."
        )
    return notes
