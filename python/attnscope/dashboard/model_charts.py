"""Altair charts of the Real model page: the grid of every head, heatmaps whose axes may be
blocks of tokens, and a decoding replay. Like :mod:`attnscope.dashboard.charts`, they take
arrays and frames and compute no attention; :func:`block_map` sums a long text's map into
blocks of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

from . import real_model as rm
from .charts import BAR_BLUE, HIGHLIGHT, NATURAL_SIZE, kind_bars, lines, weight_cells


def head_grid(table: pd.DataFrame, statistic: str) -> alt.Chart:
    """Layers (rows) x heads (columns), coloured by `statistic`; a click picks a head."""
    pick = alt.selection_point(name="pick", fields=["layer", "head"], on="click")
    return (
        alt.Chart(table, title=f"Every head, coloured by {statistic}")
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color(f"{statistic}:Q", scale=alt.Scale(scheme="viridis")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.85)),
            tooltip=["layer:O", "head:O", "label:N", alt.Tooltip(f"{statistic}:Q", format=".3f")],
        )
        .add_params(pick)
        .properties(
            width=34 * table["head"].nunique(),
            height=min(30, 900 // table["layer"].nunique()) * table["layer"].nunique(),
            autosize=NATURAL_SIZE,
        )
    )


# Longest drawn label, in pixels: a longer token ends in an ellipsis (the tooltip has it all).
LABEL_LIMIT_PX = 90
# Labels are drawn on cells at least this many pixels tall, in a font that fits the cell.
MIN_LABELLED_CELL_PX = 9


def token_axis(cell_px: int, angle: int) -> alt.Axis | None:
    """An axis of token labels that stays readable: a font no taller than a cell (columns'
    labels turned upright), long tokens cut short, and any label that would still touch its
    neighbour left out; no labels at all on cells too small to read."""
    if cell_px < MIN_LABELLED_CELL_PX:
        return alt.Axis(labels=False, ticks=False)
    return alt.Axis(
        labelAngle=angle,
        labelFontSize=min(11, cell_px - 1),
        labelLimit=LABEL_LIMIT_PX,
        labelOverlap="greedy",
    )


def labelled_heatmap(
    weights: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    visible: np.ndarray,
    title: str = "",
    cell_px: int = 12,
    row_title: str = "query (looking)",
    col_title: str = "key (looked at)",
) -> alt.LayerChart:
    """Rows x columns coloured by weight, hidden cells grey; the labels are drawn as given
    (single tokens or blocks of them), so the same chart serves short and long texts, and
    only where a cell of `cell_px` is large enough to read them (see token_axis)."""
    weights = np.asarray(weights, dtype=float)
    rows, cols = weights.shape
    frame = pd.DataFrame(
        {
            "query": np.repeat(list(row_labels), cols),
            "key": np.tile(list(col_labels), rows),
            "query_index": np.repeat(np.arange(rows), cols),
            "key_index": np.tile(np.arange(cols), rows),
            "weight": weights.ravel(),
            "visible": np.asarray(visible, dtype=bool).ravel(),
        }
    )
    base = alt.Chart(frame, title=title).encode(
        x=alt.X("key:N", sort=list(col_labels), title=col_title, axis=token_axis(cell_px, -90)),
        y=alt.Y("query:N", sort=list(row_labels), title=row_title, axis=token_axis(cell_px, 0)),
        tooltip=[
            alt.Tooltip("query:N", title=row_title.split(" (")[0]),
            alt.Tooltip("key:N", title=col_title.split(" (")[0]),
            alt.Tooltip("weight:Q", format=".4f"),
        ],
    )
    return weight_cells(base, rows, cols, cell_px)


def key_bars(
    row: np.ndarray,
    labels: Sequence[str],
    *,
    title: str = "",
    groups: Sequence[str] | None = None,
    show_labels: bool = True,
) -> alt.Chart:
    """One query's weight on every key, however many: the strongest key is highlighted and
    `groups` (e.g. prompt / generated) colour the others."""
    row = np.asarray(row, dtype=float)
    groups = ["other keys"] * len(row) if groups is None else list(groups)
    strongest = int(row.argmax())
    palette = [HIGHLIGHT, BAR_BLUE, "#72b7b2", "#b279a2"]
    kinds = {kind: palette[i % 4] for i, kind in enumerate(["strongest", *dict.fromkeys(groups)])}
    frame = pd.DataFrame({"position": np.arange(len(row)), "key": list(labels), "weight": row})
    frame["kind"] = ["strongest" if j == strongest else group for j, group in enumerate(groups)]
    return kind_bars(
        frame,
        "key",
        "weight",
        kinds=kinds,
        axis=alt.Axis(labelAngle=-60, labels=show_labels, ticks=show_labels),
        tooltip=["key:N", alt.Tooltip("weight:Q", format=".4f"), "kind:N"],
        title=title,
    )


def step_lines(frame: pd.DataFrame, y: str, *, title: str, y_title: str, log_y: bool = False):
    """One value per decoding step (time, cache bytes) as a line over the step number."""
    return lines(
        frame.assign(series=y_title),
        "step",
        y,
        "series",
        title=title,
        log_x=False,
        log_y=log_y,
        x_title="step (0 = reading the prompt)",
        y_title=y_title,
    )


def cache_lines(comparison: pd.DataFrame) -> alt.Chart:
    """Each step's time with the cache and without it, over the length of the sequence."""
    long = comparison.melt(
        id_vars=["tokens fed without"],
        value_vars=["ms with the cache", "ms without"],
        var_name="run",
        value_name="ms",
    )
    long["run"] = long["run"].map(
        {"ms with the cache": "with the cache", "ms without": "without: everything again"}
    )
    return lines(
        long,
        "tokens fed without",
        "ms",
        "run",
        title="Time per step, both ways",
        log_x=False,
        log_y=True,
        x_title="tokens in the sequence",
        y_title="ms",
    )


def ratio_line(comparison: pd.DataFrame) -> alt.Chart:
    """How many times longer each decoding step took without the cache, over the length."""
    decoding = comparison.iloc[1:].assign(series="without ÷ with")
    return lines(
        decoding,
        "tokens fed without",
        "times longer without",
        "series",
        title="How many times longer without the cache",
        log_x=False,
        x_title="tokens in the sequence",
        y_title="times longer",
    )


def block_map(weights, visible, row_tokens, col_tokens, *, title: str, **options):
    """A heatmap of every cell, or of blocks of tokens when the matrix is too big to draw:
    ``(chart, exact)``, `exact` False for blocks."""
    blocks = rm.block_sum(weights, visible)
    largest = max(blocks.weights.shape)
    chart = labelled_heatmap(
        blocks.weights,
        rm.block_labels(row_tokens, blocks.row_starts, blocks.row_size),
        rm.block_labels(col_tokens, blocks.col_starts, blocks.col_size),
        visible=blocks.visible,
        title=title if blocks.exact else f"{title} (blocks of {block_size(blocks)} tokens)",
        cell_px=max(6, min(24, options.pop("width_px", 480) // largest)),
        **options,
    )
    return chart, blocks.exact


def block_size(blocks: rm.Blocks) -> str:
    if blocks.row_size == blocks.col_size:
        return str(blocks.row_size)
    return f"{blocks.row_size}×{blocks.col_size}"
