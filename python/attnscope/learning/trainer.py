"""Training and its reports: Adam steps on fresh batches, and what a report measures on
held-out sequences (loss, accuracy, head scores, copy losses, the W_Q/W_K gradient)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .._checks import whole_number
from .._engine import core
from ..models.stats import head_stats, row_entropy
from .config import TrainConfig
from .model import _backward, _cross_entropy, _forward, _init_params
from .tasks import Batch, make_batch, repeated_sequences

_ADAM_BETAS = (0.9, 0.98)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class Report:
    """Where training stands after `step` Adam steps, measured on held-out sequences.

    Attributes:
        step, steps: steps taken so far, and in all.
        loss, accuracy: cross-entropy (nats) and share of right argmax predictions on the
            task's held-out sequences, over the positions the task counts.
        train_loss: mean loss of the training batches since the previous report (None at 0).
        previous_token, induction, entropy: ``(layers, heads)``: mean attention to the token
            just before, mean induction score (attention to the token that followed the current
            one in the first copy) and mean row entropy in nats, on held-out sequences of random
            tokens repeated twice.
        first_copy_loss, second_copy_loss: loss of the model predicting the first and the
            second copy of those sequences: the second falls far below the first once the
            model copies from context.
        qk_grad_norm: ``(layers,)``: norm of the held-out loss's gradient w.r.t. W_Q and W_K
            together, per layer.
        maps: ``(layers, heads, T, T)`` attention weights on the first held-out task sequence.
        seconds: wall time since training started (the one field a rerun does not repeat).
        diverged: True on the last report of a run that diverged: a training loss, a weight
            or the model's outputs became NaN or infinite (a learning rate too large, most
            often). Training stops there; this report's measurements are NaN, its
            ``train_loss`` is what the last steps gave, and every earlier report is intact.
    """

    step: int
    steps: int
    loss: float
    accuracy: float
    train_loss: float | None
    previous_token: np.ndarray
    induction: np.ndarray
    entropy: np.ndarray
    first_copy_loss: float
    second_copy_loss: float
    qk_grad_norm: np.ndarray
    maps: np.ndarray
    seconds: float = field(compare=False)
    diverged: bool = False


def _seeds(config: TrainConfig) -> list[np.random.SeedSequence]:
    """Independent streams for the initial weights, the training batches and held-out data."""
    return np.random.SeedSequence(config.seed).spawn(3)


def held_out_data(config: TrainConfig) -> tuple[Batch, np.ndarray]:
    """The held-out task batch and the probe (random ids repeated twice) a run reports on:
    ``config.eval_size`` sequences each, fixed by the seed."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    rng = np.random.default_rng(_seeds(config)[2])
    shape = (config.eval_size, config.seq_len, config.vocab_size)
    return make_batch(config.task, rng, *shape), repeated_sequences(rng, *shape)


class Trainer:
    """One model, its Adam state and its held-out data; :meth:`run` trains and reports.

    The seed fixes three independent streams: the initial weights, the training batches and
    the held-out sequences, so the same config gives bitwise the same run.
    """

    def __init__(self, config: TrainConfig) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        # Attention runs in the compiled engine, never in the slow reference: without it,
        # refuse here with the reason rather than at the first step.
        core()
        self.config = config
        init_seed, data_seed, _ = _seeds(config)
        self.params = _init_params(config, np.random.default_rng(init_seed))
        self._data = np.random.default_rng(data_seed)
        self.held_out, self.probe = held_out_data(config)
        self.step = 0
        self._first_moment = {name: np.zeros_like(p) for name, p in self.params.items()}
        self._second_moment = {name: np.zeros_like(p) for name, p in self.params.items()}

    def loss_and_gradients(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """The mean loss on `batch` and its gradient w.r.t. every parameter (``params`` keys)."""
        logits, saved, _ = _forward(self.params, self.config, batch.tokens)
        loss, grad_logits, _ = _cross_entropy(logits, batch)
        return loss, _backward(self.params, self.config, batch.tokens, saved, grad_logits)

    def attention_maps(self, tokens: np.ndarray) -> np.ndarray:
        """The model's attention weights ``(layers, B, heads, T, T)`` on ``tokens`` ``(B, T)``."""
        tokens = self._check_tokens(tokens)
        return _forward(self.params, self.config, tokens, keep_weights=True)[2]

    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.config.seq_len:
            raise ValueError(
                f"tokens must have shape (B, T) with 1 <= T <= {self.config.seq_len}, "
                f"got {tokens.shape}"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return tokens

    def weights_finite(self) -> bool:
        """Whether every parameter is finite (training has not diverged)."""
        return all(np.isfinite(param).all() for param in self.params.values())

    def train_step(self) -> float:
        """One Adam step on a fresh training batch; returns that batch's loss."""
        config = self.config
        batch = make_batch(
            config.task, self._data, config.batch_size, config.seq_len, config.vocab_size
        )
        loss, grads = self.loss_and_gradients(batch)
        self.apply_gradients(grads)
        return loss

    def apply_gradients(self, grads: dict[str, np.ndarray]) -> None:
        """One Adam step with `grads` (as :meth:`loss_and_gradients` returns them)."""
        if not isinstance(grads, dict) or set(grads) != set(self.params):
            raise ValueError(
                "grads must be a dict with one array per parameter, named as in params"
            )
        # Checked before anything moves, so a refused call leaves the model as it was.
        for name, grad in grads.items():
            if np.shape(grad) != self.params[name].shape:
                raise ValueError(
                    f"grads[{name!r}] has shape {np.shape(grad)}, "
                    f"the parameter {self.params[name].shape}"
                )
        self.step += 1
        beta1, beta2 = _ADAM_BETAS
        step_size = (
            self.config.learning_rate * math.sqrt(1 - beta2**self.step) / (1 - beta1**self.step)
        )
        for name, grad in grads.items():
            first, second = self._first_moment[name], self._second_moment[name]
            first *= beta1
            first += (1 - beta1) * grad
            second *= beta2
            second += (1 - beta2) * grad * grad
            self.params[name] -= (step_size * first / (np.sqrt(second) + _ADAM_EPS)).astype(
                first.dtype
            )

    def report(
        self, train_loss: float | None = None, seconds: float = 0.0, steps: int | None = None
    ) -> Report:
        """Measure the model as it is now on the held-out and probe sequences (`steps`: the
        run's step count in all, the config's by default). A model whose weights or outputs
        are not finite gets a ``diverged`` report instead, its measurements NaN."""
        config = self.config
        steps = config.steps if steps is None else steps
        if not self.weights_finite():
            return self._diverged_report(train_loss, seconds, steps)
        logits, saved, maps = _forward(self.params, config, self.held_out.tokens, True)
        probe_logits, _, probe_maps = _forward(self.params, config, self.probe, True)
        if not all(np.isfinite(a).all() for a in (logits, maps, probe_logits, probe_maps)):
            return self._diverged_report(train_loss, seconds, steps)
        loss, grad_logits, _ = _cross_entropy(logits, self.held_out)
        grads = _backward(self.params, config, self.held_out.tokens, saved, grad_logits)
        right = (logits.argmax(axis=-1) == self.held_out.targets) & self.held_out.counted
        qk_norms = [
            math.sqrt(
                float((grads[f"{layer}.w_q"] ** 2).sum() + (grads[f"{layer}.w_k"] ** 2).sum())
            )
            for layer in range(config.num_layers)
        ]
        first_copy, second_copy = _copy_losses(probe_logits, self.probe)
        previous, induction, entropy = head_scores(probe_maps)
        return Report(
            step=self.step,
            steps=steps,
            loss=loss,
            accuracy=float(right.sum() / max(int(self.held_out.counted.sum()), 1)),
            train_loss=train_loss,
            previous_token=previous,
            induction=induction,
            entropy=entropy,
            first_copy_loss=first_copy,
            second_copy_loss=second_copy,
            qk_grad_norm=np.array(qk_norms),
            maps=maps[:, 0],
            seconds=seconds,
        )

    def _diverged_report(self, train_loss: float | None, seconds: float, steps: int) -> Report:
        """The report of a model that diverged: where and when, every measurement NaN."""
        shape = (self.config.num_layers, self.config.num_heads)
        length = self.held_out.tokens.shape[1]
        return Report(
            step=self.step,
            steps=steps,
            loss=math.nan,
            accuracy=math.nan,
            train_loss=train_loss,
            previous_token=np.full(shape, np.nan),
            induction=np.full(shape, np.nan),
            entropy=np.full(shape, np.nan),
            first_copy_loss=math.nan,
            second_copy_loss=math.nan,
            qk_grad_norm=np.full(self.config.num_layers, np.nan),
            maps=np.full((*shape, length, length), np.nan),
            seconds=seconds,
            diverged=True,
        )

    def run(self, steps: int | None = None) -> Iterator[Report]:
        """Train until ``steps`` steps in all (default: the config's), yielding a report now,
        after every ``report_every`` steps and at the end. A run that diverges (a loss or a
        weight turns NaN or infinite) stops at the step where it did, with a last report
        marked ``diverged``."""
        steps = self.config.steps if steps is None else steps
        whole_number(steps, "steps", low=self.step)
        started = time.perf_counter()
        with _one_blas_thread():
            report = self.report(seconds=0.0, steps=steps)
        yield report
        while self.step < steps and not report.diverged:
            # Train up to the next report with BLAS on one thread, and give the caller back
            # its threads while it looks at the report. Overflow is not warned about: a run
            # that diverges says so in its last report.
            with _one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
                losses = [self.train_step()]
                while (
                    self.step % self.config.report_every
                    and self.step < steps
                    and math.isfinite(losses[-1])
                ):
                    losses.append(self.train_step())
                seconds = time.perf_counter() - started
                report = self.report(float(np.mean(losses)), seconds, steps)
                if not math.isfinite(losses[-1]) and not report.diverged:
                    report = self._diverged_report(report.train_loss, seconds, steps)
            yield report


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """The trainer's matrices are tiny: a multithreaded BLAS's threads would only wait on each
    other and on the engine's, which on 2 busy cores makes a step several times slower. With
    threadpoolctl installed, BLAS runs on one thread while the trainer computes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def head_scores(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous-token score, induction score and mean row entropy (nats) of every head, each
    ``(layers, heads)``, from causal attention weights ``(layers, B, heads, T, T)`` on
    sequences whose first ``2 * (T // 2)`` tokens are a block repeated twice.

    The scores are those of :func:`attnscope.models.stats.head_stats`, averaged over the
    ``B`` sequences: mean ``A[i, i - 1]`` over rows ``i >= 1``, and mean ``A[i, i - P + 1]``
    over the second copy (``P = T // 2``).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 5 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] < 4:
        raise ValueError(
            f"maps must have shape (layers, B, heads, T, T) with T >= 4, got {maps.shape}"
        )
    num_layers, _, num_heads, length, _ = maps.shape
    # Both scores are linear in the maps, so the score of the mean map is the mean score.
    # Causal rows of the repeated part see only it: an odd sequence's last token is cut off.
    repeated = 2 * (length // 2)
    mean_maps = maps.mean(axis=1)[..., :repeated, :repeated]
    stats = head_stats(mean_maps, induction=mean_maps)
    shape = (num_layers, num_heads)
    previous = np.array([s["previous_token"] for s in stats]).reshape(shape)
    induction = np.array([s["induction"] for s in stats]).reshape(shape)
    return previous, induction, row_entropy(maps).mean(axis=(1, 3))


def _copy_losses(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, float]:
    """Mean loss predicting the tokens of the first copy (after its first) and of the second."""
    period = tokens.shape[1] // 2
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    next_tokens = tokens[:, 1 : 2 * period]
    losses = -np.take_along_axis(log_probs[:, : 2 * period - 1], next_tokens[..., None], -1)[..., 0]
    return float(losses[:, : period - 1].mean()), float(losses[:, period:].mean())


def training(config: TrainConfig) -> Iterator[Report]:
    """Train a fresh model for `config`, yielding a :class:`Report` at step 0, every
    ``config.report_every`` steps and at the end."""
    return Trainer(config).run()


def train(config: TrainConfig, on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Train a fresh model for `config` and return every report (each also given to
    `on_report` as it is made); a run that diverges ends with a report marked ``diverged``."""
    reports = []
    for report in training(config):
        if on_report is not None:
            on_report(report)
        reports.append(report)
    return reports
