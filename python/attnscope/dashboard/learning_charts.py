"""Altair charts of the Learning page: the layers × heads grid of a score, training curves and
the with/without √d_k comparison. Like :mod:`attnscope.dashboard.charts`, they take frames and
compute nothing."""

from __future__ import annotations

import altair as alt
import pandas as pd

from .charts import NATURAL_SIZE, heatmap, lines

# A grid of up to 4 heads keeps cells wide enough for its printed values; wider grids shrink
# their cells to stay inside a third of the page.
GRID_CELL_PX = 40
GRID_WIDTH_PX = 170


def score_grid(frame: pd.DataFrame, score: str, *, domain: tuple[float, float], title: str = ""):
    """Layers (rows) × heads (columns) coloured by `score`, each cell printed with its value."""
    layers, heads = frame["layer"].nunique(), frame["head"].nunique()
    cell_px = min(GRID_CELL_PX, GRID_WIDTH_PX // heads)
    base = alt.Chart(frame, title=title or score).encode(
        x=alt.X("head:O", title="head"),
        y=alt.Y("layer:O", title="layer"),
        tooltip=["layer:O", "head:O", alt.Tooltip(f"{score}:Q", format=".3f")],
    )
    cells = base.mark_rect(stroke="white").encode(
        color=alt.Color(
            f"{score}:Q",
            scale=alt.Scale(scheme="viridis", domain=list(domain)),
            legend=alt.Legend(title=None),
        )
    )
    # Dark text on the bright end of viridis, white on the dark end.
    middle = (domain[0] + domain[1]) / 2
    values = base.mark_text(fontSize=12 if cell_px >= 34 else 8).encode(
        text=alt.Text(f"{score}:Q", format=".2f"),
        color=alt.condition(f"datum['{score}'] > {middle}", alt.value("black"), alt.value("white")),
    )
    return (cells + values).properties(
        width=cell_px * heads, height=GRID_CELL_PX * layers, autosize=NATURAL_SIZE
    )


def small_map(weights, tokens, *, visible, title: str, cell_px: int):
    """An attention map without tick labels or legend, for a row of heads side by side (the
    page states the colour scale once)."""
    chart = heatmap(
        weights, tokens, visible=visible, title=title, cell_px=cell_px, show_labels=False
    )
    for layer in chart.layer:
        if layer.encoding is not alt.Undefined and layer.encoding.color is not alt.Undefined:
            layer.encoding.color.legend = None
    return chart


def training_curves(frame: pd.DataFrame, value: str, color: str, *, title: str, log_y=False):
    """`value` against training step, one line per `color` value."""
    return lines(
        frame, "step", value, color, title=title, log_x=False, log_y=log_y, x_title="Adam step"
    )
