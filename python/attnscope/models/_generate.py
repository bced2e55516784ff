"""Text generation for causal models, with the engine's KV cache.

Generation reads the prompt once (one causal attention call per layer) and then decodes one
token per step: each layer appends the new token's key and value to its
:class:`attnscope.KVCache` and attends over it, so no past token is ever recomputed.

Without the cache (``use_cache=False``, as in transformers) every step feeds the whole sequence
so far through every layer again, one causal pass, and keeps only the last token's logits: the
same tokens, at a cost that grows with the length, which is what the cache saves.

Every step also reports the new query's attention row over the whole cache, for every layer
and head. ``KVCache.attend`` returns no weights, so the decoder keeps a copy of the rotated
keys and, once per step, computes all layers' rows in a single engine call (the queries of
every layer as one batch, an empty value matrix, and a mask hiding unused buffer rows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

import attnscope

from .._checks import flag, real_number, whole_number
from .._kv_cache import STORAGES
from ._model import check_encodable


@dataclass(frozen=True, eq=False)
class GenerationStep:
    """One generated token.

    Attributes:
        index: position of the token among the generated ones (0 = first).
        token_id: the token's id.
        text: the text this step adds (may be empty while a multi-byte character is split
            across tokens, and for special tokens such as the end of the answer).
        logprob: natural log of the token's probability under the model (before any
            temperature or top-k).
        seconds: wall time of the step (for step 0: reading the prompt).
        attention: ``(layers, heads, cache_len)`` float32, the attention row of the query that
            produced this token over every cached key (step 0: the prompt's last token).
        cache_len: tokens in the KV cache after the step (without the cache: tokens read).
        cache_nbytes: bytes of keys and values over all layers after the step (0 without
            the cache).
        done: whether this is the last step (end of text or ``max_new_tokens`` reached).
    """

    index: int
    token_id: int
    text: str
    logprob: float
    seconds: float
    attention: np.ndarray
    cache_len: int
    cache_nbytes: int
    done: bool


@dataclass(frozen=True, eq=False)
class Generation:
    """A finished generation: the prompt's ids, the new ids, their tokens, text and steps."""

    prompt_ids: list[int]
    ids: list[int]
    tokens: list[str]
    text: str
    steps: list[GenerationStep]


# --- argument checks ------------------------------------------------------------------------


def _check_sampling(temperature, top_k, seed) -> tuple[float, int | None, int | None]:
    temperature = real_number(temperature, "temperature")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        top_k = whole_number(top_k, "top_k", low=1)
    if seed is not None:
        seed = whole_number(seed, "seed", low=0)
    return temperature, top_k, seed


def _check_kv_storage(model, kv_storage) -> str | None:
    """`kv_storage` (None: the model's dtype) checked against the model's dtype."""
    if kv_storage is None:
        return None
    if not isinstance(kv_storage, str):
        raise TypeError(f"kv_storage must be a str or None, got {type(kv_storage).__name__}")
    if kv_storage not in STORAGES:
        raise ValueError(f"kv_storage must be one of {', '.join(STORAGES)}, got {kv_storage!r}")
    if kv_storage != "float32" and np.dtype(model.dtype) != np.float32:
        raise ValueError(
            f"kv_storage={kv_storage!r} needs a float32 model; this one computes in {model.dtype}"
        )
    return None if kv_storage == str(np.dtype(model.dtype)) else kv_storage


def _prompt_ids(model, prompt, max_new_tokens) -> tuple[np.ndarray, int]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty: give some text to continue")
    check_encodable(prompt, "prompt")
    context = model.context_length
    max_new_tokens = whole_number(max_new_tokens, "max_new_tokens", low=1, high=context)
    _, ids = model.tokenize(prompt)
    if ids.size == 0:
        raise ValueError(f"prompt {prompt!r} gives no tokens")
    if ids.size + max_new_tokens > context:
        raise ValueError(
            f"the prompt is {ids.size} tokens and max_new_tokens is {max_new_tokens}: together "
            f"more than the {context} tokens {model.name} can read (its context window); "
            "shorten the prompt or ask for fewer tokens"
        )
    return ids, max_new_tokens


# --- decoding through the KV cache -------------------------------------------------------------


class _Decoder:
    """One generation's state: a KV cache per layer, plus what the attention rows need."""

    def __init__(self, model, capacity: int, storage: str | None = None):
        self.model = model
        layers, heads = model.num_layers, model.num_heads
        kv_heads, head_dim = model.num_kv_heads, model.head_dim
        self.caches = [
            attnscope.KVCache(
                kv_heads, head_dim, dtype=model.dtype, capacity=capacity, storage=storage
            )
            for _ in range(layers)
        ]
        self.length = 0
        # Rotated keys of every layer (room doubles as needed) and the newest token's queries.
        self.keys = np.zeros((layers, kv_heads, min(capacity, 64), head_dim), dtype=model.dtype)
        self.queries = np.zeros((layers, heads, 1, head_dim), dtype=model.dtype)

    @property
    def cache_nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)

    def _keep_keys(self, layer: int, k: np.ndarray) -> None:
        end = self.length + k.shape[1]
        if end > self.keys.shape[2]:
            grown = np.zeros(
                self.keys.shape[:2] + (max(end, 2 * self.keys.shape[2]), self.keys.shape[3]),
                dtype=self.keys.dtype,
            )
            grown[:, :, : self.length] = self.keys[:, :, : self.length]
            self.keys = grown
        self.keys[layer, :, self.length : end] = k

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Reads the prompt, fills the caches; the next-token logits ``(vocab,)``."""

        def attend(layer, q, k, v):
            context = attnscope.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
            self.caches[layer].append(k[None], v[None])
            self._keep_keys(layer, k)
            self.queries[layer, :, 0] = q[:, -1]
            return context

        hidden = self.model.blocks(ids, 0, attend)
        self.length = ids.size
        return self.model.logits(hidden[-1:])[0]

    def decode(self, token: int) -> np.ndarray:
        """Appends `token` through every layer's cache; the next-token logits ``(vocab,)``."""

        def attend(layer, q, k, v):
            cache = self.caches[layer]
            cache.append(k[None], v[None])
            self._keep_keys(layer, k)
            self.queries[layer] = q
            return cache.attend(q[None], enable_gqa=True)[0]

        hidden = self.model.blocks(np.array([token]), self.length, attend)
        self.length += 1
        return self.model.logits(hidden)[0]

    def attention_row(self) -> np.ndarray:
        """The newest query's weights over the cache, ``(layers, heads, length)``."""
        return _newest_row(self.queries, self.keys, self.length)


class _Recomputer:
    """Decoding without a cache: every step reads the whole sequence so far again, one causal
    pass through every layer, as a model that keeps nothing between steps must."""

    cache_nbytes = 0

    def __init__(self, model, capacity: int):
        self.model = model
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.length = 0
        shape = (model.num_layers, model.num_kv_heads, capacity, model.head_dim)
        self.keys = np.zeros(shape, dtype=model.dtype)
        self.queries = np.zeros((model.num_layers, model.num_heads, 1, model.head_dim), model.dtype)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.ids[: ids.size] = ids
        self.length = ids.size
        return self._read()

    def decode(self, token: int) -> np.ndarray:
        self.ids[self.length] = token
        self.length += 1
        return self._read()

    def _read(self) -> np.ndarray:
        """The next-token logits after one pass over every token so far."""
        n = self.length

        def attend(layer, q, k, v):
            self.keys[layer, :, :n] = k
            self.queries[layer, :, 0] = q[:, -1]
            return attnscope.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        hidden = self.model.blocks(self.ids[:n], 0, attend)
        return self.model.logits(hidden[-1:])[0]

    def attention_row(self) -> np.ndarray:
        return _newest_row(self.queries, self.keys, self.length)


def _newest_row(queries: np.ndarray, keys: np.ndarray, length: int) -> np.ndarray:
    """The newest query's weights over the first `length` keys, ``(layers, heads, length)``,
    every layer in one engine call (an empty value matrix; unused key rows masked)."""
    visible = np.arange(keys.shape[2]) < length
    no_values = np.empty(keys.shape[:3] + (0,), dtype=keys.dtype)
    _, weights = attnscope.scaled_dot_product_attention(
        queries, keys, no_values, attn_mask=visible[None, :], enable_gqa=True, return_weights=True
    )
    return np.ascontiguousarray(weights[:, :, 0, :length], dtype=np.float32)


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    scores = logits.astype(np.float64)
    top = scores.max()
    return float(scores[token] - top - math.log(np.exp(scores - top).sum()))


def _choose(logits: np.ndarray, temperature: float, top_k, rng) -> int:
    if temperature == 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64)
    if top_k is not None and top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    # The largest score is taken away before dividing: every value is then <= 0, so a tiny
    # temperature sends the others to -inf (their probability 0) instead of overflowing to
    # inf - inf = NaN. As the temperature falls this becomes greedy choice, as it should.
    with np.errstate(over="ignore"):  # -x / tiny overflows to -inf: the intended limit
        probabilities = np.exp((scores - scores.max()) / temperature)
    probabilities /= probabilities.sum()
    return int(rng.choice(scores.size, p=probabilities))


class _TextPieces:
    """The text each new token adds, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # decoding restarts here, a token before the unshown text
        self._shown = 0  # tokens whose text has been given out

    def add(self, token: int, final: bool) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._start : self._shown])
        after = self._decode(self.ids[self._start :])
        if (after.endswith("\ufffd") and not final) or len(after) < len(before):
            return ""  # part of a multi-byte character: wait for the rest
        self._start, self._shown = self._shown, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def gathered(model, ids: np.ndarray, steps: Iterator[GenerationStep]) -> Generation:
    """Every step of a generation (:func:`start`'s), gathered into a :class:`Generation`."""
    steps = list(steps)
    new_ids = [step.token_id for step in steps]
    return Generation(
        prompt_ids=ids.tolist(),
        ids=new_ids,
        tokens=[model.tokenizer.id_to_token(i) or "" for i in new_ids],
        text="".join(step.text for step in steps),
        steps=steps,
    )


def start(
    model, prompt, max_new_tokens, temperature, top_k, seed, kv_storage=None, use_cache=True
) -> tuple[np.ndarray, Iterator[GenerationStep]]:
    """The prompt's ids and an iterator of the generation's steps, each yielded as soon as its
    token is chosen. Every argument is checked here, before the first step (see
    :meth:`LlamaModel.generate` for their meaning)."""
    ids, max_new_tokens = _prompt_ids(model, prompt, max_new_tokens)
    temperature, top_k, seed = _check_sampling(temperature, top_k, seed)
    storage = _check_kv_storage(model, kv_storage)
    flag(use_cache, "use_cache")
    if not use_cache and kv_storage is not None:
        raise ValueError("kv_storage sets how the cache stores rows: it needs use_cache=True")
    capacity = ids.size + max_new_tokens
    decoder = _Decoder(model, capacity, storage) if use_cache else _Recomputer(model, capacity)
    rng = np.random.default_rng(seed)
    return ids, _steps(model, ids, max_new_tokens, temperature, top_k, rng, decoder)


def _steps(
    model, ids, max_new_tokens, temperature, top_k, rng, decoder
) -> Iterator[GenerationStep]:
    pieces = _TextPieces(model.tokenizer)
    started = time.perf_counter()
    logits = decoder.prefill(ids)
    for index in range(max_new_tokens):
        token = _choose(logits, temperature, top_k, rng)
        done = token == model.eos_token_id or index == max_new_tokens - 1
        text = pieces.add(token, final=done)
        logprob = _log_softmax_at(logits, token)
        attention = decoder.attention_row()
        yield GenerationStep(
            index=index,
            token_id=token,
            text=text,
            logprob=logprob,
            seconds=time.perf_counter() - started,
            attention=attention,
            cache_len=decoder.length,
            cache_nbytes=decoder.cache_nbytes,
            done=done,
        )
        if done:
            return
        started = time.perf_counter()
        logits = decoder.decode(token)
