"""The pages that tell the chapter, under streamlit's AppTest: the cost page's fits and
estimates follow from its own measurements, pages open in the state their URL names, and the
path through the chapter links every step to a page."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
import pytest
from attnscope.dashboard import cost, engine, heads, kv_cost, story, text, ui
from attnscope.dashboard import learning as learning_lab
from streamlit.testing.v1 import AppTest
from test_dashboard_app import APP, PAGES, _title, assert_clean, charts


def open_with_url(page: str | None, **params: str) -> AppTest:
    """The app opened on `page` with `params` in its URL's query string, after one run."""
    app = AppTest.from_file(APP, default_timeout=180)
    for name, value in params.items():
        app.query_params[name] = value
    if page is None:
        app.run()
    else:
        app.switch_page(f"{PAGES}/{page}").run()
    assert_clean(app)
    return app


def bound_keys(app: AppTest) -> set[str]:
    """Keys of the widgets on the page that write their value into the URL."""
    found = set()
    for kind in (
        "select_slider",
        "slider",
        "selectbox",
        "radio",
        "checkbox",
        "toggle",
        "text_input",
        "number_input",
    ):
        for widget in app.get(kind):
            if getattr(widget.proto, "query_param_key", ""):
                found.add(widget.proto.query_param_key)
    return found


# --- Cost of context ------------------------------------------------------------------------


def test_cost_page_estimates_follow_its_own_measurements():
    app = open_with_url("cost.py", cost_longest="1024", cost_seconds="2", cost_dim="32")
    assert app.select_slider(key="cost_longest").value == 1024
    assert app.select_slider(key="cost_dim").value == 32
    timing = next(f for t, f in charts(app).items() if t.startswith("Time per call"))
    measured = timing[timing["kind"] == "measured"]
    assert set(measured["n"]) == {128, 256, 512, 1024}
    growth = next(d.value for d in app.dataframe if "time when n doubles" in d.value.columns)
    growth = growth.set_index("method")
    assert list(growth.loc[growth.index[0], ["expected"]]) == ["×4.0"]
    estimated = timing[timing["kind"] == "estimated"]
    for method, rows in measured.groupby("method"):
        kind = cost.mask_kind(method)
        top = rows.nlargest(cost.FIT_POINTS, "n")  # the least disturbed of the longest points
        per_pair = min(
            t / cost.visible_pairs(int(n), kind)
            for n, t in zip(top["n"], top["seconds"], strict=True)
        )
        at_200k = estimated[(estimated["method"] == method) & (estimated["n"] == 200_000)]
        np.testing.assert_allclose(
            at_200k["seconds"], per_pair * cost.visible_pairs(200_000, kind), rtol=1e-9
        )
        verdict = growth.loc[method, "fit"]
        check = cost.growth_table(
            measured.assign(status="measured")[["n", "method", "seconds", "status"]]
        ).set_index("method")
        assert check.loc[method, "within"] == (verdict == "as expected")
        if verdict != "as expected":
            assert any(method in w.value for w in app.warning)
    assert {"cost_longest", "cost_seconds", "cost_dim", "cost_threads", "cost_budget"} <= (
        bound_keys(app)
    )


def test_cost_page_ignores_a_url_value_it_does_not_offer():
    app = open_with_url("cost.py", cost_longest="1000", cost_seconds="2")
    assert app.select_slider(key="cost_longest").value == 16_384  # the default, not 1000


@pytest.mark.parametrize("speed_ups", [(0.96, 1.03, 0.99), (1.9, 1.8, 3.0)])
def test_cost_decode_caption_says_what_its_numbers_show(monkeypatch, speed_ups):
    def fake_times(shape, n, **_):
        frame = cost.pd.DataFrame(
            {
                "storage": kv_cost.STORAGES,
                "cache bytes": [4, 2, 2, 1],
                "seconds": [1e-3 / s for s in (1.0, *speed_ups)],
                "GB/s read": 1.0,
            }
        )
        frame["speed-up vs float32"] = frame["seconds"].iloc[0] / frame["seconds"]
        frame["step"] = [text.human_seconds(t) for t in frame["seconds"]]
        frame["cache"] = [text.human_bytes(b) for b in frame["cache bytes"]]
        return frame

    monkeypatch.setattr(kv_cost, "decode_step_times", fake_times)
    app = open_with_url("cost.py", cost_longest="512", cost_seconds="2")
    app.button(key="cost_decode_run").click().run()
    assert_clean(app)
    caption = next(c.value for c in app.caption if "One layer, one new token" in c.value)
    low, high = min(speed_ups), max(speed_ups)
    assert f"{low:.2f}–{high:.2f}×" in caption
    assert "does not show the cache's own gain" in caption
    assert ("not time" in caption) == (high < kv_cost.SAME_SPEED[1])


# --- Inside one head: the FlashAttention stepper --------------------------------------------


def test_inside_flash_stepper_walks_to_the_engine_row():
    app = open_with_url("inside.py", inside_flash_block="2")
    words = app.text_input(key="inside_sentence").value.split()
    assert app.select_slider(key="inside_flash_block").value == 2
    assert app.selectbox(key="inside_flash_row").value == len(words) - 1
    walked = app.slider(key="inside_flash_walked")
    assert walked.value == 1 and walked.max == -(-len(words) // 2)
    table = next(d.value for d in app.dataframe if "running sum l" in d.value.columns)
    assert len(table) == 1
    walked.set_value(walked.max).run()
    assert_clean(app)
    table = next(d.value for d in app.dataframe if "running sum l" in d.value.columns)
    assert len(table) == walked.max
    assert app.success and "within" in app.success[0].value
    rows = next(
        d.value
        for d in app.dataframe
        if "engine weight" in d.value.columns
        and "key" in d.value.columns
        and len(d.value.columns) == 3
    )
    np.testing.assert_allclose(
        rows["blockwise weight exp(score − m − log l)"], rows["engine weight"], atol=1e-6
    )
    # An earlier row: the blocks after it are hidden by the causal mask, and skipped.
    app.selectbox(key="inside_flash_row").select(0).run()
    assert_clean(app)
    app.slider(key="inside_flash_walked").set_value(app.slider(key="inside_flash_walked").max)
    app.run()
    table = next(d.value for d in app.dataframe if "running sum l" in d.value.columns)
    assert list(table["block max"])[1:] == ["skipped"] * (len(table) - 1)
    assert app.success


# --- Start here and the glossary ------------------------------------------------------------


def test_start_here_is_the_first_page_and_links_every_step():
    app = open_with_url(None)
    assert app.title[0].value.startswith("Start here")
    headings = [h.value for h in app.subheader]
    assert len(headings) == 8 and headings[0].startswith("1 ·") and "KV cache" in headings[-1]
    links = app.get("page_link")
    pages = {link.proto.page for link in links}
    assert len(links) >= 8
    assert pages == {"heads", "inside", "learning", "regimes", "cost", "sparse", "real_model"}
    for page in pages:
        assert (Path(APP).parent / PAGES / f"{page}.py").exists(), page
    # The live results agree with what the pages they link to compute.
    tokens, _ = text.tokenize(story.PRONOUN_SENTENCE)
    weights = heads.head_weights(tokens)[heads.HEAD_NAMES.index("Coreference")]
    words = [t.text for t in tokens]
    drawn = charts(app)["Where 'she' looks"]
    np.testing.assert_allclose(drawn["weight"], weights[words.index("she")], atol=1e-12)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["causal rows moved"] == "0"
    if engine.compiled_available():
        assert float(metrics["8 tokens through the cache vs recomputed"]) < 1e-5


def test_every_start_link_opens_its_page_in_the_state_it_names():
    app = open_with_url(None)
    stateful = [link.proto for link in app.get("page_link") if link.proto.query_string]
    assert len(stateful) >= 3
    for link in stateful:
        params = dict(pair.split("=") for pair in link.query_string.split("&"))
        params = {name: unquote_plus(value) for name, value in params.items()}
        opened = open_with_url(f"{link.page}.py", **params)
        for name, value in params.items():
            assert str(widget_value(opened, name)) == value, (link.label, name)


@pytest.mark.parametrize("page", [None, "heads.py", "cost.py", "learning.py"])
def test_the_glossary_is_in_every_page_sidebar(page):
    app = open_with_url(page, cost_longest="512", cost_seconds="2")
    glossary = [e for e in app.sidebar.children.values() if getattr(e, "label", "") == "Glossary"]
    assert len(glossary) == 1
    shown = " ".join(m.value for m in glossary[0].markdown)
    for term in (
        "top_left / bottom_right",
        "grouped-query",
        "perplexity",
        "nats",
        "sink",
        "softcap",
        "ALiBi",
        "KV cache",
    ):
        assert term in shown, term


# --- Learning: what the page opens on and what compare mode sets ---------------------------

LEARNING = Path(APP).parent / PAGES / "learning.py"


@pytest.fixture(scope="module")
def induction_run():
    config = learning_lab.make_config("induction", 2, 4, 32, 50, "÷ √d_k", 0)
    *_, run = learning_lab.bounded_run("this model", config)
    return run


def test_learning_maps_open_on_the_best_heads_layer(induction_run):
    # Make layer 1 head 3 the best induction head, as training usually does.
    induction = np.zeros_like(induction_run.last.induction)
    induction[1, 3] = 0.9
    last = dataclasses.replace(induction_run.last, induction=induction)
    run = dataclasses.replace(induction_run, reports=(*induction_run.reports[:-1], last))
    app = AppTest.from_file(str(LEARNING), default_timeout=120)
    app.session_state["learning_runs"] = [run]
    app.run()
    assert_clean(app)
    assert app.selectbox(key="learning_map_layer").value == 1
    assert any("end: layer 1 head 3" in title for title in charts(app))
    note = next(c.value for c in app.caption if "fresh random draws" in c.value)
    assert f"log {run.config.vocab_size} = {np.log(run.config.vocab_size):.2f}" in note
    best = next(m for m in app.metric if m.label == "Best induction score")
    assert best.proto.direction == best.proto.NONE  # a note, not a change: no arrow


def test_learning_compare_mode_greys_out_what_it_sets(induction_run):
    app = AppTest.from_file(str(LEARNING), default_timeout=120)
    app.query_params["learning_mode"] = "Compare with and without √d_k"
    app.session_state["learning_runs"] = [
        dataclasses.replace(induction_run, label=label) for label in ("scaled", "unscaled")
    ]
    app.run()
    assert_clean(app)
    assert app.radio(key="learning_mode").value.startswith("Compare")
    for widget in (
        app.select_slider(key="learning_heads"),
        app.select_slider(key="learning_width"),
        app.radio(key="learning_scaling"),
    ):
        assert widget.disabled
    assert f"d_model = {learning_lab.COMPARE_WIDTH}" in app.info[0].value
    table = app.dataframe[0].value
    assert list(table.columns) == ["scaled", "unscaled"]  # two columns: nothing cut off
    app.radio(key="learning_mode").set_value("Train one model").run()
    assert not app.select_slider(key="learning_width").disabled
    assert {"learning_task", "learning_steps", "learning_mode", "learning_width"} <= bound_keys(app)


# --- Rough edges: sizes, numbers and labels that a reader saw go wrong ----------------------


def chart_widths(app: AppTest) -> dict[str, int]:
    """Title -> the drawn width of the cells of every Altair chart on the page."""
    widths = {}
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        width = spec.get("width") or next(
            (layer.get("width") for layer in spec.get("layer", []) if layer.get("width")), None
        )
        widths[_title(spec)] = width
    return widths


def test_inside_matrices_fit_their_columns_and_numbers_read_well():
    app = open_with_url("inside.py", inside_d_k="1024", inside_scaling="no scaling")
    widths = chart_widths(app)
    room = ui.MAIN_COLUMN_PX
    for title, share in (("W_Q", 1 / 4), ("W_V", 1 / 4), ("Q = x·W_Q", 1 / 3)):
        assert widths[title] + inside_page_chrome() <= room * share, title
    table = next(d for d in app.dataframe if "engine weight" in d.value.columns)
    formats = json.loads(table.proto.columns)
    for column in ("weight = exp / sum", "engine weight", "exp(score − max)"):
        assert formats[column]["type_config"]["format"] == "%.4g"
    gradient = next(m for m in app.metric if m.label == "softmax gradient")
    assert gradient.proto.direction == gradient.proto.NONE  # no arrow on a smaller value
    assert "e-" in gradient.value or float(gradient.value.split()[0]) > 0  # never '0.000'


def inside_page_chrome() -> int:
    """The page's MATRIX_CHROME_PX (a page is a script, so its constant is read from it)."""
    source = (Path(APP).parent / PAGES / "inside.py").read_text()
    return int(source.split("MATRIX_CHROME_PX = ")[1].split()[0])


def test_heads_long_sentence_fits_and_the_row_follows_edits():
    sentence = " ".join(["The boy read the book because she was bored and"] * 2) + " slept"
    words = text.split_words(sentence)
    assert len(words) == 21
    app = open_with_url("heads.py", heads_sentence=sentence, heads_head="Coreference")
    assert app.text_input(key="heads_sentence").value == sentence
    widths = chart_widths(app)
    assert widths["Coreference"] + ui.HEATMAP_CHROME_PX <= ui.MAIN_COLUMN_PX * 3 / 5
    assert widths["Previous token"] + 90 <= ui.MAIN_COLUMN_PX / 3  # the side-by-side panels
    # The toy head's word lists know no feminine noun here: the page says so.
    assert any("'book'" in w.value and "guess by distance" in w.value for w in app.warning)
    app.selectbox(key="heads_row").select(6).run()  # '6 she'
    app.text_input(key="heads_sentence").input("The king thanked the queen because he was proud.")
    app.run()
    assert_clean(app)
    chooser = app.selectbox(key="heads_row")
    assert chooser.proto.set_value  # the browser is sent the new sentence's label
    assert chooser.value == 6
    assert chooser.options[6] == "6 he" and "Where 'he' looks" in charts(app)
    assert not any("guess by distance" in w.value for w in app.warning)  # 'king' is known
    assert {"heads_sentence", "heads_head", "heads_causal"} <= bound_keys(app)


def test_heads_explanation_is_built_only_when_opened():
    app = open_with_url("heads.py", heads_head="Rhyme")
    assert not any(title.startswith("Scaled scores") for title in charts(app))
    app.session_state["heads_how"] = True  # the reader opens the expander
    app.run()
    assert_clean(app)
    drawn = charts(app)
    scores = next(frame for title, frame in drawn.items() if title.startswith("Scaled scores"))
    tokens, _ = text.tokenize(app.text_input(key="heads_sentence").value)
    expected = heads.masked_scores(tokens, heads.HEAD_NAMES.index("Rhyme"), True)
    np.testing.assert_allclose(scores["value"], expected.ravel(), atol=1e-9)


# --- Shareable views: every main control round-trips through the URL ------------------------

LLAMA = "Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)"
# Per page: URL parameter -> (the value written in the address, the widget's value it opens).
URL_STATES = {
    "heads.py": {
        "heads_sentence": ("The king thanked the queen because he was proud.",) * 2,
        "heads_head": ("Delimiters", "Delimiters"),
        "heads_causal": ("false", False),
    },
    "inside.py": {
        "inside_sentence": ("a b c d", "a b c d"),
        "inside_d_k": ("64", 64),
        "inside_scaling": ("no scaling", "no scaling"),
        "inside_metric": ("entropy (nats)", "entropy (nats)"),
        "inside_flash_block": ("3", 3),
    },
    "cost.py": {
        "cost_longest": ("512", 512),
        "cost_seconds": ("2", 2),
        "cost_dim": ("32", 32),
        "cost_threads": ("1", 1),
        "cost_budget": ("64", 64),
        "cost_shape": (LLAMA, LLAMA),
        "cost_decode_n": ("1024", 1024),
    },
    "learning.py": {
        "learning_task": ("Copy the previous token", "previous_token"),  # the label shown
        "learning_layers": ("1", 1),
        "learning_heads": ("2", 2),
        "learning_width": ("128", 128),
        "learning_steps": ("150", 150),
        "learning_scaling": ("no scaling (× 1)", "no scaling (× 1)"),
        "learning_seed": ("7", 7),
        "learning_mode": ("Train one model", "Train one model"),
    },
}


def widget_value(app: AppTest, key: str):
    for kind in (
        "select_slider",
        "slider",
        "selectbox",
        "radio",
        "toggle",
        "text_input",
        "number_input",
        "checkbox",
    ):
        for widget in app.get(kind):
            if widget.key == key:
                return widget.value
    raise KeyError(key)


@pytest.mark.parametrize("page", list(URL_STATES))
def test_a_page_opens_in_the_state_its_url_names_and_writes_it_back(page):
    states = URL_STATES[page]
    app = open_with_url(page, **{name: written for name, (written, _) in states.items()})
    for name, (_, expected) in states.items():
        assert widget_value(app, name) == expected, name
    # Each of those widgets is bound: the browser writes its value back into the address.
    assert set(states) <= bound_keys(app)
