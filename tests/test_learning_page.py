"""The "Learning: heads emerge" page under streamlit's AppTest: it opens without training, a
Train press shows the trainer's own numbers (loss curve, score grids, maps, metrics), the
comparison shows both runs' numbers, an interrupted run is said to be one, bad choices
are refused with the argument named, and without the compiled engine Train says it is needed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from attnscope.dashboard import engine
from attnscope.dashboard import learning as lab
from page_helpers import assert_clean, chart_data
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "python/attnscope/dashboard/pages/learning.py"
COMPARE = "Compare with and without √d_k"


def metric(app: AppTest, label: str):
    return next(m for m in app.metric if m.label == label)


def trained_page(task: str, layers: int, width: int, steps: int, mode: str = "Train one model"):
    app = AppTest.from_file(str(PAGE), default_timeout=600)
    app.run()
    app.selectbox(key="learning_task").set_value(task)
    app.number_input(key="learning_layers").set_value(layers)
    app.select_slider(key="learning_width").set_value(width)
    app.slider(key="learning_steps").set_value(steps)
    app.radio(key="learning_mode").set_value(mode)
    app.button(key="learning_train").click().run()
    assert_clean(app)
    return app


def expected_run(config, label: str = "this model", shown: lab.Run | None = None) -> lab.Run:
    """The same training the page ran, from the page's own compute function; cut at the step
    the page's run reached when `shown` is given (a busy machine may end it on its time
    budget)."""
    *_, run = lab.bounded_run(label, config, time_budget_s=float("inf"))
    if shown is None:
        return run
    return lab.Run(label, config, run.reports[: len(shown.reports)], shown.ended)


def test_page_opens_without_training():
    app = AppTest.from_file(str(PAGE), default_timeout=60)
    app.run()
    assert_clean(app)
    assert "press **Train**" in app.info[0].value
    assert not app.get("vega_lite_chart")


def test_the_app_serves_the_page():
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.run()
    app.switch_page("python/attnscope/dashboard/pages/learning.py").run()
    assert_clean(app)
    assert app.title[0].value == "Learning: heads emerge"


def test_without_the_compiled_engine_train_says_the_engine_is_needed(monkeypatch):
    monkeypatch.setattr(engine, "compiled_available", lambda: False)
    app = AppTest.from_file(str(PAGE), default_timeout=60)
    app.run()
    app.button(key="learning_train").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert ["not built" in e.value for e in app.error] == [True]
    assert not app.get("vega_lite_chart")


@pytest.fixture(scope="module")
def previous_token_page():
    return trained_page("previous_token", 1, 32, 100)


def test_training_shows_the_trainers_numbers(previous_token_page):
    app = previous_token_page
    run = expected_run(lab.make_config("previous_token", 1, 4, 32, 100, "÷ √d_k", 0))
    assert [r.step for r in run.reports][-1] == 100
    assert metric(app, "Held-out loss").value == f"{run.last.loss:.3f}"
    assert metric(app, "Accuracy").value == f"{run.last.accuracy:.1%}"
    charts = chart_data(app)
    losses = charts["Loss during training"]
    held_out = losses[losses["curve"] == "held-out loss"]
    assert list(held_out["step"]) == [r.step for r in run.reports]
    np.testing.assert_allclose(held_out["loss"], [r.loss for r in run.reports], rtol=1e-6)
    grid = charts[lab.SCORES["previous_token"]]
    np.testing.assert_allclose(
        grid[lab.SCORES["previous_token"]], run.last.previous_token.ravel(), rtol=1e-6
    )
    # Training learned the task's head: the page shows it, and it is the trainer's.
    assert run.last.previous_token.max() > 0.5
    for when, report in (("start", run.reports[0]), ("end", run.last)):
        frame = charts[f"{when}: layer 0 head 2"]
        weights = np.zeros((32, 32))
        weights[frame["query_index"], frame["key_index"]] = frame["weight"]
        np.testing.assert_allclose(weights, report.maps[0, 2], atol=1e-6)
        hidden = frame[~frame["visible"]]
        assert (hidden["key_index"] > hidden["query_index"]).all()  # the causal triangle


def test_the_step_slider_redraws_the_grids_at_that_step(previous_token_page):
    app = previous_token_page
    run = expected_run(lab.make_config("previous_token", 1, 4, 32, 100, "÷ √d_k", 0))
    app.select_slider(key="learning_step").set_value(0).run()
    assert_clean(app)
    grid = chart_data(app)[lab.SCORES["induction"]]
    np.testing.assert_allclose(
        grid[lab.SCORES["induction"]], run.reports[0].induction.ravel(), rtol=1e-6
    )


def test_compare_mode_shows_both_runs():
    app = trained_page("induction", 2, 64, 25, COMPARE)
    config = lab.make_config("induction", 2, 4, 64, 25, "÷ √d_k", 0)
    shown = app.session_state["learning_runs"]
    runs = [
        expected_run(c, label, page_run)
        for (label, c), page_run in zip(lab.compare_configs(config).items(), shown, strict=True)
    ]
    table = app.dataframe[0].value  # one column per run, one row per number
    expected = lab.compare_table(runs)
    assert list(table.columns) == list(expected["run"])
    numeric = expected.columns.drop("run")
    np.testing.assert_allclose(
        table.loc[numeric].to_numpy(float).T, expected[numeric].to_numpy(float)
    )
    history = chart_data(app)["W_Q/W_K gradient norm"]
    assert set(history["run"]) == {run.label for run in runs}
    # The comparison's point, measured: the unscaled wide heads start far more peaked.
    scaled, unscaled = runs
    assert unscaled.reports[0].entropy.mean() < 0.5 * scaled.reports[0].entropy.mean()


def test_a_new_run_resets_choices_it_does_not_offer(previous_token_page):
    # The first run reported steps 0..100 and had one layer; this one reports 0..25 with two.
    app = previous_token_page
    app.select_slider(key="learning_step").set_value(100).run()
    app.number_input(key="learning_layers").set_value(2)
    app.slider(key="learning_steps").set_value(25)
    app.button(key="learning_train").click().run()
    assert_clean(app)
    assert app.select_slider(key="learning_step").value == 25
    app.selectbox(key="learning_map_layer").set_value(1).run()
    app.number_input(key="learning_layers").set_value(1)
    app.button(key="learning_train").click().run()
    assert_clean(app)
    assert app.selectbox(key="learning_map_layer").value == 0


def test_agreement_maps_are_labelled_with_words():
    app = trained_page("agreement", 1, 32, 25)
    frame = chart_data(app)["end: layer 0 head 0"]
    words = set(frame["query"].str.split(" ").str[1])
    assert words & {"she", "he"}
    assert words & set(lab.learning.AGREEMENT_WORDS["she"] + lab.learning.AGREEMENT_WORDS["he"])


def test_an_interrupted_run_is_shown_as_one():
    config = lab.make_config("previous_token", 1, 4, 32, 50, "÷ √d_k", 0)
    first = next(lab.bounded_run("this model", config))
    app = AppTest.from_file(str(PAGE), default_timeout=60)
    app.session_state["learning_runs"] = [first]
    app.run()
    assert_clean(app)
    assert "interrupted at step 0" in app.warning[0].value


@pytest.mark.parametrize(
    ("choices", "words"),
    [
        (("sorting", 2, 4, 64, 100, "÷ √d_k", 0), "task"),
        (("induction", 4, 4, 64, 100, "÷ √d_k", 0), "layers"),
        (("induction", 2, 3, 64, 100, "÷ √d_k", 0), "heads"),
        (("induction", 2, 4, 64, 5, "÷ √d_k", 0), "steps"),
        (("induction", 2, 4, 64, 100, "× 2", 0), "scaling"),
    ],
)
def test_bad_choices_are_refused(choices, words):
    with pytest.raises(ValueError, match=words):
        lab.make_config(*choices)


def test_a_diverged_run_is_a_message_with_the_steps_before_it(monkeypatch):
    make_config = lab.make_config

    def too_fast(*choices):  # the page offers no learning rate: a config that diverges
        return dataclasses.replace(make_config(*choices), learning_rate=1e300)

    monkeypatch.setattr(lab, "make_config", too_fast)
    app = trained_page("previous_token", 1, 32, 50)
    runs = app.session_state["learning_runs"]
    assert runs[0].diverged and not any(r.diverged for r in runs[0].reports)
    warning = next(w.value for w in app.warning if "diverged" in w.value)
    expected = lab.learning.train(too_fast("previous_token", 1, 4, 32, 50, "÷ √d_k", 0))
    assert [r.step for r in runs[0].reports] == [r.step for r in expected[:-1]]
    assert f"diverged at step {expected[-1].step}" in warning
