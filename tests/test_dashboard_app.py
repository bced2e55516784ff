"""Every dashboard page under streamlit's AppTest: it runs, each control can be changed and the
page reruns cleanly, and the numbers it draws agree with attnscope.reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from attnscope import reference
from attnscope.dashboard import cost, engine, heads, regimes, text
from page_helpers import assert_clean
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = "python/attnscope/dashboard/pages"


def open_page(page: str | None = "heads.py") -> AppTest:
    """The app, on `page` (a file name in the pages folder; None: the page it opens on),
    after one clean run."""
    app = AppTest.from_file(APP, default_timeout=180)
    app.run()
    if page is not None:
        app.switch_page(f"{PAGES}/{page}").run()
    assert_clean(app)
    return app


def _title(spec: dict) -> str:
    """A chart's title, wherever Altair put it (on the chart or on one of its layers)."""
    title = spec.get("title") or next(
        (_title(layer) for layer in spec.get("layer", []) if _title(layer)), ""
    )
    return title.get("text", "") if isinstance(title, dict) else title


def charts(app: AppTest) -> dict[str, object]:
    """Title -> the data frame the chart draws, for every Altair chart on the page."""
    found = {}
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        data = element.proto.datasets[0].data.data
        found[_title(spec)] = dataframe_util.convert_arrow_bytes_to_pandas_df(data)
    return found


def table_with(app: AppTest, column: str):
    """The first st.dataframe on the page that has `column`."""
    return next(d.value for d in app.dataframe if column in d.value.columns)


def weights_of(frame) -> np.ndarray:
    """The (rows, cols) matrix a heatmap's data frame holds."""
    rows, cols = frame["query_index"].max() + 1, frame["key_index"].max() + 1
    grid = np.zeros((rows, cols))
    grid[frame["query_index"], frame["key_index"]] = frame["weight"]
    return grid


# --- Heads ----------------------------------------------------------------------------------


def test_heads_heatmap_is_the_reference_softmax():
    app = open_page()
    sentence = app.text_input(key="heads_sentence").value
    tokens, _ = text.tokenize(sentence)
    q, k, v = heads.head_qkv(tokens)
    _, expected = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, return_weights=True
    )
    drawn = charts(app)
    index = heads.HEAD_NAMES.index("Subject ↔ verb")
    np.testing.assert_allclose(weights_of(drawn["Subject ↔ verb"]), expected[index], atol=1e-6)
    for name in heads.HEAD_NAMES:  # the multi-head panel
        assert name in drawn
    assert app.metric[0].value == "1 cat"  # the 'sleeps' row looks at its subject


@pytest.mark.parametrize(
    ("example", "answer"),
    [
        ("Coreference", "baby"),
        ("The doctor and the nurse", "nurse"),
        ("Agreement", "king"),
        ("Rhyme", "cat"),
    ],
)
def test_heads_examples_point_at_the_right_word(example, answer):
    app = open_page()
    app.selectbox(key="heads_example").select(example).run()
    assert_clean(app)
    assert app.metric[0].value.split(" ", 1)[1] == answer


def test_heads_every_control_reruns_cleanly():
    app = open_page()
    for name in heads.HEAD_NAMES:
        app.selectbox(key="heads_head").select(name).run()
        assert_clean(app)
    app.selectbox(key="heads_row").select(0).run()
    assert_clean(app)
    app.toggle(key="heads_causal").set_value(False).run()
    assert_clean(app)
    heatmap = charts(app)[app.selectbox(key="heads_head").value]
    assert heatmap["visible"].all()  # bidirectional: nothing hidden
    app.text_input(key="heads_sentence").input("A cat sat.").run()
    assert_clean(app)
    assert len(app.selectbox(key="heads_row").options) == 4


@pytest.mark.parametrize(
    ("remembered", "sentence", "expected"),
    [
        ("2 sleeps", "a b c d e", 2),
        ("13 door", "a b c d e", 4),
        ("no position", "a b", 0),
        (11, "The cat sat", 2),
        (3, "a b c d e", 3),
    ],
)
def test_heads_row_follows_edits_of_the_sentence(remembered, sentence, expected):
    # A browser sends back the label it showed, not the position. Two edits after choosing a
    # row, that label ('2 sleeps') belongs to a sentence the widget no longer knows, and
    # Streamlit hands it to the page as a plain string. A position may also lie past the end.
    app = AppTest.from_file(APP, default_timeout=180)
    app.session_state["heads_sentence"] = sentence
    app.session_state["heads_row"] = remembered
    app.switch_page(f"{PAGES}/heads.py").run()
    assert_clean(app)
    words = text.split_words(sentence)
    assert app.selectbox(key="heads_row").value == expected
    assert app.selectbox(key="heads_row").options == [f"{i} {w}" for i, w in enumerate(words)]
    assert app.metric[0].label == f"Strongest key for '{words[expected]}'"
    app.text_input(key="heads_sentence").input("x y z").run()  # and the edit after that
    assert_clean(app)
    assert app.selectbox(key="heads_row").value == min(expected, 2)


def test_heads_bad_sentences_get_a_message():
    app = open_page()
    app.text_input(key="heads_sentence").input("").run()
    assert_clean(app)
    assert app.info and not app.get("vega_lite_chart")
    app.text_input(key="heads_sentence").input("word " * 2_000).run()
    assert_clean(app)
    assert any("2,000" in w.value for w in app.warning)
    assert app.get("vega_lite_chart")


def test_fallback_banner(monkeypatch):
    monkeypatch.setattr(engine, "compiled_available", lambda: False)
    app = open_page()
    assert any("attnscope.reference" in w.value for w in app.warning)


# --- Causal vs bidirectional ----------------------------------------------------------------


def test_regimes_numbers_and_controls():
    app = open_page("regimes.py")
    words, _ = regimes.SENTENCE.words(app.text_input(key="regimes_sentence").value)
    q, k, v = regimes.qkv(words)
    drawn = charts(app)
    for regime, causal in (("causal", True), ("bidirectional", False)):
        _, expected = reference.scaled_dot_product_attention(
            q, k, v, is_causal=causal, return_weights=True
        )
        np.testing.assert_allclose(weights_of(drawn[regime]), expected, atol=1e-6)

    app.slider(key="regimes_edit_position").set_value(5).run()
    app.text_input(key="regimes_replacement").input("teacher").run()
    assert_clean(app)
    edit = next(frame for title, frame in charts(app).items() if title.startswith("Largest"))
    causal = edit[edit["regime"] == "causal"]["change"].to_numpy()
    bidirectional = edit[edit["regime"] == "bidirectional"]["change"].to_numpy()
    assert (causal[:5] == 0).all() and (causal[5:] > 0).all()
    assert (bidirectional > 0).all()

    for key, value in (("regimes_num_queries", 4), ("regimes_window", 2)):
        app.slider(key=key).set_value(value).run()
        assert_clean(app)
    aligned = charts(app)["bottom_right"]
    assert weights_of(aligned).shape == (4, len(words))
    app.select_slider(key="regimes_kv_heads").set_value(1).run()
    assert_clean(app)
    app.text_input(key="regimes_sentence").input("Hi").run()
    assert_clean(app)
    app.text_input(key="regimes_sentence").input(" ").run()
    assert_clean(app)
    assert app.info


def test_regimes_sliders_set_no_value_twice(monkeypatch):
    # Streamlit logs a warning (once per process) for a widget given a default value while
    # session state also sets it; the page's range-following sliders must not cause it.
    from streamlit.elements.lib import policies

    warnings = []
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    monkeypatch.setattr(policies._LOGGER, "warning", lambda *args, **_: warnings.append(args))
    app = open_page("regimes.py")
    for key, value in (("regimes_edit_position", 2), ("regimes_num_queries", 5)):
        app.slider(key=key).set_value(value).run()
        assert_clean(app)
    app.text_input(key="regimes_sentence").input("One two three").run()
    assert_clean(app)
    assert app.slider(key="regimes_edit_position").value == 2
    assert app.slider(key="regimes_num_queries").value == 3  # pulled back into the range
    app.text_input(key="regimes_sentence").input("One two three four five six").run()
    assert_clean(app)
    assert warnings == []


# --- Inside one head ------------------------------------------------------------------------


def test_inside_softmax_and_saturation():
    app = open_page("inside.py")
    table = table_with(app, "engine weight")
    np.testing.assert_allclose(table["engine weight"], table["weight = exp / sum"], atol=1e-9)
    app.select_slider(key="inside_d_k").set_value(1024).run()
    app.radio(key="inside_scaling").set_value("no scaling").run()
    assert_clean(app)
    table = table_with(app, "engine weight")
    np.testing.assert_allclose(table["engine weight"], table["weight = exp / sum"], atol=1e-9)
    assert table["engine weight"].max() > 0.99  # saturated
    for metric in ("entropy (nats)", "softmax gradient", "score std", "max weight"):
        app.radio(key="inside_metric").set_value(metric).run()
        assert_clean(app)
    assert "max weight vs d_k" in charts(app)
    app.text_input(key="inside_sentence").input("one two three four five six seven eight nine")
    app.run()
    assert_clean(app)
    assert app.warning
    app.text_input(key="inside_sentence").input("").run()
    assert_clean(app)
    assert app.info


# --- Cost of context ------------------------------------------------------------------------


def test_cost_sweep_controls_and_tables():
    app = open_page("cost.py")
    assert app.get("download_button")
    app.select_slider(key="cost_longest").set_value(512)
    app.select_slider(key="cost_dim").set_value(32)
    app.slider(key="cost_threads").set_value(1)
    app.select_slider(key="cost_budget").set_value(64)
    include_torch = app.checkbox(key="cost_torch")
    if cost.torch_installed():
        assert not include_torch.disabled
        include_torch.check()
    else:
        # AppTest refuses to tick a disabled widget; check what a user without torch sees.
        assert include_torch.disabled
        assert include_torch.help == "PyTorch is not installed here."
    app.button(key="cost_run").click().run()
    assert_clean(app)
    drawn = charts(app)
    timing = next(frame for title, frame in drawn.items() if title.startswith("Time per call"))
    measured = timing[timing["kind"] == "measured"]
    assert set(measured["n"]) == {128, 256, 512}
    torch_rows = "PyTorch SDPA full" in set(measured["method"])
    assert torch_rows == cost.torch_installed()
    assert any(title.startswith("Memory") for title in drawn)

    for shape in (
        "GPT-2 small (12 layers, 12 heads of 64)",
        "Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)",
    ):
        app.selectbox(key="cost_shape").select(shape).run()
        assert_clean(app)
    kv = table_with(app, "bytes per token").set_index("storage")
    assert kv.loc["float16", "n = 8,192"] == "1.0 GiB"


def test_cost_sweep_too_large_gets_a_message():
    app = open_page("cost.py")
    app.select_slider(key="cost_longest").set_value(262_144)
    app.select_slider(key="cost_budget").set_value(64)
    app.button(key="cost_run").click().run()
    assert not app.exception
    assert any("budget" in e.value for e in app.error)
    # The page keeps working: a smaller sweep afterwards runs.
    app.select_slider(key="cost_longest").set_value(512)
    app.button(key="cost_run").click().run()
    assert_clean(app)
