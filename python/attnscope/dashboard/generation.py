"""Generation for the Real model page: check a request, run a causal model's token stream, and
keep a replay of decoding (each new token's attention over the growing KV cache, the cache's
size and the time of every step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._checks import is_real_number
from . import budget
from .real_model import display_tokens

MODES = ("chat", "continue")
# Page limits, set by memory: a replay keeps (layers x heads x cache) floats per step.
MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128
SEED = 0  # sampling is seeded, so the same settings give the same text


class GenerationInputError(ValueError):
    """A generation request the page refuses; the message is meant for the reader."""


def can_generate(model) -> bool:
    """Whether `model` decodes token by token through a KV cache (a causal language model)."""
    return callable(getattr(model, "stream", None))


@dataclass(frozen=True)
class Request:
    """A checked request: the exact text the model continues and how."""

    text: str  # the prompt as fed (through the chat template in chat mode)
    prompt_tokens: list[str]  # readable tokens of `text`
    max_new_tokens: int
    temperature: float


def prepare(model, prompt: str, *, mode: str, max_new_tokens, temperature: float) -> Request:
    """Check a request from the page and build the text the model will continue.

    Raises:
        GenerationInputError: an empty prompt, a prompt over MAX_PROMPT_TOKENS tokens or one
            that leaves no room in the context, max_new_tokens outside [1, MAX_NEW_TOKENS], a
            negative temperature, or an unknown mode.
    """
    if mode not in MODES:
        raise GenerationInputError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationInputError("Type a prompt first: the model needs something to continue.")
    if (
        not is_real_number(max_new_tokens)
        or not 1 <= max_new_tokens <= MAX_NEW_TOKENS  # NaN and inf fail here
        or max_new_tokens != int(max_new_tokens)
    ):
        raise GenerationInputError(
            f"New tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}."
        )
    if not temperature >= 0:
        raise GenerationInputError(f"Temperature must be 0 or more, got {temperature}.")
    text = (
        prompt if mode == "continue" else model.chat_prompt([{"role": "user", "content": prompt}])
    )
    tokens, _ = model.tokenize(text)
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise GenerationInputError(
            f"That prompt is {len(tokens):,} tokens long; this page generates from at most "
            f"{MAX_PROMPT_TOKENS} tokens. Shorten it."
        )
    room = model.context_length - len(tokens)
    if max_new_tokens > room:
        raise GenerationInputError(
            f"The prompt leaves room for {room} new tokens in {model.name}'s context window, "
            f"not {int(max_new_tokens)}."
        )
    # The page keeps the replay and, when asked, the same reply recomputed without the cache.
    replay_bytes = budget.estimate_replay(
        model.num_layers, model.num_heads, len(tokens), int(max_new_tokens)
    )
    budget.check(
        2 * replay_bytes,
        f"Replaying {int(max_new_tokens)} new tokens of {model.name}",
        lower="the new tokens or shorten the prompt",
    )
    return Request(text, display_tokens(tokens), int(max_new_tokens), float(temperature))


def piece_label(text: str) -> str:
    """A generated piece as an axis label: newlines shown as ⏎, blanks as ␣."""
    shown = text.replace("\n", "⏎").strip()
    return shown or "␣"


@dataclass(eq=False)
class Replay:
    """Everything the page shows about one generation, step by step.

    Step 0 reads the whole prompt (prefill) and picks the first new token; each later step
    feeds the token just picked and attends over every cached key.
    """

    prompt_tokens: list[str]
    pieces: list[str] = field(default_factory=list)  # decoded text of each new token
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cache_lens: list[int] = field(default_factory=list)
    cache_nbytes: list[int] = field(default_factory=list)
    attention: list[np.ndarray] = field(default_factory=list)  # (layers, heads, cache) per step

    def add(self, step) -> None:
        self.pieces.append(step.text)
        self.token_ids.append(int(step.token_id))
        self.logprobs.append(float(step.logprob))
        self.seconds.append(float(step.seconds))
        self.cache_lens.append(int(step.cache_len))
        self.cache_nbytes.append(int(step.cache_nbytes))
        self.attention.append(np.array(step.attention, dtype=np.float32))

    @property
    def steps(self) -> int:
        return len(self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def num_layers(self) -> int:
        return self.attention[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention[0].shape[1]

    def cache_tokens(self) -> list[str]:
        """The token at every position the last step attended to: prompt, then new tokens."""
        width = self.attention[-1].shape[-1]
        return (self.prompt_tokens + [piece_label(p) for p in self.pieces])[:width]

    def step_tokens(self) -> list[str]:
        """What each step wrote, as '→ token'."""
        return [f"→ {piece_label(piece)}" for piece in self.pieces]

    def head_rows(self, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, cache)`` weights of one head, a row per step, and which cells existed
        (a key enters the cache only when its token has been fed)."""
        width = self.attention[-1].shape[-1]
        weights = np.zeros((self.steps, width), dtype=np.float32)
        visible = np.zeros((self.steps, width), dtype=bool)
        for k, rows in enumerate(self.attention):
            weights[k, : rows.shape[-1]] = rows[layer, head]
            visible[k, : rows.shape[-1]] = True
        return weights, visible

    def first_token_share(self) -> np.ndarray:
        """``(layers, heads)``: the weight each head gives the first cached token, averaged
        over the steps (how much of it the attention sink takes)."""
        return np.mean([rows[:, :, 0] for rows in self.attention], axis=0)

    def key_groups(self) -> list[str]:
        width = self.attention[-1].shape[-1]
        prompt = len(self.prompt_tokens)
        return ["prompt" if i < prompt else "generated" for i in range(width)]

    def timing(self) -> pd.DataFrame:
        """One row per step: the token it produced, its time, and the cache after it."""
        return pd.DataFrame(
            {
                "step": np.arange(self.steps),
                "token": [piece_label(p) for p in self.pieces],
                "log-probability": self.logprobs,
                "milliseconds": np.asarray(self.seconds) * 1e3,
                "cached tokens": self.cache_lens,
                "cache KiB": np.asarray(self.cache_nbytes) / 1024,
            }
        )

    def prompt_cost(self) -> tuple[float, float | None]:
        """Milliseconds per prompt token of step 0 (reading the prompt), and the median
        milliseconds of a decoding step after it (None for a one-step reply)."""
        per_prompt_token = self.seconds[0] * 1e3 / len(self.prompt_tokens)
        step = float(np.median(self.seconds[1:])) * 1e3 if self.steps > 1 else None
        return per_prompt_token, step

    def decode_rate(self) -> float | None:
        """New tokens per second after the prompt was read (steps 1 onwards), None for one step."""
        decode_seconds = sum(self.seconds[1:])
        return (self.steps - 1) / decode_seconds if self.steps > 1 and decode_seconds > 0 else None


def run(
    model,
    request: Request,
    on_step: Callable[[Replay], None] | None = None,
    *,
    use_cache: bool = True,
) -> Replay:
    """Generate with `model`'s token stream, calling `on_step` after each new token; without
    the cache (`use_cache` False) each step reads the whole sequence again."""
    replay = Replay(request.prompt_tokens)
    seed = SEED if request.temperature > 0 else None
    for step in model.stream(
        request.text,
        max_new_tokens=request.max_new_tokens,
        temperature=request.temperature,
        seed=seed,
        use_cache=use_cache,
    ):
        replay.add(step)
        if on_step is not None:
            on_step(replay)
    return replay


def first_difference(cached: Replay, recomputed: Replay) -> int | None:
    """The first step at which the two runs wrote different tokens, None if they agree."""
    for step, (one, other) in enumerate(zip(cached.token_ids, recomputed.token_ids, strict=False)):
        if one != other:
            return step
    return None if cached.steps == recomputed.steps else min(cached.steps, recomputed.steps)


def cache_comparison(cached: Replay, recomputed: Replay) -> pd.DataFrame:
    """One row per step of the same reply written both ways: the tokens each step fed through
    the layers (with the cache: the prompt, then one; without: everything so far), both times
    and how many times longer the step took without the cache."""
    steps = min(cached.steps, recomputed.steps)
    prompt = len(cached.prompt_tokens)
    with_cache = np.asarray(cached.seconds[:steps]) * 1e3
    without = np.asarray(recomputed.seconds[:steps]) * 1e3
    return pd.DataFrame(
        {
            "step": np.arange(steps),
            "token": [piece_label(p) for p in cached.pieces[:steps]],
            "tokens fed with the cache": [prompt] + [1] * (steps - 1),
            "tokens fed without": recomputed.cache_lens[:steps],
            "ms with the cache": with_cache,
            "ms without": without,
            "times longer without": without / with_cache,
        }
    )


def recompute_estimate(replay: Replay) -> tuple[int, float]:
    """Tokens that writing `replay` again without the cache feeds through the layers (every
    step reads the whole sequence so far), and a rough time for that in seconds: those tokens
    at the cost per token of this run's prompt read."""
    prompt = len(replay.prompt_tokens)
    tokens = sum(prompt + step for step in range(replay.steps))
    return tokens, tokens * replay.seconds[0] / prompt


def decoding_ratio(comparison: pd.DataFrame) -> float | None:
    """Total time of the steps after the prompt, without the cache over with it (None for a
    one-step reply: both runs only read the prompt)."""
    decoding = comparison.iloc[1:]
    if decoding.empty:
        return None
    return float(decoding["ms without"].sum() / decoding["ms with the cache"].sum())
