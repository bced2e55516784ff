"""Does a head matter? Ablation, activation patching and attention rollout on real models.

Attention weights say where a head looks, not whether the model uses what it finds: a head can
put most of a token's weight on "nurse" while its output, mixed with the others by the output
projection, changes nothing downstream. Intervening answers the second question:

    effects = am.head_effects(model, "The doctor fired the nurse because she")  # (layers, heads)
    restored = am.patching_effects(model, clean_text, corrupt_text, target, foil)

Each head is changed alone, at its output before the output projection (its slice of the
concatenated head outputs, TransformerLens's ``hook_z``), and everything after it is computed
again. Doing that naively costs a full forward pass per head; here the residual stream entering
each layer is computed once, and the runs that intervene at layer ``l`` start there: all of a
layer's heads join one batch of sequences that grows layer by layer, so the later layers run as
a few large matrix products instead of hundreds of small ones.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np

from ._model import Model, check_ablation, merge_heads, replacement

# Runs in flight at once are capped near this many rows (sequences x tokens): large enough for
# efficient matrix products, small enough that a long text's batch stays a few tens of MiB.
_BATCH_ROWS = 4096
# Logits of this many runs at a time (a 49k vocabulary makes each run's row 200 KB).
_READOUT_RUNS = 64

Progress = Callable[[float], object]


def head_effects(
    model: Model,
    text: str | None = None,
    *,
    ids=None,
    target: int | None = None,
    ablation: str = "zero",
    progress: Progress | None = None,
) -> np.ndarray:
    """What ablating each head alone does to the model's output.

    For a causal language model: the change of the log-probability of `target` as the next
    token after the last position (ablated minus plain), so a head the prediction relied on
    scores below 0. For an encoder, which has no next token: 1 − the cosine similarity of the
    mean-pooled final hidden states with and without the ablation (0: nothing changed).

    The numbers of ``encode(..., ablate=[(layer, head)], ablation=ablation)`` for every head
    (up to float32 rounding), computed without repeating the layers before each ablation (see
    the module docstring).

    Args:
        model: a loaded :class:`~attnscope.models.Model`.
        text, ids: the input, as for :meth:`Model.encode` (exactly one).
        target: the token id whose log-probability is measured (causal models only); None:
            the model's own likeliest next token.
        ablation: ``"zero"`` or ``"mean"`` (the head's mean output over the positions).
        progress: called with the fraction done (0 to 1) as the work advances.

    Returns:
        ``(layers, heads)`` float64.

    Raises:
        TypeError/ValueError: a bad input (as :meth:`Model.encode`), target, ablation or
            progress; a target given for an encoder.
    """
    _check_model(model)
    _, token_ids = model._read_input(text, ids)
    check_ablation(ablation)
    _check_progress(progress)
    if model.is_causal:
        target = None if target is None else _check_token(model, target, "target")
    elif target is not None:
        raise ValueError(
            f"target: {model.name} is an encoder with no next-token prediction; its effect is "
            "the change of the pooled hidden states, so leave target=None"
        )
    base = _BaseRun(model, token_ids)

    def ablated(layer: int, head: int) -> np.ndarray:
        return replacement(base.head_outputs[layer, head], ablation)

    summaries = _each_head_replaced(model, base, ablated, progress)
    if not model.is_causal:
        return 1.0 - _cosine(summaries, base.summary)
    if target is None:
        target = int(np.argmax(model._readout(base.summary[None])[0]))
    plain = _log_probs(model, base.summary[None], target)[0]
    return _log_probs(model, summaries, target) - plain


def patching_effects(
    model: Model,
    clean,
    corrupt,
    target: int,
    foil: int,
    *,
    progress: Progress | None = None,
) -> np.ndarray:
    """Activation patching: how much of the clean run's preference each head carries.

    The metric is the logit difference ``logit[target] − logit[foil]`` at the last position.
    Each head's output in the corrupt run is replaced, alone, by its output in the clean run;
    the result is the share of the clean-minus-corrupt difference that this restores:
    ``(patched − corrupt) / (clean − corrupt)`` (1: the head alone carries it all back; 0:
    nothing; negative: it pushes the other way).

    Args:
        model: a causal language model.
        clean, corrupt: two inputs of the same number of tokens (texts, or 1-D token ids),
            e.g. "... because she was tired. The tired one was the" and the same with "he".
        target, foil: token ids of the answer the clean input favours and of its rival.
        progress: called with the fraction done (0 to 1).

    Returns:
        ``(layers, heads)`` float64.

    Raises:
        TypeError/ValueError: an encoder, inputs of different lengths, bad token ids, equal
            target and foil, or inputs whose logit differences are the same (nothing to
            restore).
    """
    _check_model(model)
    if not model.is_causal:
        raise ValueError(
            f"model: {model.name} is an encoder; patching compares next-token logits, which "
            "only a causal language model has"
        )
    clean_ids = _input_ids(model, clean, "clean")
    corrupt_ids = _input_ids(model, corrupt, "corrupt")
    if clean_ids.size != corrupt_ids.size:
        raise ValueError(
            f"clean and corrupt must have the same number of tokens (positions are patched one "
            f"for one), got {clean_ids.size} and {corrupt_ids.size}"
        )
    target = _check_token(model, target, "target")
    foil = _check_token(model, foil, "foil")
    if target == foil:
        raise ValueError(f"target and foil must differ, both are {target}")
    _check_progress(progress)
    clean_trace = model.encode(ids=clean_ids)
    base = _BaseRun(model, corrupt_ids)

    def difference(logits: np.ndarray) -> np.ndarray:
        return logits[..., target].astype(np.float64) - logits[..., foil]

    clean_difference = difference(clean_trace.logits[-1])
    corrupt_difference = difference(model._readout(base.summary[None])[0])
    gap = clean_difference - corrupt_difference
    if not abs(gap) > 1e-4:
        raise ValueError(
            f"clean and corrupt give the same logit difference ({clean_difference:.4g} and "
            f"{corrupt_difference:.4g}): there is nothing for a patch to restore"
        )

    def patched(layer: int, head: int) -> np.ndarray:
        return clean_trace.head_outputs[layer, head]

    summaries = _each_head_replaced(model, base, patched, progress)
    flat = summaries.reshape(-1, summaries.shape[-1])
    differences = np.concatenate(
        [
            difference(model._readout(flat[i : i + _READOUT_RUNS]))
            for i in range(0, len(flat), _READOUT_RUNS)
        ]
    ).reshape(summaries.shape[:2])
    return (differences - corrupt_difference) / gap


def attention_rollout(attentions) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much of each token's final
    representation traces back to each input token, if attention were the only route.

    Each layer's heads are averaged, the residual connection is modelled as ``0.5·I`` added to
    half of that average, rows are renormalised, and the layers are multiplied from the first to
    the last. It is a heuristic, not an attribution: it ignores the values, the output
    projection, the MLPs and how much each head's output actually weighs, so two heads with the
    same weights and very different effects count the same. Compare it with
    :func:`head_effects`, which measures what removing a head does.

    Args:
        attentions: ``(layers, heads, n, n)`` weights, e.g. ``trace.attentions``.

    Returns:
        ``(n, n)`` float64, rows summing to 1; row ``i`` spreads token ``i``'s final
        representation over the input tokens.

    Raises:
        TypeError: weights that are not real numbers.
        ValueError: another shape, or weights that are negative or not finite.
    """
    weights = np.asarray(attentions)
    if weights.dtype == np.bool_ or not np.issubdtype(weights.dtype, np.number):
        raise TypeError(f"attentions must be real numbers, got dtype {weights.dtype}")
    if np.iscomplexobj(weights):
        raise TypeError("attentions must be real numbers, got complex values")
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3] or 0 in weights.shape:
        raise ValueError(
            f"attentions must have shape (layers, heads, n, n) with none empty, got {weights.shape}"
        )
    weights = weights.astype(np.float64)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("attentions must be finite and non-negative (attention weights)")
    n = weights.shape[-1]
    mixed = 0.5 * weights.mean(axis=1) + 0.5 * np.eye(n)
    mixed /= mixed.sum(axis=-1, keepdims=True)
    rollout = mixed[0]
    for layer in mixed[1:]:
        rollout = layer @ rollout
    return rollout


# --- the shared machinery --------------------------------------------------------------------


class _BaseRun:
    """One plain pass that keeps what the intervened runs start from: the residual stream
    entering each layer ``(layers, n, d)`` and each head's output ``(layers, heads, n, Dh)``,
    and the summary of the output (last position's final hidden state for a causal model,
    the mean over positions for an encoder)."""

    def __init__(self, model: Model, ids: np.ndarray):
        n = ids.size
        model._check_attention_memory(n)
        x = model._embeddings(ids)
        self.inputs = np.empty((model.num_layers, *x.shape), dtype=x.dtype)
        self.head_outputs = np.empty(
            (model.num_layers, model.num_heads, n, model.head_dim), dtype=x.dtype
        )
        for index in range(model.num_layers):
            self.inputs[index] = x
            context, _ = model._layer_attention(index, x, n, return_weights=False)
            self.head_outputs[index] = context[0]
            x = model._layer_rest(index, x, merge_heads(context))
        final = model._final_hidden(x)
        self.summary = final[-1] if model.is_causal else final.mean(axis=0)


def _each_head_replaced(
    model: Model,
    base: _BaseRun,
    replace: Callable[[int, int], np.ndarray],
    progress: Progress | None,
) -> np.ndarray:
    """The output summary of every run that replaces one head's output by
    ``replace(layer, head)``, ``(layers, heads, d)``.

    Runs that intervene at layer ``l`` join the batch there, starting from the stored stream
    and head outputs; the batch then goes through the remaining layers together. Start layers
    are taken in groups small enough to keep the batch near ``_BATCH_ROWS`` rows.
    """
    layers, heads = model.num_layers, model.num_heads
    n = base.head_outputs.shape[2]
    group = max(1, _BATCH_ROWS // (heads * n))
    total = heads * sum(layers - layer for layer in range(layers))
    done = 0
    summaries = np.empty((layers, heads, model.hidden_size), dtype=base.inputs.dtype)
    for first in range(0, layers, group):
        stop = min(layers, first + group)
        stream = None  # (runs·n, d): the runs in flight
        for index in range(first, layers):
            streams, outputs = [], []
            if stream is not None:
                context, _ = model._layer_attention(index, stream, n, return_weights=False)
                streams.append(stream)
                outputs.append(context)
            if index < stop:
                joining = np.repeat(base.head_outputs[index][None], heads, axis=0)
                for head in range(heads):
                    joining[head, head] = replace(index, head)
                streams.append(np.tile(base.inputs[index], (heads, 1)))
                outputs.append(joining)
            stream = np.concatenate(streams) if len(streams) > 1 else streams[0]
            context = np.concatenate(outputs) if len(outputs) > 1 else outputs[0]
            runs = context.shape[0]
            merged = merge_heads(context)
            if index == layers - 1 and model.is_causal:  # only the last position is read out
                stream = stream.reshape(runs, n, -1)[:, -1]
                merged = merged.reshape(runs, n, -1)[:, -1]
            stream = model._layer_rest(index, stream, merged)
            done += runs
            if progress is not None:
                progress(done / total)
        final = model._final_hidden(stream)  # causal: the last positions only
        if not model.is_causal:
            final = final.reshape(-1, n, final.shape[-1]).mean(axis=1)
        summaries[first:stop] = final.reshape(stop - first, heads, -1)
    return summaries


def _log_probs(model: Model, summaries: np.ndarray, target: int) -> np.ndarray:
    """log softmax(logits)[target] for each run's final hidden state, in float64."""
    flat = summaries.reshape(-1, summaries.shape[-1])
    result = np.empty(flat.shape[0])
    for start in range(0, flat.shape[0], _READOUT_RUNS):
        logits = model._readout(np.ascontiguousarray(flat[start : start + _READOUT_RUNS]))
        peak = logits.max(axis=-1, keepdims=True)
        total = np.exp(logits - peak).sum(axis=-1, dtype=np.float64)
        chosen = logits[:, target].astype(np.float64) - peak[:, 0]
        result[start : start + _READOUT_RUNS] = chosen - np.log(total)
    return result.reshape(summaries.shape[:-1])


def _cosine(summaries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    values = summaries.astype(np.float64)
    reference = reference.astype(np.float64)
    dots = values @ reference
    norms = np.linalg.norm(values, axis=-1) * np.linalg.norm(reference)
    return dots / np.maximum(norms, np.finfo(np.float64).tiny)


def _check_model(model) -> None:
    if not isinstance(model, Model):
        raise TypeError(
            f"model must be an attnscope.models.Model (from am.load), got {type(model).__name__}"
        )


def _check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a function of the fraction done, got {progress!r}")


def _check_token(model: Model, value, name: str) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a token id (an int), got {value!r}")
    if not 0 <= value < model.vocab_size:
        raise ValueError(
            f"{name} must be a token id in [0, {model.vocab_size}) for {model.name}, got {value}"
        )
    return int(value)


def _input_ids(model: Model, value, name: str) -> np.ndarray:
    """The token ids of an input given as a text or as ids, errors naming the argument."""
    try:
        if isinstance(value, str):
            return model._read_input(value, None)[1]
        return model._read_input(None, value)[1]
    except (TypeError, ValueError) as problem:
        raise type(problem)(f"{name}: {problem}") from None
