"""What each attention head does, in numbers: the statistics interpretability work reads heads by.

Every statistic is an average over query rows of an attention map ``A`` (row ``i`` sums to 1):

- ``entropy``: ``-Σ_j A[i,j]·ln A[i,j]`` in nats (0 = one key takes everything).
- ``distance``: ``Σ_j A[i,j]·|i - j|``, how far back (or ahead) the head looks, in tokens.
- ``previous_token`` / ``next_token``: ``A[i, i-1]`` over rows ``i >= 1`` / ``A[i, i+1]`` over
  rows ``i <= n-2``.
- ``self``: ``A[i, i]``.
- ``first_token``: ``A[i, 0]`` over rows ``i >= 1``.
- ``sink``: the mass on the first token and on delimiters (``[CLS]``, ``[SEP]``, punctuation,
  ``<|endoftext|>``; only the first token when no tokens are given), counted over rows
  ``i >= 1`` and never counting a token's attention to itself.
- ``induction``: on a sequence of random tokens repeated twice (period ``T``), ``A[i, i-T+1]``
  over the second copy: attention to the token that followed the current token last time.

``label`` names the dominant behaviour: the largest of previous token, next token, self, sink
and induction when it takes at least half the attention; else ``local`` (mean distance of at
most 1.5 tokens), ``broad`` (spread nearly evenly over the keys it may see: entropy >= 0.8 of the
uniform spread's), or ``mixed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._checks import is_whole_number, whole_number

DELIMITERS = frozenset(
    {"[CLS]", "[SEP]", "<s>", "</s>", "<|endoftext|>", "<bos>", "<eos>"}
    | {mark for p in ".,;:!?" for mark in (p, "Ġ" + p, "▁" + p)}
)
LABELS = ("previous token", "next token", "self", "sink", "induction", "local", "broad", "mixed")
STATISTICS = (
    "entropy",
    "distance",
    "previous_token",
    "next_token",
    "self",
    "first_token",
    "sink",
    "induction",
)
_DOMINANT = {
    "previous token": "previous_token",
    "next token": "next_token",
    "self": "self",
    "sink": "sink",
    "induction": "induction",
}
_DOMINANT_SHARE = 0.5
_LOCAL_DISTANCE = 1.5
_BROAD_ENTROPY = 0.8
_ROW_SUM_TOLERANCE = 1e-3


def _check_maps(attentions, name: str) -> np.ndarray:
    if not isinstance(attentions, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(attentions).__name__}")
    if not np.issubdtype(attentions.dtype, np.floating):
        raise TypeError(
            f"{name} must hold floats (attention weights), got dtype {attentions.dtype}"
        )
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(
            f"{name} must have shape (layers, heads, n, n) with square maps, got {attentions.shape}"
        )
    if attentions.shape[-1] == 0:
        raise ValueError(f"{name} has no tokens (shape {attentions.shape})")
    maps = attentions.astype(np.float64)
    if not np.isfinite(maps).all() or (maps < 0).any():
        raise ValueError(f"{name} must hold finite, non-negative attention weights")
    row_sums = maps.sum(axis=-1)
    if (np.abs(row_sums - 1.0) > _ROW_SUM_TOLERANCE).any():
        raise ValueError(f"every row of {name} must sum to 1 (a softmax over the keys)")
    return maps


def _row_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the query axis (the last), 0 where there are no rows."""
    if values.shape[-1] == 0:
        return np.zeros(values.shape[:-1])
    return values.mean(axis=-1)


def row_entropy(weights: np.ndarray) -> np.ndarray:
    """Per row (the last axis), the entropy of the weights in nats (0 = all weight on one key)."""
    p = np.asarray(weights)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def _entropies(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean row entropy in nats, and its mean relative to a uniform spread over the visible keys.

    A head whose maps are zero above the diagonal is read as causal (row i sees i + 1 keys);
    otherwise every row sees all n keys.
    """
    n = maps.shape[-1]
    rows = row_entropy(maps)
    causal = ~np.triu(maps, k=1).any(axis=(-1, -2))
    visible = np.where(causal[..., None], np.arange(1, n + 1), n)
    spread = visible > 1
    relative = np.divide(
        rows, np.log(np.maximum(visible, 2)), where=spread, out=np.zeros_like(rows)
    )
    counted = spread.sum(axis=-1)
    relative_mean = np.divide(
        relative.sum(axis=-1), counted, where=counted > 0, out=np.zeros(rows.shape[:-1])
    )
    return rows.mean(axis=-1), relative_mean


def sink_positions(tokens: Sequence[str] | None, n: int) -> np.ndarray:
    """Positions counted as attention sinks: the first token and any delimiter token."""
    positions = {0}
    if tokens is not None:
        positions |= {i for i, token in enumerate(tokens) if token in DELIMITERS}
    return np.array(sorted(positions))


def induction_scores(attentions: np.ndarray, period: int | None = None) -> np.ndarray:
    """Per (layer, head): mean ``A[i, i - period + 1]`` over the repeated half of the sequence.

    `attentions` must come from a sequence whose second half repeats its first (period
    ``n // 2`` by default), such as :func:`repeated_random_ids` makes.
    """
    maps = _check_maps(attentions, "induction")
    n = maps.shape[-1]
    if period is None:
        period = n // 2
    period = whole_number(period, "period")
    if period < 2 or 2 * period > n:
        raise ValueError(f"period must be in [2, n // 2] = [2, {n // 2}], got {period}")
    queries = np.arange(period, 2 * period)
    return maps[:, :, queries, queries - period + 1].mean(axis=-1)


def repeated_random_ids(
    vocab_size: int, period: int = 32, *, seed: int = 0, avoid: Sequence[int] = ()
) -> np.ndarray:
    """``period`` random token ids, then the same ids again: the input that reveals induction heads.

    Args:
        vocab_size: ids are drawn from ``[0, vocab_size)``.
        period: length of the random block (the sequence is ``2 * period`` long).
        seed: seed of the random draw.
        avoid: ids never drawn (special tokens such as ``[CLS]`` or padding).
    """
    vocab_size = whole_number(vocab_size, "vocab_size")
    period = whole_number(period, "period", low=2)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(avoid, dtype=np.int64))
    if allowed.size < period:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than period={period} ids to draw")
    block = np.random.default_rng(seed).choice(allowed, size=period, replace=False)
    return np.concatenate([block, block]).astype(np.int64)


def head_stats(attentions, *, tokens=None, induction=None) -> list[dict]:
    """Statistics and a behaviour label for every head (see the module docstring for each).

    Args:
        attentions: ``(layers, heads, n, n)`` attention weights whose rows sum to 1, such as
            ``Model.encode(text).attentions``.
        tokens: the ``n`` token strings, to count delimiters in the ``sink`` statistic.
        induction: ``(layers, heads, m, m)`` attention weights on a sequence that repeats its
            first half (see :func:`repeated_random_ids`); without it ``induction`` is None.

    Returns:
        One dict per head, layer by layer: ``layer``, ``head``, every name in ``STATISTICS``
        (floats; ``induction`` may be None) and ``label``.

    Raises:
        TypeError: non-array or non-float input.
        ValueError: wrong shapes, rows that are not distributions, tokens of the wrong length.
    """
    maps = _check_maps(attentions, "attentions")
    num_layers, num_heads, n, _ = maps.shape
    if tokens is not None:
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise TypeError("tokens must be a sequence of str")
        if len(tokens) != n:
            raise ValueError(f"tokens has {len(tokens)} entries but the maps are {n} x {n}")
    induction_by_head = None
    if induction is not None:
        induction_by_head = induction_scores(induction)
        if induction_by_head.shape != (num_layers, num_heads):
            raise ValueError(
                f"induction has {induction.shape[:2]} (layers, heads) but attentions has "
                f"{(num_layers, num_heads)}"
            )

    rows = np.arange(n)
    entropy, relative_entropy = _entropies(maps)
    distance = (maps * np.abs(rows[:, None] - rows[None, :])).sum(axis=-1).mean(axis=-1)
    previous = _row_mean(maps[:, :, rows[1:], rows[1:] - 1])
    following = _row_mean(maps[:, :, rows[:-1], rows[:-1] + 1])
    diagonal = maps[:, :, rows, rows].mean(axis=-1)
    first = _row_mean(maps[:, :, 1:, 0])
    sinks = np.zeros((n, n), dtype=bool)
    sinks[:, sink_positions(tokens, n)] = True
    np.fill_diagonal(sinks, False)
    sink = _row_mean((maps * sinks)[:, :, 1:, :].sum(axis=-1))

    stats = []
    for layer in range(num_layers):
        for head in range(num_heads):
            row = {
                "layer": layer,
                "head": head,
                "entropy": float(entropy[layer, head]),
                "distance": float(distance[layer, head]),
                "previous_token": float(previous[layer, head]),
                "next_token": float(following[layer, head]),
                "self": float(diagonal[layer, head]),
                "first_token": float(first[layer, head]),
                "sink": float(sink[layer, head]),
                "induction": (
                    None if induction_by_head is None else float(induction_by_head[layer, head])
                ),
            }
            row["label"] = _label(row, float(relative_entropy[layer, head]))
            stats.append(row)
    return stats


def _label(row: dict, relative_entropy: float) -> str:
    shares = {label: row[key] for label, key in _DOMINANT.items() if row[key] is not None}
    best = max(shares, key=shares.__getitem__)
    if shares[best] >= _DOMINANT_SHARE:
        return best
    if row["distance"] <= _LOCAL_DISTANCE:
        return "local"
    if relative_entropy >= _BROAD_ENTROPY:
        return "broad"
    return "mixed"


def _positions(value, name: str, n: int) -> np.ndarray:
    values = [value] if is_whole_number(value) else value
    try:
        positions = np.asarray(values)
    except (TypeError, ValueError):
        positions = np.asarray([None])
    if positions.ndim != 1 or positions.size == 0 or not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(f"{name} must be a token position (int) or a non-empty list of them")
    if positions.min() < 0 or positions.max() >= n:
        raise ValueError(f"{name} positions must lie in [0, {n}), got {positions.tolist()}")
    return positions


def rank_heads(attentions, source, target) -> list[dict]:
    """Heads ranked by how much the `source` token attends to the `target` token.

    Args:
        attentions: ``(layers, heads, n, n)`` attention weights.
        source: query position (or positions, averaged), e.g. the position of "she".
        target: key position (or positions, summed, e.g. the pieces of one word), e.g. "nurse".

    Returns:
        One dict per head, ``layer``, ``head``, ``weight`` (the attention from source to
        target, in [0, 1]) and ``rank`` (1 = strongest), strongest first; ties keep
        layer-then-head order.
    """
    maps = _check_maps(attentions, "attentions")
    n = maps.shape[-1]
    queries = _positions(source, "source", n)
    keys = _positions(target, "target", n)
    weight = maps[:, :, queries][:, :, :, keys].sum(axis=-1).mean(axis=-1)
    order = np.argsort(-weight, axis=None, kind="stable")
    num_heads = maps.shape[1]
    return [
        {
            "layer": int(flat // num_heads),
            "head": int(flat % num_heads),
            "weight": float(weight.flat[flat]),
            "rank": rank,
        }
        for rank, flat in enumerate(order, start=1)
    ]
