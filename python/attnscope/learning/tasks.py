"""The training tasks: what each sequence holds, what each position must output, and which
positions count in the loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS = ("induction", "previous_token", "agreement")
# The agreement task's words: pronouns first, then nouns whose grammatical gender is part of
# their meaning, so that each pronoun has exactly one possible antecedent in a sequence.
AGREEMENT_WORDS = {
    "she": ("queen", "mother", "sister", "aunt", "girl", "woman"),
    "he": ("king", "father", "brother", "uncle", "boy", "man"),
}
_PRONOUNS = tuple(AGREEMENT_WORDS)
_FEMININE, _MASCULINE = AGREEMENT_WORDS["she"], AGREEMENT_WORDS["he"]
_FIRST_NOUN = len(_PRONOUNS)
_FIRST_FILLER = _FIRST_NOUN + len(_FEMININE) + len(_MASCULINE)


def _check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class Batch:
    """Token ids ``(B, T)``, the id each position must output ``(B, T)``, and which positions
    count in the loss and accuracy ``(B, T)`` bool."""

    tokens: np.ndarray
    targets: np.ndarray
    counted: np.ndarray


def repeated_sequences(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """``count`` sequences of ``seq_len // 2`` distinct random ids, each repeated twice (then
    one random id if ``seq_len`` is odd): the held-out probe that reveals induction heads."""
    periods = np.full(count, seq_len // 2)
    return _repeat_blocks(rng, periods, seq_len, vocab_size)[0]


def _repeat_blocks(rng: np.random.Generator, periods: np.ndarray, seq_len: int, vocab_size: int):
    """Per row, ``periods[row]`` distinct random ids, the same ids again, then random ids."""
    count = len(periods)
    half = seq_len // 2
    distinct = np.argsort(rng.random((count, vocab_size)), axis=1)[:, :half]
    tail = rng.integers(0, vocab_size, size=(count, seq_len - half))
    fresh = np.concatenate([distinct, tail], axis=1)
    # Position j of the second copy reads position j - period of the first.
    positions = np.arange(seq_len)[None, :]
    period = periods[:, None]
    in_copy = (positions >= period) & (positions < 2 * period)
    source = np.where(in_copy, positions - period, positions)
    return np.take_along_axis(fresh, source, axis=1), in_copy


def make_batch(task: str, rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """A :class:`Batch` of `count` sequences of one task, drawn from `rng`."""
    _check_choice(task, "task", TASKS)
    if task == "induction":
        return _induction_batch(rng, count, seq_len, vocab_size)
    if task == "previous_token":
        tokens = rng.integers(0, vocab_size, size=(count, seq_len))
        targets = np.roll(tokens, 1, axis=1)
        counted = np.ones(tokens.shape, dtype=bool)
        counted[:, 0] = False  # the first position has no previous token
        return Batch(tokens, targets, counted)
    return _agreement_batch(rng, count, seq_len, vocab_size)


def _induction_batch(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """Random ids repeated once, with a period drawn per sequence (between a quarter and a half
    of the length, so that no fixed offset finds the earlier copy); the loss counts the
    positions whose next token is a repeat: only context can predict them."""
    periods = rng.integers(max(seq_len // 4, 2), seq_len // 2 + 1, size=count)
    tokens, in_copy = _repeat_blocks(rng, periods, seq_len, vocab_size)
    targets = np.roll(tokens, -1, axis=1)
    counted = np.roll(in_copy, -1, axis=1)
    counted[:, -1] = False
    # The first position of the second copy follows a token that has not repeated yet.
    counted &= np.arange(seq_len)[None, :] >= periods[:, None]
    return Batch(tokens, targets, counted)


def _agreement_batch(rng: np.random.Generator, count: int, seq_len: int, vocab_size: int):
    """Filler words with one feminine and one masculine noun somewhere, and a pronoun at the
    end whose target is the noun of its gender: 'the queen met the king ... she' -> queen."""
    rows = np.arange(count)
    tokens = rng.integers(_FIRST_FILLER, vocab_size, size=(count, seq_len))
    # Two distinct places for the nouns among the first seq_len - 1 positions.
    places = np.argsort(rng.random((count, seq_len - 1)), axis=1)[:, :2]
    feminine = _FIRST_NOUN + rng.integers(0, len(_FEMININE), size=count)
    masculine = _FIRST_NOUN + len(_FEMININE) + rng.integers(0, len(_MASCULINE), size=count)
    tokens[rows, places[:, 0]] = feminine
    tokens[rows, places[:, 1]] = masculine
    pronoun = rng.integers(0, len(_PRONOUNS), size=count)
    tokens[:, -1] = pronoun
    targets = np.zeros_like(tokens)
    targets[:, -1] = np.where(pronoun == 0, feminine, masculine)
    counted = np.zeros(tokens.shape, dtype=bool)
    counted[:, -1] = True
    return Batch(tokens, targets, counted)


def token_names(task: str, vocab_size: int) -> list[str]:
    """A readable name for every id: words for the agreement task, ``t<id>`` otherwise."""
    _check_choice(task, "task", TASKS)
    if task != "agreement":
        return [f"t{i}" for i in range(vocab_size)]
    words = [*_PRONOUNS, *_FEMININE, *_MASCULINE]
    return words + [f"w{i}" for i in range(len(words), vocab_size)]
