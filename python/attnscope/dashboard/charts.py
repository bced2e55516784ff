"""Small Altair chart builders shared by every page: they take arrays, never compute attention."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

HIDDEN_GREY = "#d4d4d4"
HIGHLIGHT = "#e4572e"
BAR_BLUE = "#4c78a8"
CELL_PX = 24
# Heatmaps keep their natural size (square cells plus axes); Streamlit's default "fit" would
# squeeze the cells to make room for long token labels.
NATURAL_SIZE = alt.AutoSizeParams(type="pad")
# Bars and lines stretch across their column and keep the height they ask for.
FIT_WIDTH = alt.AutoSizeParams(type="fit-x", contains="padding")


def token_labels(tokens: Sequence[str], first: int = 0) -> list[str]:
    """Axis labels that stay unique when a word repeats: '3 the', '7 the' (positions count
    from `first`)."""
    return [f"{i} {token}" for i, token in enumerate(tokens, start=first)]


def weights_frame(
    weights: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    visible: np.ndarray | None = None,
    query_first: int = 0,
) -> pd.DataFrame:
    """One row per (query, key) cell: labels, weight, and whether the mask hides it.
    Query labels count positions from `query_first` (e.g. the new tokens of a KV cache)."""
    weights = np.asarray(weights, dtype=float)
    key_tokens = query_tokens if key_tokens is None else key_tokens
    rows, cols = weights.shape
    if visible is None:
        visible = np.ones_like(weights, dtype=bool)
    query_labels = token_labels(query_tokens, query_first)
    key_labels = token_labels(key_tokens)
    return pd.DataFrame(
        {
            "query": np.repeat(query_labels, cols),
            "key": np.tile(key_labels, rows),
            "query_index": np.repeat(np.arange(rows), cols),
            "key_index": np.tile(np.arange(cols), rows),
            "weight": weights.ravel(),
            "visible": np.asarray(visible, dtype=bool).ravel(),
        }
    )


def heatmap(
    weights: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    *,
    visible: np.ndarray | None = None,
    title: str = "",
    cell_px: int = CELL_PX,
    show_labels: bool = True,
    query_first: int = 0,
) -> alt.LayerChart:
    """Query rows × key columns coloured by weight; cells the mask hides are drawn grey."""
    key_tokens = query_tokens if key_tokens is None else key_tokens
    frame = weights_frame(weights, query_tokens, key_tokens, visible, query_first)
    rows, cols = np.asarray(weights).shape
    axis = alt.Axis(labelLimit=90, labels=show_labels, ticks=show_labels)
    base = alt.Chart(frame, title=title).encode(
        x=alt.X("key:N", sort=token_labels(key_tokens), title="key (looked at)", axis=axis),
        y=alt.Y(
            "query:N",
            sort=token_labels(query_tokens, query_first),
            title="query (looking)",
            axis=axis,
        ),
        tooltip=[
            alt.Tooltip("query:N"),
            alt.Tooltip("key:N"),
            alt.Tooltip("weight:Q", format=".4f"),
            alt.Tooltip("visible:N", title="visible"),
        ],
    )
    return weight_cells(base, rows, cols, cell_px)


def weight_cells(base: alt.Chart, rows: int, cols: int, cell_px: int) -> alt.LayerChart:
    """The cells of a weights grid: visible ones coloured by weight, hidden ones grey."""
    shown = (
        base.transform_filter("datum.visible")
        .mark_rect()
        .encode(
            color=alt.Color(
                "weight:Q",
                scale=alt.Scale(scheme="blues", domain=[0, 1]),
                legend=alt.Legend(title="weight"),
            )
        )
    )
    hidden = base.transform_filter("!datum.visible").mark_rect(color=HIDDEN_GREY)
    return (hidden + shown).properties(
        width=cell_px * cols, height=cell_px * rows, autosize=NATURAL_SIZE
    )


def row_bars(
    row: np.ndarray,
    key_tokens: Sequence[str],
    *,
    visible: np.ndarray | None = None,
    title: str = "",
) -> alt.Chart:
    """Where one query looks: a bar per key, the strongest one highlighted, hidden keys grey."""
    row = np.asarray(row, dtype=float)
    visible = np.ones_like(row, dtype=bool) if visible is None else np.asarray(visible)
    strongest = int(row.argmax())
    frame = pd.DataFrame(
        {
            "key": token_labels(key_tokens),
            "weight": row,
            "kind": [
                "strongest" if j == strongest else ("visible" if visible[j] else "hidden by mask")
                for j in range(len(row))
            ],
        }
    )
    return kind_bars(
        frame,
        "key",
        "weight",
        kinds={"strongest": HIGHLIGHT, "visible": BAR_BLUE, "hidden by mask": HIDDEN_GREY},
        axis=alt.Axis(labelAngle=-45, labelOverlap=False),
        y_domain=(0, 1),
        tooltip=["key:N", alt.Tooltip("weight:Q", format=".4f"), "kind:N"],
        title=title,
    )


def kind_bars(
    frame: pd.DataFrame,
    category: str,
    value: str,
    *,
    kinds: dict[str, str],
    axis: alt.Axis,
    tooltip: list,
    title: str = "",
    y_title: str | None = None,
    y_domain: tuple[float, float] | None = None,
    height: int = 220,
) -> alt.Chart:
    """A bar of `value` per `category`, in the frame's order across the column, coloured by
    the frame's ``kind`` column (`kinds`: each kind's colour, in the legend's order)."""
    scale = alt.Undefined if y_domain is None else alt.Scale(domain=list(y_domain))
    return (
        alt.Chart(frame, title=title)
        .mark_bar()
        .encode(
            x=alt.X(f"{category}:N", sort=list(frame[category]), title=None, axis=axis),
            y=alt.Y(f"{value}:Q", scale=scale, title=y_title or value),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=list(kinds), range=list(kinds.values())),
                legend=alt.Legend(title=None, orient="top"),
            ),
            tooltip=tooltip,
        )
        .properties(width="container", height=height, autosize=FIT_WIDTH)
    )


def matrix(
    values: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    cell_px: int = 18,
    diverging: bool = True,
) -> alt.Chart:
    """Any small matrix (an embedding, a W, the scores) as a heatmap with values on hover."""
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    frame = pd.DataFrame(
        {
            "row": np.repeat(list(row_labels), cols),
            "column": np.tile(list(col_labels), rows),
            "value": values.ravel(),
        }
    )
    limit = float(np.abs(values).max()) or 1.0
    scale = (
        # Red for positive, blue for negative, and the legend reads from +limit at the top.
        alt.Scale(scheme="redblue", domain=[-limit, limit], reverse=True)
        if diverging
        else alt.Scale(scheme="blues", domain=[0, limit])
    )
    return (
        alt.Chart(frame, title=title)
        .mark_rect()
        .encode(
            x=alt.X("column:N", sort=list(col_labels), title=None, axis=alt.Axis(labelLimit=80)),
            y=alt.Y("row:N", sort=list(row_labels), title=None, axis=alt.Axis(labelLimit=120)),
            color=alt.Color("value:Q", scale=scale, legend=alt.Legend(title=None)),
            tooltip=["row:N", "column:N", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(width=min(cell_px * cols, 640), height=cell_px * rows, autosize=NATURAL_SIZE)
    )


def lines(
    frame: pd.DataFrame,
    x: str,
    y: str,
    color: str,
    *,
    title: str = "",
    log_x: bool = True,
    log_y: bool = False,
    x_title: str | None = None,
    y_title: str | None = None,
    y_format: str = ".3g",
    marker_x: float | None = None,
    dashed: str | None = None,
) -> alt.Chart | alt.LayerChart:
    """Lines with points, one per `color` value; optional log axes, a vertical marker, and a
    boolean column `dashed` that draws some rows (e.g. extrapolations) dashed."""
    x_scale = alt.Scale(type="log") if log_x else alt.Scale(zero=False)
    y_scale = alt.Scale(type="log") if log_y else alt.Scale()
    encoding = {
        "x": alt.X(f"{x}:Q", scale=x_scale, title=x_title or x),
        "y": alt.Y(f"{y}:Q", scale=y_scale, title=y_title or y),
        "color": alt.Color(
            f"{color}:N",
            scale=alt.Scale(scheme="tableau10"),
            legend=alt.Legend(title=None, orient="bottom"),
        ),
        "tooltip": [
            alt.Tooltip(f"{color}:N"),
            alt.Tooltip(f"{x}:Q", format=",.4g"),
            alt.Tooltip(f"{y}:Q", format=y_format),
        ],
    }
    if dashed is not None:
        # The first value of the column is drawn solid, the others dashed.
        values = list(dict.fromkeys(frame[dashed]))
        encoding["strokeDash"] = alt.StrokeDash(
            f"{dashed}:N",
            scale=alt.Scale(domain=values, range=[[1, 0]] + [[6, 4]] * (len(values) - 1)),
            legend=None,
        )
    chart = alt.Chart(frame, title=title).mark_line(point=True).encode(**encoding)
    if marker_x is not None:
        rule = alt.Chart(pd.DataFrame({x: [marker_x]})).mark_rule(color="grey").encode(x=f"{x}:Q")
        chart = chart + rule
    return chart.properties(width="container", height=260, autosize=FIT_WIDTH)


def time_lines(frame: pd.DataFrame, *, title: str) -> alt.Chart | alt.LayerChart:
    """Seconds per call against the context length, one line per method, both axes log; rows
    of the frame's first ``kind`` (the measured ones) solid, of later kinds (estimates,
    extrapolations) dashed."""
    return lines(
        frame,
        "n",
        "seconds",
        "method",
        log_y=True,
        title=title,
        x_title="context length n (log)",
        y_title="seconds (log)",
        dashed="kind",
    )


def grouped_bars(
    frame: pd.DataFrame, x: str, y: str, color: str, *, title: str = "", y_title: str = ""
) -> alt.Chart:
    """Bars of `y` per `x`, side by side per `color` (e.g. how much each row changed)."""
    return (
        alt.Chart(frame, title=title)
        .mark_bar()
        .encode(
            x=alt.X(f"{x}:N", sort=list(dict.fromkeys(frame[x])), title=None),
            xOffset=alt.XOffset(f"{color}:N"),
            y=alt.Y(f"{y}:Q", title=y_title or y),
            color=alt.Color(f"{color}:N", legend=alt.Legend(title=None, orient="top")),
            tooltip=[f"{x}:N", f"{color}:N", alt.Tooltip(f"{y}:Q", format=".3g")],
        )
        .properties(width="container", height=220, autosize=FIT_WIDTH)
    )
