"""The chapter's story in order, for the "Start here" page: each step's small live result,
computed by the engine (or, for counts, exactly), that the page shows beside one or two
sentences and a link to the page that explores it."""

from __future__ import annotations

import numpy as np

from . import cost, engine, heads, inside, regimes, text

PRONOUN_SENTENCE = text.EXAMPLES["The doctor and the nurse"]
SUBJECT_SENTENCE = text.EXAMPLES["The cat sleeps"]
QKV_WORDS = ("The", "cat", "sleeps")
WIDE_HEAD = 512  # d_k at which the unscaled softmax has saturated
# The width of a layer in the cost step: Llama 3 8B's model dimension.
LAYER_WIDTH = 4_096
LONG_CONTEXT = 200_000
LONG_WINDOW = 4_096  # a sliding window of the size long-context models use


def pronoun_link() -> dict[str, object]:
    """Where 'she' looks in the chapter's sentence under the designed coreference head:
    its weights row (from the engine), the weight on 'nurse', and how many tokens back the
    nurse is, which is how many updates a recurrent state would carry her through."""
    tokens, _ = text.tokenize(PRONOUN_SENTENCE)
    words = [token.text for token in tokens]
    weights = heads.head_weights(tokens)[heads.HEAD_NAMES.index("Coreference")]
    she, nurse = words.index("she"), words.index("nurse")
    return {
        "words": words,
        "row": weights[she],
        "weight": float(weights[she, nurse]),
        "distance": she - nurse,
    }


def qkv_weights() -> inside.Steps:
    """One small head on three words, its softmax from the engine."""
    return inside.one_head(list(QKV_WORDS), d_k=4)


def saturation_at_width(d_k: int = WIDE_HEAD) -> dict[str, float]:
    """Mean largest weight of a row, with and without the 1/√d_k factor, at width `d_k`."""
    at = inside.saturation_at(inside.saturation((d_k,)), d_k)
    return {
        "scaled": float(at.loc["÷ √d_k", "max weight"]),
        "unscaled": float(at.loc["no scaling", "max weight"]),
        "scaled gradient": float(at.loc["÷ √d_k", "softmax gradient"]),
        "unscaled gradient": float(at.loc["no scaling", "softmax gradient"]),
    }


def subject_of_sleeps() -> tuple[str, float]:
    """The word 'sleeps' weights most under the designed subject ↔ verb head, and how much."""
    tokens, _ = text.tokenize(SUBJECT_SENTENCE)
    words = [token.text for token in tokens]
    row = heads.head_weights(tokens)[heads.HEAD_NAMES.index("Subject ↔ verb")][
        words.index("sleeps")
    ]
    return words[int(row.argmax())], float(row.max())


def later_edit() -> dict[str, int]:
    """Replace the chapter sentence's 'nurse' with 'teacher': how many rows before the edit
    move under each regime (causal: none), and how many rows there are."""
    words, _ = regimes.SENTENCE.words(PRONOUN_SENTENCE)
    position = words.index("nurse")
    moved = regimes.rows_changed(regimes.edit_effect(words, position, "teacher"), position)
    return {**moved, "position": position, "rows": len(words)}


def attention_share(n: int, width: int = LAYER_WIDTH, causal: bool = True) -> float:
    """Attention's share of one layer's arithmetic per token at context n.

    Per token, scoring and mixing against the keys costs 4·width·keys (keys = n, or n/2 on
    average under a causal mask); the four projections (8·width²) and a feed-forward block
    four times wider (16·width²) cost 24·width² whatever n is.
    """
    keys = n / 2 if causal else n
    attention = 4 * width * keys
    return attention / (attention + 24 * width * width)


def pair_growth(n: int = 2_048) -> dict[str, int]:
    """Visible query–key pairs of causal attention at n and 2n, and at 200,000 with and
    without a sliding window of :data:`LONG_WINDOW` keys (counted exactly)."""
    return {
        "n": cost.visible_pairs(n, "causal"),
        "2n": cost.visible_pairs(2 * n, "causal"),
        "long causal": cost.visible_pairs(LONG_CONTEXT, "causal"),
        "long window": cost.visible_pairs(LONG_CONTEXT, "window", window=LONG_WINDOW),
    }


def long_context_memory(head_dim: int = 128) -> dict[str, str]:
    """One head at 200,000 tokens: the n×n scores and weights against what a tiled kernel
    keeps (q, k, v and the output)."""
    return {
        "materialised": text.human_bytes(cost.naive_bytes(LONG_CONTEXT)),
        "tiled": text.human_bytes(cost.tiled_bytes(LONG_CONTEXT, head_dim)),
    }


def cached_decoding(tokens: int = 8, head_dim: int = 16, seed: int = 0) -> float | None:
    """Generate-style attention through the engine's KV cache, one token at a time, against
    causal attention recomputed over the whole sequence: the largest difference of the
    outputs (None without the compiled engine, which holds the cache)."""
    if not engine.compiled_available():
        return None
    import attnscope

    rng = np.random.default_rng(seed)
    # (batch, heads, tokens, head_dim), the cache's layout.
    q, k, v = (rng.standard_normal((1, 1, tokens, head_dim), dtype=np.float32) for _ in range(3))
    cache = attnscope.KVCache(1, head_dim)
    stepped = []
    for t in range(tokens):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        stepped.append(cache.attend(q[:, :, t : t + 1]))
    recomputed = engine.attention_output(q, k, v, is_causal=True)
    return float(np.abs(np.concatenate(stepped, axis=2) - recomputed).max())
