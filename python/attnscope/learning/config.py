"""What to train and how: the config, every field checked when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._checks import flag, float_dtype, real_number, whole_number
from .tasks import _FIRST_FILLER, _FIRST_NOUN, TASKS, _check_choice


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how. Every field is checked when the config is made.

    Attributes:
        task: one of ``TASKS``: ``"induction"`` (random tokens repeated twice, predict the next
            token), ``"previous_token"`` (output the token just before), ``"agreement"``
            (at a pronoun, name the earlier noun it refers to).
        num_layers, num_heads, d_model: the model; each head has ``d_model // num_heads`` dims.
        scale: ``"sqrt"`` for the usual ``1/√d_k``, or a positive number (``1.0``: no scaling).
        mlp: add a ReLU MLP (4 × d_model wide) after each attention layer.
        layer_norm: normalise each position before attention, the MLP and the unembedding.
        vocab_size, seq_len, batch_size: the data; induction repeats a block of a quarter to
            a half of ``seq_len`` tokens (the held-out probe: exactly half).
        steps, learning_rate, seed: the optimisation (Adam); the same seed gives the same run.
        report_every: report after every this many steps (and at step 0 and at the end).
        eval_size: held-out sequences for the reports' loss, accuracy and head scores.
        dtype: ``np.float32`` (training) or ``np.float64`` (exact gradient checks).
    """

    task: str = "induction"
    num_layers: int = 2
    num_heads: int = 4
    d_model: int = 64
    scale: str | float = "sqrt"
    mlp: bool = False
    layer_norm: bool = True
    vocab_size: int = 64
    seq_len: int = 32
    batch_size: int = 32
    steps: int = 400
    learning_rate: float = 5e-3
    seed: int = 0
    report_every: int = 25
    eval_size: int = 64
    dtype: type = np.float32

    def __post_init__(self) -> None:
        _check_choice(self.task, "task", TASKS)
        for name, low in (
            ("num_layers", 1),
            ("num_heads", 1),
            ("d_model", 1),
            ("vocab_size", 2),
            ("seq_len", 4),
            ("batch_size", 1),
            ("steps", 0),
            ("seed", 0),
            ("report_every", 1),
            ("eval_size", 1),
        ):
            whole_number(getattr(self, name), name, low=low)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})"
            )
        for name in ("mlp", "layer_norm"):
            flag(getattr(self, name), name)
        _check_positive(self.learning_rate, "learning_rate")
        if self.scale != "sqrt":
            if isinstance(self.scale, str):
                raise ValueError(f"scale must be 'sqrt' or a positive number, got {self.scale!r}")
            _check_positive(self.scale, "scale")
        if self.dtype is None:  # np.dtype(None) would be float64: refused, not a default
            raise TypeError("dtype must be numpy.float32 or numpy.float64, got None")
        float_dtype(self.dtype)
        _check_task_fits(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def attention_scale(self) -> float:
        """The number the engine multiplies ``Q·Kᵀ`` by."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale == "sqrt" else float(self.scale)


def _check_positive(value, name: str) -> None:
    if real_number(value, name, finite=True) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_task_fits(config: TrainConfig) -> None:
    """The vocabulary must hold what the task draws from."""
    if config.task == "induction" and config.vocab_size < config.seq_len // 2:
        raise ValueError(
            f"vocab_size ({config.vocab_size}) must be >= seq_len // 2 ({config.seq_len // 2}): "
            "the induction task draws each repeated block without repeats"
        )
    if config.task == "agreement" and config.vocab_size < _FIRST_FILLER + 2:
        raise ValueError(
            f"vocab_size must be >= {_FIRST_FILLER + 2} for the agreement task "
            f"(2 pronouns, {_FIRST_FILLER - _FIRST_NOUN} nouns and some filler words), "
            f"got {config.vocab_size}"
        )
