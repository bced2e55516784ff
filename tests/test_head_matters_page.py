"""The Real model page's view "Does this head matter?" under streamlit's AppTest, and the plain
functions behind it: the page runs without an error, and every number it shows (the scatter of
attention against ablation effect, the patching grid, one head's metrics and next-token bars)
is what attnscope.models computes for the same sentence, asked directly."""

from __future__ import annotations

from pathlib import Path

import attnscope.models as am
import numpy as np
import pytest
from attnscope.dashboard import head_matters as hm
from conftest import needs_smollm2
from page_helpers import assert_clean, chart_data
from streamlit.testing.v1 import AppTest

PAGE = Path(__file__).resolve().parent.parent / "python/attnscope/dashboard/pages/real_model.py"
VIEW = "Does this head matter?"


def metric(app: AppTest, starts: str):
    return next(m for m in app.metric if m.label.startswith(starts))


@pytest.fixture(scope="module")
def view(smollm2) -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=600)
    app.run()
    app.radio(key="real_model_view").set_value(VIEW).run()
    assert_clean(app)
    return app


# --- the plain functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "swapped"),
    [
        ("because she was tired", "because he was tired"),
        ("He said she left. SHE did.", "She said he left. HE did."),
        ("the shepherd and the shell", None),
    ],
)
def test_swap_pronoun(text, swapped):
    assert hm.swap_pronoun(text) == swapped


# --- the page ----------------------------------------------------------------------------------


@needs_smollm2
def test_view_shows_the_apis_effects_for_every_head(view, smollm2):
    ids = smollm2.tokenize(hm.SENTENCE)[1]
    trace = smollm2.encode(ids=ids)
    tokens = [token.strip("Ġ") for token in trace.tokens]
    she, nurse = tokens.index("she"), tokens.index("nurse")
    predicted = int(trace.logits[-1].argmax())
    assert predicted == smollm2.tokenizer.token_to_id("Ġnurse")  # the example's premise
    charts = chart_data(view, largest=True)
    scatter = next(frame for title, frame in charts.items() if title.startswith("Every head"))
    scatter = scatter.sort_values(["layer", "head"])
    assert len(scatter) == 270
    np.testing.assert_allclose(
        scatter["attention"], trace.attentions[:, :, she, nurse].ravel(), rtol=0, atol=1e-6
    )
    effects = am.head_effects(smollm2, ids=ids)  # default target: the top token, nurse
    np.testing.assert_allclose(scatter["zero"], effects.ravel(), rtol=0, atol=1e-4)
    # The mean column, for three heads, from one ablated encode each.
    plain = hm.probabilities(trace.logits[-1])[predicted]
    for layer, head in ((1, 3), (13, 8), (25, 1)):
        ablated = smollm2.encode(ids=ids, ablate=[(layer, head)], ablation="mean").logits[-1]
        expected = np.log(hm.probabilities(ablated)[predicted]) - np.log(plain)
        shown = scatter[(scatter["layer"] == layer) & (scatter["head"] == head)]["mean"]
        assert float(shown.iloc[0]) == pytest.approx(expected, abs=1e-4)


@needs_smollm2
def test_view_shows_the_apis_patching_grid(view, smollm2):
    grid = chart_data(view, largest=True)["Share of the nurse-vs-doctor difference restored"]
    grid = grid.sort_values(["layer", "head"])
    nurse = smollm2.tokenizer.token_to_id("Ġnurse")
    doctor = smollm2.tokenizer.token_to_id("Ġdoctor")
    counterfactual = hm.SENTENCE.replace(" she ", " he ")
    shares = am.patching_effects(smollm2, hm.SENTENCE, counterfactual, nurse, doctor)
    np.testing.assert_allclose(grid["share"], shares.ravel(), rtol=0, atol=1e-4)
    best = np.unravel_index(shares.argmax(), shares.shape)
    caption = next(c.value for c in view.caption if "restore the most" in c.value)
    assert f"layer {best[0]} head {best[1]}" in caption.replace("\\", "")


@needs_smollm2
def test_one_head_shows_its_map_effects_and_next_tokens(view, smollm2):
    app = view
    app.selectbox(key="real_model_matter_layer").set_value(13)
    app.selectbox(key="real_model_matter_head").set_value(8)
    app.run()
    assert_clean(app)
    ids = smollm2.tokenize(hm.SENTENCE)[1]
    trace = smollm2.encode(ids=ids)
    charts = chart_data(app, largest=True)
    heatmap = charts["Layer 13, head 8: where each token looks"]
    n = ids.size
    weights = np.zeros((n, n))
    weights[heatmap["query_index"], heatmap["key_index"]] = heatmap["weight"]
    np.testing.assert_allclose(weights, trace.attentions[13, 8], rtol=0, atol=1e-6)
    nurse = int(trace.logits[-1].argmax())
    ablated = smollm2.encode(ids=ids, ablate=[(13, 8)]).logits[-1]
    change = np.log(hm.probabilities(ablated)[nurse] / hm.probabilities(trace.logits[-1])[nurse])
    shown = float(metric(app, "Zero ablation").value)
    assert shown == pytest.approx(change, abs=2e-3)  # shown to three decimals
    bars = charts["Next token with and without layer 13, head 8"]
    before = bars[bars["run"] == "with the head"].set_index("token")["probability"]
    after = bars[bars["run"] == "zero ablated"].set_index("token")["probability"]
    assert before["nurse"] == pytest.approx(hm.probabilities(trace.logits[-1])[nurse], abs=1e-6)
    assert after["nurse"] == pytest.approx(hm.probabilities(ablated)[nurse], abs=1e-6)


@needs_smollm2
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "Type some text"),
        ("she " * 60, "reads at most 40 tokens"),
    ],
)
def test_bad_text_is_a_message(view, text, words):
    app = view
    app.text_input(key="real_model_matter_text").set_value(text).run()
    assert not app.exception, [e.value for e in app.exception]
    assert any(words in e.value for e in app.error), [e.value for e in app.error]
    app.button(key="real_model_matter_reset").click().run()
    assert app.text_input(key="real_model_matter_text").value == hm.SENTENCE
    assert_clean(app)


@needs_smollm2
def test_another_view_and_back(view):
    app = view
    app.radio(key="real_model_view").set_value("Generate").run()
    app.radio(key="real_model_view").set_value(VIEW).run()
    assert_clean(app)
    assert app.selectbox(key="real_model_matter_layer").value == 13  # the hardest looker again
