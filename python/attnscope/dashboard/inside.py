"""One attention head step by step, and what the √d_k factor is for.

``Q = x·W_Q``, ``K = x·W_K``, ``V = x·W_V``, scores ``Q·Kᵀ``, scaled, softmaxed, mixed — each
step returned so the page can show it, with the softmax and output taken from the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnscope.models.stats import row_entropy
from attnscope.reference import visibility

from . import engine
from .text import SentenceRule, human_bytes, word_vector

MODEL_DIM = 4
SENTENCE = SentenceRule(
    8,  # every matrix of the page stays readable
    empty="Type a few words to follow them through the head.",
    shortened="This page follows the first {limit} tokens so that every matrix stays readable.",
)


@dataclass(frozen=True)
class Steps:
    """Every intermediate of one head on a tiny sentence."""

    x: np.ndarray  # (n, MODEL_DIM) embeddings
    w_q: np.ndarray  # (MODEL_DIM, d_k)
    w_k: np.ndarray
    w_v: np.ndarray
    q: np.ndarray  # (n, d_k)
    k: np.ndarray
    v: np.ndarray
    scores: np.ndarray  # (n, n) Q·Kᵀ
    scale: float
    scaled: np.ndarray  # scores · scale
    weights: np.ndarray  # softmax, from the engine
    output: np.ndarray  # weights · V, from the engine
    visible: np.ndarray  # (n, n) the causal mask: True where a query may see a key

    def hide_future(self, matrix: np.ndarray) -> np.ndarray:
        """`matrix` with the cells the causal mask removes set to 0, for display."""
        return np.where(self.visible, matrix, 0.0)


def one_head(words: list[str], d_k: int, scaled: bool = True, seed: int = 4) -> Steps:
    """Run one head on `words` with key width `d_k`, dividing by √d_k when `scaled`."""
    # Two decimals: the embeddings are printed on the page and should read as plain numbers.
    x = np.stack([np.round(word_vector(w, MODEL_DIM), 2) for w in words])
    rng = np.random.default_rng(seed)
    # Weights of variance 1/MODEL_DIM keep each entry of Q and K near unit size, so a score
    # Q·Kᵀ, a sum of d_k such products, spreads like √d_k: exactly what 1/√d_k undoes.
    w_q, w_k, w_v = (
        np.round(rng.standard_normal((MODEL_DIM, d_k)) / math.sqrt(MODEL_DIM), 2) for _ in range(3)
    )
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    scale = 1.0 / math.sqrt(d_k) if scaled else 1.0
    output, weights = engine.attention(q, k, v, is_causal=True, scale=scale)
    scores = q @ k.T
    visible = visibility(len(words), len(words), is_causal=True)
    return Steps(x, w_q, w_k, w_v, q, k, v, scores, scale, scores * scale, weights, output, visible)


def softmax_by_hand(steps: Steps, row: int, key_labels: list[str]) -> pd.DataFrame:
    """Query `row`'s softmax worked out step by step over the keys it sees, next to the
    engine's weights: the scaled scores, exp(score − max), and exp over the row's sum."""
    seen = np.flatnonzero(steps.visible[row])
    scaled = steps.scaled[row, seen]
    exps = np.exp(scaled - scaled.max())
    return pd.DataFrame(
        {
            "key": [key_labels[j] for j in seen],
            "scaled score": scaled,
            "exp(score − max)": exps,
            "weight = exp / sum": exps / exps.sum(),
            "engine weight": steps.weights[row, seen],
        }
    )


def softmax_gradient_norm(weights: np.ndarray) -> np.ndarray:
    """Per row, the Frobenius norm of softmax's Jacobian ``diag(p) - p·pᵀ``.

    It is what backpropagation multiplies the incoming gradient by; it tends to 0 as a row
    becomes one-hot, which is how a saturated softmax stops learning.
    """
    p = np.asarray(weights, dtype=float)
    jacobian = -p[..., :, None] * p[..., None, :]
    diagonal = np.arange(p.shape[-1])
    jacobian[..., diagonal, diagonal] += p
    return np.sqrt((jacobian**2).sum(axis=(-2, -1)))


def saturation(
    d_values: tuple[int, ...], num_keys: int = 16, num_queries: int = 32, seed: int = 0
) -> pd.DataFrame:
    """Max weight, entropy and softmax gradient vs d_k, with and without the 1/√d_k factor.

    Queries and keys have unit-variance entries (as after a normalisation layer), so an
    unscaled score has standard deviation √d_k. Every weight comes from the engine.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for d_k in d_values:
        q = rng.standard_normal((num_queries, d_k))
        k = rng.standard_normal((num_keys, d_k))
        v = np.zeros((num_keys, 1))
        for label, scale in (("÷ √d_k", 1.0 / math.sqrt(d_k)), ("no scaling", 1.0)):
            _, weights = engine.attention(q, k, v, scale=scale)
            rows.append(
                {
                    "d_k": d_k,
                    "scaling": label,
                    "max weight": float(weights.max(axis=-1).mean()),
                    "entropy (nats)": float(row_entropy(weights).mean()),
                    "softmax gradient": float(softmax_gradient_norm(weights).mean()),
                    "score std": float((q @ k.T * scale).std()),
                }
            )
    return pd.DataFrame(rows)


def saturation_at(curves: pd.DataFrame, d_k: int) -> pd.DataFrame:
    """The rows of :func:`saturation` at width `d_k`, indexed by scaling ("÷ √d_k", "no
    scaling")."""
    return curves[curves["d_k"] == d_k].set_index("scaling")


# --- FlashAttention's online softmax, one block of keys at a time ----------------------------


@dataclass(frozen=True)
class BlockStep:
    """The online softmax's state after one block of keys, for one query row."""

    start: int  # the block holds keys start .. stop - 1
    stop: int
    scores: np.ndarray  # (stop - start,) the block's scaled scores, -inf where the mask hides a key
    skipped: bool  # every key of the block is hidden: a tiled kernel never reads it
    block_max: float  # the largest visible score of the block (-inf if none)
    running_max: float  # m: the largest score seen so far
    rescale: float  # exp(m before − m after): what the earlier sum and output are multiplied by
    running_sum: float  # l: Σ exp(score − m) over the keys seen so far
    accumulator: np.ndarray  # (d_v,) Σ exp(score − m)·v over the keys seen so far

    @property
    def partial_output(self) -> np.ndarray:
        """The output if the row ended here: the accumulator over the running sum."""
        if self.running_sum == 0:
            return np.zeros_like(self.accumulator)
        return self.accumulator / self.running_sum


@dataclass(frozen=True)
class FlashRow:
    """One query row computed block by block, and what the blocks add up to."""

    steps: list[BlockStep]
    output: np.ndarray  # (d_v,) accumulator / sum after the last block
    lse: float  # log-sum-exp of the row's visible scores: m + log(l), -inf if none

    def weights(self) -> np.ndarray:
        """The full softmax row rebuilt from the final m and l: exp(score − lse) per key."""
        scores = np.concatenate([step.scores for step in self.steps])
        if self.lse == -np.inf:
            return np.zeros_like(scores)
        return np.exp(scores - self.lse)


def flash_row(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    scale: float,
    visible: np.ndarray,
    block: int,
) -> FlashRow:
    """Attention for one query row the way FlashAttention computes it: walk the keys in
    blocks of `block`, keep a running maximum ``m`` and sum ``l`` of ``exp(score − m)``, and
    when a block raises ``m``, multiply the sum and the partial output by
    ``exp(m_old − m_new)`` before adding the block. No step holds more than one block of
    scores; the result equals the softmax over the whole row.

    query: (d_k,); keys: (n, d_k); values: (n, d_v); visible: (n,) bool, True where the query
    may see the key. Raises ValueError for shapes that do not fit or a block below 1.
    """
    query, keys, values = (np.asarray(a, dtype=np.float64) for a in (query, keys, values))
    visible = np.asarray(visible, dtype=bool)
    if query.ndim != 1 or keys.ndim != 2 or values.ndim != 2:
        raise ValueError(
            f"query must be (d_k,), keys (n, d_k) and values (n, d_v); got {query.shape}, "
            f"{keys.shape} and {values.shape}"
        )
    n = keys.shape[0]
    if keys.shape[1] != query.shape[0] or values.shape[0] != n or visible.shape != (n,):
        raise ValueError(
            f"keys {keys.shape} must have the query's width {query.shape[0]}, and values "
            f"{values.shape} and visible {visible.shape} one row per key ({n})"
        )
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block must be a whole number >= 1, got {block!r}")
    running_max, running_sum = -np.inf, 0.0
    accumulator = np.zeros(values.shape[1])
    steps = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        seen = visible[start:stop]
        scores = np.where(seen, keys[start:stop] @ query * scale, -np.inf)
        block_max = float(scores.max())
        skipped = not seen.any()
        rescale = 1.0
        if not skipped:
            new_max = max(running_max, block_max)
            rescale = float(np.exp(running_max - new_max))  # 0 for the first visible block
            weights = np.exp(scores - new_max)  # 0 at hidden keys
            running_sum = running_sum * rescale + float(weights.sum())
            accumulator = accumulator * rescale + weights @ values[start:stop]
            running_max = new_max
        state = (running_max, rescale, running_sum, accumulator.copy())
        steps.append(BlockStep(start, stop, scores, skipped, block_max, *state))
    if running_sum == 0:
        return FlashRow(steps, np.zeros(values.shape[1]), -np.inf)
    return FlashRow(steps, accumulator / running_sum, running_max + float(np.log(running_sum)))


def flash_table(row: FlashRow, key_labels: list[str], upto: int) -> pd.DataFrame:
    """The first `upto` blocks of `row`, one line each: its keys, scores and the state after."""
    lines = []
    for index, step in enumerate(row.steps[:upto]):
        shown = ", ".join("hidden" if s == -np.inf else f"{s:.3f}" for s in step.scores)
        lines.append(
            {
                "block": index + 1,
                "keys": ", ".join(key_labels[step.start : step.stop]),
                "scaled scores": shown,
                "block max": "skipped" if step.skipped else f"{step.block_max:.3f}",
                "running max m": step.running_max,
                "rescale exp(m_old − m)": step.rescale,
                "running sum l": step.running_sum,
            }
        )
    return pd.DataFrame(lines)


def flash_memory(n: int, block: int, d_v: int, long_n: int = 200_000) -> pd.DataFrame:
    """Numbers one query row keeps while its softmax is computed each way, and what one head
    needs at `long_n` tokens (float32): every score and weight of the n×n matrix, against
    q, k, v and the output alone (the running m and l add two numbers per row)."""
    from .cost import naive_bytes, tiled_bytes

    return pd.DataFrame(
        [
            {
                "way": "whole row: every score first, then softmax",
                "numbers held for one query row": f"{n} scores",
                f"one head at n = {long_n:,}": human_bytes(naive_bytes(long_n)),
            },
            {
                "way": "blockwise (FlashAttention)",
                "numbers held for one query row": f"{block} scores + m + l + {d_v} outputs",
                f"one head at n = {long_n:,}": human_bytes(
                    tiled_bytes(long_n, d_v) + 2 * 4 * long_n
                ),
            },
        ]
    )


def flash_check(row: FlashRow, steps: Steps, query: int) -> dict[str, float]:
    """How far `row` (query `query` of `steps`, walked block by block) lies from the engine's
    own answer for that row: the largest difference of its weights, log-sum-exp and output
    from the engine's ``return_weights`` and ``return_lse``."""
    output, weights, lse = engine.attention_with_lse(
        steps.q, steps.k, steps.v, is_causal=True, scale=steps.scale
    )
    same_lse = row.lse == lse[query] == -np.inf
    return {
        "weights": float(np.abs(row.weights() - weights[query]).max()),
        "log-sum-exp": 0.0 if same_lse else abs(row.lse - float(lse[query])),
        "output": float(np.abs(row.output - output[query]).max()),
    }
