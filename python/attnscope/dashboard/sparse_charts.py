"""Altair charts of the sparse attention page: a mask drawn as runs of visible keys (compact
even at 256×256), its tile map, and perplexity per cache setting."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from .charts import BAR_BLUE, HIDDEN_GREY, HIGHLIGHT, NATURAL_SIZE, kind_bars

TILE_COLOURS = {"empty": "#f0f0f0", "partial": "#9ecae1", "full": "#08519c"}
SIDE_PX = 384


def visible_runs(dense: np.ndarray) -> pd.DataFrame:
    """Each row's visible keys as runs [start, stop): one rectangle per run instead of one
    per cell. Columns: query, start, stop."""
    dense = np.asarray(dense, dtype=bool)
    padded = np.zeros((dense.shape[0], dense.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = dense
    edges = np.diff(padded, axis=1)
    start_rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    # np.nonzero walks row by row, so the n-th start and the n-th stop belong to one run.
    return pd.DataFrame({"query": start_rows, "start": starts, "stop": stops})


def mask_map(dense: np.ndarray, *, title: str) -> alt.LayerChart:
    """Queries down, keys across: visible pairs in blue on a grey field of hidden ones."""
    rows, cols = np.asarray(dense).shape
    runs = visible_runs(dense).assign(query_end=lambda f: f["query"] + 1)
    x = alt.X("start:Q", scale=alt.Scale(domain=[0, cols], nice=False), title="key (looked at)")
    y = alt.Y(
        "query:Q",
        scale=alt.Scale(domain=[0, rows], nice=False, reverse=True),
        title="query (looking)",
    )
    field = (
        alt.Chart(pd.DataFrame({"start": [0], "stop": [cols], "query": [0], "query_end": [rows]}))
        .mark_rect(color=HIDDEN_GREY)
        .encode(x=x, x2="stop:Q", y=y, y2="query_end:Q")
    )
    visible = (
        alt.Chart(runs)
        .mark_rect(color=BAR_BLUE)
        .encode(
            x=x,
            x2="stop:Q",
            y=y,
            y2="query_end:Q",
            tooltip=[
                alt.Tooltip("query:Q"),
                alt.Tooltip("start:Q", title="first key seen"),
                alt.Tooltip("stop:Q", title="first key hidden after it"),
            ],
        )
    )
    return (field + visible).properties(
        title=title, width=SIDE_PX, height=SIDE_PX, autosize=NATURAL_SIZE
    )


def tile_map(tiles: np.ndarray, block: int, *, title: str) -> alt.Chart:
    """One square per tile of `block`×`block` pairs, coloured empty / partial / full."""
    names = np.array(list(TILE_COLOURS))
    tiles = np.asarray(tiles)
    rows, cols = tiles.shape
    frame = pd.DataFrame(
        {
            "query_block": np.repeat(np.arange(rows), cols),
            "key_block": np.tile(np.arange(cols), rows),
            "tile": names[tiles.ravel()],
        }
    ).assign(
        queries=lambda f: [f"{b * block}–{(b + 1) * block - 1}" for b in f["query_block"]],
        keys=lambda f: [f"{b * block}–{(b + 1) * block - 1}" for b in f["key_block"]],
    )
    return (
        alt.Chart(frame, title=title)
        .mark_rect(stroke="white", strokeWidth=1)
        .encode(
            x=alt.X("key_block:O", title=f"key tile ({block} keys)", axis=alt.Axis(labels=False)),
            y=alt.Y(
                "query_block:O", title=f"query tile ({block} queries)", axis=alt.Axis(labels=False)
            ),
            color=alt.Color(
                "tile:N",
                scale=alt.Scale(domain=list(TILE_COLOURS), range=list(TILE_COLOURS.values())),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["queries:N", "keys:N", "tile:N"],
        )
        .properties(width=SIDE_PX, height=SIDE_PX, autosize=NATURAL_SIZE)
    )


def perplexity_bars(table: pd.DataFrame, *, title: str) -> alt.Chart:
    """Perplexity per cache setting; the window alone, the one that evicts the start, in
    the highlight colour."""
    frame = table.assign(
        kind=[
            "evicts the first tokens" if s == 0 and w != "all" else "keeps the first tokens"
            for w, s in zip(table["window"], table["sinks"], strict=True)
        ]
    )
    return kind_bars(
        frame,
        "setting",
        "perplexity",
        kinds={"keeps the first tokens": BAR_BLUE, "evicts the first tokens": HIGHLIGHT},
        axis=alt.Axis(labelAngle=0, labelLimit=220),
        tooltip=[
            "setting:N",
            alt.Tooltip("perplexity:Q", format=".3f"),
            alt.Tooltip("nll:Q", format=".4f", title="nats per token"),
        ],
        title=title,
        y_title="perplexity (lower is better)",
        height=240,
    )
