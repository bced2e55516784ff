"""The computing behind the "Learning: heads emerge" page: the page's choices turned into a
training config, training bounded in steps and time, and the reports turned into frames for
the charts (loss curves, the layers × heads grid of scores, the with/without √d_k comparison).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from attnscope import learning

from .inside import softmax_gradient_norm

TASK_LABELS = {
    "induction": "Induction: random tokens, repeated",
    "previous_token": "Copy the previous token",
    "agreement": "Agreement: pronoun → its noun",
}
SCALINGS = {"÷ √d_k": "sqrt", "no scaling (× 1)": 1.0}
MAX_LAYERS = 3
HEAD_CHOICES = (1, 2, 4, 8)
WIDTH_CHOICES = (32, 64, 128, 256)
STEP_RANGE = (25, 1500)
# A run stops after this long whatever its step count: the page must stay usable on 2 cores.
TIME_BUDGET_S = 60.0
REPORTS_PER_RUN = 30
# Each report costs a few training steps (held-out forward, backward and probe).
MIN_REPORT_EVERY = 5
# The comparison's wide heads: at d_k = 64 an unscaled score already spreads by about 8.
COMPARE_WIDTH = 128
COMPARE_HEADS = 2
SCORES = {
    "induction": "induction score",
    "previous_token": "previous-token score",
    "entropy": "entropy (nats)",
}


@dataclass(frozen=True)
class Run:
    """The reports of one training run so far, and why it ended (None while it goes on).
    A run that diverged keeps its reports up to the divergence, all finite."""

    label: str
    config: learning.TrainConfig
    reports: tuple[learning.Report, ...]
    ended: str | None = None
    diverged: bool = False

    @property
    def last(self) -> learning.Report:
        return self.reports[-1]


def make_config(
    task: str, layers: int, heads: int, d_model: int, steps: int, scaling: str, seed: int
) -> learning.TrainConfig:
    """The training config for the page's choices; ValueError/TypeError for bad ones."""
    if task not in TASK_LABELS:
        raise ValueError(f"unknown task {task!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    if not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"layers must be from 1 to {MAX_LAYERS}, got {layers}")
    if heads not in HEAD_CHOICES or d_model not in WIDTH_CHOICES:
        raise ValueError(f"heads must be one of {HEAD_CHOICES} and width one of {WIDTH_CHOICES}")
    if not STEP_RANGE[0] <= steps <= STEP_RANGE[1]:
        raise ValueError(f"steps must be from {STEP_RANGE[0]} to {STEP_RANGE[1]}, got {steps}")
    return learning.TrainConfig(
        task=task,
        num_layers=layers,
        num_heads=heads,
        d_model=d_model,
        steps=steps,
        scale=SCALINGS[scaling],
        seed=seed,
        report_every=max(MIN_REPORT_EVERY, steps // REPORTS_PER_RUN),
    )


def compare_configs(config: learning.TrainConfig) -> dict[str, learning.TrainConfig]:
    """The same seed and task with and without √d_k, at wide heads where the factor matters."""
    wide = replace(config, d_model=COMPARE_WIDTH, num_heads=COMPARE_HEADS)
    return {
        f"÷ √d_k (d_k = {wide.head_dim})": replace(wide, scale="sqrt"),
        f"no scaling (d_k = {wide.head_dim})": replace(wide, scale=1.0),
    }


def bounded_run(
    label: str, config: learning.TrainConfig, time_budget_s: float = TIME_BUDGET_S
) -> Iterator[Run]:
    """Train `config`, yielding the run after every report; it ends at its last step, when
    `time_budget_s` has passed or when training diverges, whichever comes first
    (``Run.ended`` says which)."""
    reports: list[learning.Report] = []
    started = time.perf_counter()
    for report in learning.training(config):
        if report.diverged:
            ended = (
                f"diverged at step {report.step}: the training loss or the weights became "
                "NaN or infinite, so training stopped; the charts show the steps before"
            )
            yield Run(label, config, tuple(reports), ended=ended, diverged=True)
            return
        reports.append(report)
        if report.step >= config.steps:
            yield Run(label, config, tuple(reports), ended=f"finished {config.steps} steps")
            return
        if time.perf_counter() - started > time_budget_s:
            ended = f"stopped at step {report.step}: the {time_budget_s:.0f} s budget ran out"
            yield Run(label, config, tuple(reports), ended=ended)
            return
        yield Run(label, config, tuple(reports))


def measures(report: learning.Report) -> dict[str, float]:
    """Every number of one report that a curve, a metric or the comparison shows, by name."""
    return {
        "held-out loss": report.loss,
        "accuracy": report.accuracy,
        "best induction score": float(report.induction.max()),
        "best previous-token score": float(report.previous_token.max()),
        "entropy (nats)": float(report.entropy.mean()),
        "W_Q/W_K gradient norm": float(np.sqrt((report.qk_grad_norm**2).sum())),
        "softmax gradient": softmax_gradient(report),
        "first-copy loss": report.first_copy_loss,
        "second-copy loss": report.second_copy_loss,
        "seconds": report.seconds,
    }


def history_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, report): the step and every number a curve can show."""
    rows = [
        {"run": run.label, "step": report.step, **measures(report)}
        for run in runs
        for report in run.reports
    ]
    return pd.DataFrame(rows)


def softmax_gradient(report: learning.Report) -> float:
    """How much the softmax lets a change of the scores through, averaged over the rows of
    every head's map on the example sequence (the Frobenius norm of its Jacobian; 0 once a
    row is one-hot)."""
    return float(softmax_gradient_norm(report.maps).mean())


def loss_frame(run: Run) -> pd.DataFrame:
    """Long form for the loss chart: held-out loss, and for repeated sequences the loss on
    their first and their second copy."""
    history = history_frame([run])
    curves = ["held-out loss", "first-copy loss", "second-copy loss"]
    return history.melt(id_vars="step", value_vars=curves, var_name="curve", value_name="loss")


def score_frame(report: learning.Report) -> pd.DataFrame:
    """One row per (layer, head) with its induction, previous-token and entropy scores."""
    layers, heads = report.induction.shape
    return pd.DataFrame(
        {
            "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers),
            SCORES["induction"]: report.induction.ravel(),
            SCORES["previous_token"]: report.previous_token.ravel(),
            SCORES["entropy"]: report.entropy.ravel(),
        }
    )


def best_head(report: learning.Report, score: str = "induction") -> tuple[int, int, float]:
    """``(layer, head, value)`` of the head with the highest `score` ("induction" or
    "previous_token")."""
    values = getattr(report, score)
    layer, head = np.unravel_index(int(values.argmax()), values.shape)
    return int(layer), int(head), float(values[layer, head])


def example_tokens(config: learning.TrainConfig) -> list[str]:
    """The words of the held-out sequence whose attention maps the reports carry."""
    sequence = learning.held_out_data(config)[0].tokens[0]
    names = learning.token_names(config.task, config.vocab_size)
    return [names[int(i)] for i in sequence]


def summary(run: Run) -> dict[str, float]:
    """The numbers the page states under the charts: first and last report."""
    first, last = run.reports[0], run.last
    now = measures(last)
    return {
        "steps": last.step,
        "seconds": last.seconds,
        "loss before": first.loss,
        "loss after": last.loss,
        "accuracy after": last.accuracy,
        "best induction score": now["best induction score"],
        "best previous-token score": now["best previous-token score"],
        "first-copy loss": last.first_copy_loss,
        "second-copy loss": last.second_copy_loss,
    }


def compare_table(runs: list[Run]) -> pd.DataFrame:
    """Per run, its numbers at the first and the last report: the comparison's evidence."""
    rows = []
    for run in runs:
        first, last = measures(run.reports[0]), measures(run.last)
        rows.append(
            {
                "run": run.label,
                "steps": run.last.step,
                "loss at step 0": first["held-out loss"],
                "loss at the end": last["held-out loss"],
                "entropy at step 0 (nats)": first["entropy (nats)"],
                "entropy at the end (nats)": last["entropy (nats)"],
                "W_Q/W_K gradient at step 0": first["W_Q/W_K gradient norm"],
                "W_Q/W_K gradient at the end": last["W_Q/W_K gradient norm"],
                "softmax gradient at step 0": first["softmax gradient"],
                "softmax gradient at the end": last["softmax gradient"],
                "best induction score": last["best induction score"],
            }
        )
    return pd.DataFrame(rows)


def compare_shown(runs: list[Run]) -> pd.DataFrame:
    """:func:`compare_table` turned so that each run is a column and each number a row: two
    narrow columns fit the page, where eleven wide ones were cut off."""
    return compare_table(runs).set_index("run").T.rename_axis(index="measure", columns=None)


def first_copy_note(config: learning.TrainConfig, first_copy_loss: float) -> str:
    """Why the loss on a repeated sequence's first copy can climb far above chance."""
    chance = math.log(config.vocab_size)
    return (
        f"The first copy's tokens are fresh random draws: no model can predict them, and "
        f"spreading its bet evenly over the {config.vocab_size} tokens would score "
        f"log {config.vocab_size} = {chance:.2f}. Training counts only the positions whose "
        "answer is a repeat, so nothing teaches the model to hedge on the first copy: there "
        "it copies as confidently as on the second, and each confident copy is wrong"
        + (
            f", which is why its loss ({first_copy_loss:.2f}) is above chance."
            if first_copy_loss > chance
            else "."
        )
    )


def compare_overrides() -> str:
    """What compare mode sets itself, whatever the controls say."""
    return (
        f"Compare mode trains twice at d_model = {COMPARE_WIDTH} with {COMPARE_HEADS} heads "
        f"(d_k = {COMPARE_WIDTH // COMPARE_HEADS}), once with and once without √d_k: the "
        "heads, d_model and scaling controls are set by it."
    )


def map_layer(run: Run) -> int:
    """The layer the attention maps open on: that of the head doing the task best (an
    induction head sits above the previous-token head it needs); the last layer for a task
    with no head score."""
    score = {"induction": "induction", "previous_token": "previous_token"}.get(run.config.task)
    if score is None:
        return run.config.num_layers - 1
    return best_head(run.last, score)[0]
