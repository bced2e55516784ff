"""What the dashboard's AppTest tests read off a page: its errors and its charts' data."""

from __future__ import annotations

import json

from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest


def assert_clean(app: AppTest) -> None:
    """No exception and no error message on the page."""
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def chart_data(app: AppTest, *, largest: bool = False) -> dict[str, object]:
    """Chart title -> the data frame it draws, for every Altair chart on the page: its first
    data set, or with `largest` the one with the most rows (a chart layered over several)."""
    found = {}
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        title = spec.get("title") or next(
            (layer["title"] for layer in spec.get("layer", []) if layer.get("title")), ""
        )
        title = title.get("text", "") if isinstance(title, dict) else title
        frames = [
            dataframe_util.convert_arrow_bytes_to_pandas_df(dataset.data.data)
            for dataset in element.proto.datasets
        ]
        found[title] = max(frames, key=len) if largest else frames[0]
    return found
