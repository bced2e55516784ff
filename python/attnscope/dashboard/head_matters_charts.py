"""Altair charts of the view "Does this head matter?": attention against ablation effect for
every head, and a layers x heads grid of what patching each head restores. Like the other chart
modules, they take frames and compute nothing."""

from __future__ import annotations

import altair as alt
import pandas as pd

from .charts import BAR_BLUE, FIT_WIDTH, HIGHLIGHT, NATURAL_SIZE


def _pick() -> alt.Parameter:
    return alt.selection_point(name="pick", fields=["layer", "head"], on="click")


def effect_scatter(
    table: pd.DataFrame,
    effect: str,
    chosen: tuple[int, int],
    *,
    title: str,
    x_title: str,
    y_title: str,
) -> alt.LayerChart:
    """One point per head: attention (x) against the `effect` column (y), the chosen head
    highlighted, a line at no effect; a click picks a head."""
    frame = table.assign(
        chosen=(table["layer"] == chosen[0]) & (table["head"] == chosen[1]),
        name=[
            f"L{layer} H{head}" for layer, head in zip(table["layer"], table["head"], strict=True)
        ],
    )
    pick = _pick()
    points = (
        alt.Chart(frame)
        .mark_circle(size=70, opacity=0.8)
        .encode(
            x=alt.X("attention:Q", title=x_title, scale=alt.Scale(domain=[0, 1])),
            y=alt.Y(f"{effect}:Q", title=y_title),
            color=alt.condition(alt.datum.chosen, alt.value(HIGHLIGHT), alt.value(BAR_BLUE)),
            tooltip=[
                "layer:O",
                "head:O",
                alt.Tooltip("attention:Q", format=".3f"),
                alt.Tooltip("zero:Q", format="+.3f", title="zero ablation"),
                alt.Tooltip("mean:Q", format="+.3f", title="mean ablation"),
            ],
        )
        .add_params(pick)
    )
    labels = (
        alt.Chart(frame[frame["chosen"]])
        .mark_text(align="left", dx=7, dy=-7, color=HIGHLIGHT)
        .encode(x="attention:Q", y=f"{effect}:Q", text="name:N")
    )
    baseline = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="#888").encode(y="y:Q")
    return alt.layer(baseline, points, labels, title=title).properties(
        width="container", height=320, autosize=FIT_WIDTH
    )


def patching_grid(frame: pd.DataFrame, *, title: str) -> alt.Chart:
    """Layers (rows) x heads (columns) coloured by the share of the difference each head's
    patch restores (diverging around 0); a click picks a head."""
    pick = _pick()
    layers, heads = frame["layer"].nunique(), frame["head"].nunique()
    largest = max(0.05, float(frame["share"].abs().max()))
    return (
        alt.Chart(frame, title=title)
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color(
                "share:Q",
                title="share restored",
                scale=alt.Scale(scheme="redblue", domain=[-largest, largest], reverse=True),
            ),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.85)),
            tooltip=["layer:O", "head:O", alt.Tooltip("share:Q", format="+.3f")],
        )
        .add_params(pick)
        .properties(
            width=30 * heads,
            height=min(22, 700 // layers) * layers,
            autosize=NATURAL_SIZE,
        )
    )
