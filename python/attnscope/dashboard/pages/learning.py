"""Page: train a tiny transformer live and watch its heads specialise, with and without √d_k."""

import streamlit as st
from attnscope.dashboard import engine, ui
from attnscope.dashboard import learning as lab
from attnscope.dashboard import learning_charts as lc
from attnscope.reference import visibility

TASK_NOTES = {
    "induction": (
        "Each sequence is 16 random tokens followed by the same 16 again. The first copy "
        "cannot be guessed; the second can, by finding where the current token appeared "
        "before and reading what came after it. Two heads have to cooperate for that: an "
        "early one that copies each token's predecessor into it (a previous-token head) and a "
        "later one that looks for the position whose predecessor matches the current token "
        "(an induction head)."
    ),
    "previous_token": (
        "Each position must output the token just before it. A single head that looks one "
        "step back is enough, so one layer will do."
    ),
    "agreement": (
        "Filler words hide one feminine noun (queen, mother, …) and one masculine noun (king, "
        "father, …); the sequence ends with 'she' or 'he', and the model must name the noun "
        "the pronoun refers to, like 'she' pointing back to the nurse in the chapter's "
        "sentence. A head has to learn to look from the pronoun to the noun that agrees with it."
    ),
}
SCORE_NOTE = (
    "**Previous-token score**: the mean weight a token gives to the one right before it. "
    "**Induction score**: on held-out random sequences repeated twice, the mean weight a "
    "token of the second copy gives to the token that followed its first appearance. "
    "1 means the head does exactly that; a head spreading its weight evenly scores about "
    "1/position. **Entropy**: how spread out each row is, in nats (0 = all weight on one key)."
)

COMPARE_NOTE = (
    "Both runs start from the same random weights and see the same batches; the heads are "
    "wide (d_k = 64). A score `q·k` adds up 64 products, so without the factor it starts "
    "about 8 times larger. Softmax then puts nearly all of a row's weight on one key: the "
    "entropy falls towards 0, and so does the **softmax gradient**, which measures how much a "
    "change of the scores can still move the weights. That is the gradient dying inside "
    "attention: the unscaled run's loss stays nearly flat while the scaled one finds its "
    "induction head. The gradient arriving at `W_Q` and `W_K` does not shrink with it here: "
    "without the factor every score, and so every gradient flowing back into `W_Q` and "
    "`W_K`, is also 8 times larger. Its size is not its usefulness: the loss curves say which "
    "run learns."
)

MAPS_PER_ROW = 4
MAP_ROW_PX = 940  # the width of the page's main column at a desktop window's size

st.title("Learning: heads emerge")
st.markdown(
    "Every head on the other pages was written by hand or trained by someone else. Here a "
    "tiny transformer starts from random `W_Q`, `W_K` and `W_V` and learns them by gradient "
    "descent while you watch. Nothing tells a head where to look: the loss only rewards "
    "predicting the right token, and the attention patterns that help appear on their own. "
    "The attention of every step, forward and backward, is computed by the engine; the rest "
    "of the model is NumPy."
)
ui.engine_banner()

MODES = ["Train one model", "Compare with and without √d_k"]
URL = {"bind": "query-params"}  # every control below lives in the page's address
# Compare mode sets the width, the heads and the scaling itself: those controls are greyed
# out while it is chosen (read before they are drawn, from this run's state or the URL).
comparing = (
    st.session_state.get("learning_mode", st.query_params.get("learning_mode")) == (MODES[1])
)
overridden = {"disabled": comparing, "help": "Set by compare mode." if comparing else None}
row = st.columns([3, 1, 2, 2])
task = row[0].selectbox(
    "Task", list(lab.TASK_LABELS), format_func=lab.TASK_LABELS.get, key="learning_task", **URL
)
layers = row[1].number_input("Layers", 1, lab.MAX_LAYERS, 2, key="learning_layers", **URL)
heads = row[2].select_slider(
    "Heads per layer", lab.HEAD_CHOICES, value=4, key="learning_heads", **URL, **overridden
)
width = row[3].select_slider(
    "d_model", lab.WIDTH_CHOICES, value=64, key="learning_width", **URL, **overridden
)
row = st.columns([3, 2, 1, 2])
steps = row[0].slider(
    "Adam steps", *lab.STEP_RANGE, value=400, step=25, key="learning_steps", **URL
)
scaling = row[1].radio(
    "Scale the scores", list(lab.SCALINGS), key="learning_scaling", **URL, **overridden
)
seed = row[2].number_input("Seed", 0, 10_000, 0, key="learning_seed", **URL)
mode = row[3].radio("Mode", MODES, key="learning_mode", **URL)
st.caption(TASK_NOTES[task])
if mode == MODES[1]:
    st.info(lab.compare_overrides())

buttons = st.columns([1, 1, 6])
train = buttons[0].button("Train", type="primary", key="learning_train")
# Pressing Stop reruns the page, which ends a training in progress; what it reported is kept.
buttons[1].button("Stop", key="learning_stop")


def keep_choice(key: str, options: list, default) -> None:
    """The widget's choice lives in session state: `default` at first, and again when a new
    run no longer offers the remembered one (a step it did not report, a layer it lacks)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default


def show_live(run, slots) -> None:
    """Redraw the loss curve and the score grid of a run in progress."""
    report = run.last
    key = f"{run.label}_{report.step}"
    ui.chart(
        slots[0],
        lc.training_curves(lab.loss_frame(run), "loss", "curve", title=f"Loss: {run.label}"),
        key=f"learning_live_loss_{key}",
    )
    ui.chart(
        slots[1],
        lc.score_grid(
            lab.score_frame(report),
            lab.SCORES["induction"],
            domain=(0, 1),
            title=f"Induction score at step {report.step}",
        ),
        key=f"learning_live_grid_{key}",
    )


if train:
    if not engine.compiled_available():
        # The trainer refuses to run its attention in the slow reference.
        st.error(
            "Training computes every attention forward and backward in the compiled engine, "
            "which is not built here. Build it with `make build` to train."
        )
        st.stop()
    try:
        config = lab.make_config(task, int(layers), heads, width, steps, scaling, int(seed))
    except (TypeError, ValueError) as problem:
        st.error(str(problem))
        st.stop()
    configs = {"this model": config}
    if mode != "Train one model":
        configs = lab.compare_configs(config)
    st.session_state["learning_runs"] = []
    st.session_state.pop("learning_step", None)  # a new run is shown at its last step
    st.session_state.pop("learning_map_layer", None)  # ... and on its best head's layer
    progress = st.progress(0.0, text="Starting…")
    slots = st.columns([3, 2])
    slots = [slots[0].empty(), slots[1].empty()]
    for index, (label, run_config) in enumerate(configs.items()):
        st.session_state["learning_runs"].append(None)
        for run in lab.bounded_run(label, run_config):
            st.session_state["learning_runs"][index] = run
            done = (index + run.last.step / run_config.steps) / len(configs)
            progress.progress(
                done,
                text=f"{label}: step {run.last.step} of {run_config.steps}, "
                f"{run.last.seconds:.1f} s, held-out loss {run.last.loss:.3f}",
            )
            show_live(run, slots)
    st.rerun()

runs = [run for run in st.session_state.get("learning_runs", []) if run is not None]
if not runs:
    st.info(
        "Choose a task and press **Train**. The default settings take about 15 seconds on a "
        "2-core machine; the induction head appears about halfway."
    )
    st.stop()

for run in runs:
    if run.ended is None:
        st.warning(f"{run.label}: interrupted at step {run.last.step}; showing what it reached.")
    elif run.diverged:
        st.warning(f"{run.label}: {run.ended}.", icon=":material/warning:")
    else:
        st.caption(f"{run.label}: {run.ended} in {run.last.seconds:.1f} s.")

if len(runs) == 1:
    run = runs[0]
    numbers = lab.summary(run)
    cells = st.columns(4)
    cells[0].metric(
        "Held-out loss",
        f"{numbers['loss after']:.3f}",
        f"{numbers['loss after'] - numbers['loss before']:+.3f} since step 0",
        delta_color="inverse",
    )
    cells[1].metric("Accuracy", f"{numbers['accuracy after']:.1%}")
    cells[2].metric(
        "Loss on repeats: 2nd copy vs 1st",
        f"{numbers['second-copy loss']:.2f} vs {numbers['first-copy loss']:.2f}",
    )
    layer, head, value = lab.best_head(run.last)
    ui.note_metric(cells[3], "Best induction score", f"{value:.2f}", f"layer {layer}, head {head}")
    if run.config.task == "induction":
        st.caption(lab.first_copy_note(run.config, numbers["first-copy loss"]))
    ui.chart(
        st,
        lc.training_curves(lab.loss_frame(run), "loss", "curve", title="Loss during training"),
        key="learning_loss",
    )
    st.subheader("Every head, scored")
    st.markdown(SCORE_NOTE)
    reported = [r.step for r in run.reports]
    keep_choice("learning_step", reported, run.last.step)
    shown_step = st.select_slider("Scores at step", reported, key="learning_step")
    report = next(r for r in run.reports if r.step == shown_step)
    grids = st.columns(3)
    for column, (score, domain) in zip(
        grids,
        (("induction", (0, 1)), ("previous_token", (0, 1)), ("entropy", (0, 3.5))),
        strict=True,
    ):
        ui.chart(
            column,
            lc.score_grid(lab.score_frame(report), lab.SCORES[score], domain=domain),
            key=f"learning_grid_{score}",
        )
else:
    st.markdown(COMPARE_NOTE)
    history = lab.history_frame(runs)
    curves = (
        ("held-out loss", False),
        ("entropy (nats)", False),
        ("softmax gradient", False),
        ("W_Q/W_K gradient norm", True),
    )
    columns = [*st.columns(2), *st.columns(2)]
    for column, (value, log_y) in zip(columns, curves, strict=True):
        ui.chart(
            column,
            lc.training_curves(history, value, "run", title=value, log_y=log_y),
            key=f"learning_compare_{value}",
        )
    st.dataframe(
        lab.compare_shown(runs),
        key="learning_compare_table",
        width="stretch",
        column_config={
            label: st.column_config.NumberColumn(format="%.4g")
            for label in (run.label for run in runs)
        },
    )

run = runs[0]
if len(runs) == 1:
    st.subheader("Attention maps at the start and at the end")
    shown = [("start", run.reports[0]), ("end", run.last)]
else:
    st.subheader("Attention maps at the end of both runs")
    shown = [(f"end, {r.label}", r.last) for r in runs]
st.caption(
    "One held-out sequence; row i is where token i looks, from white (weight 0) to dark blue "
    "(weight 1). The grey triangle is the causal mask: no token may look ahead."
)
tokens = lab.example_tokens(run.config)
length = len(tokens)
keep_choice("learning_map_layer", list(range(run.config.num_layers)), lab.map_layer(run))
layer = st.selectbox("Layer", range(run.config.num_layers), key="learning_map_layer")
visible = visibility(length, length, is_causal=True)
per_row = min(run.config.num_heads, MAPS_PER_ROW)
# Cells small enough that a map and its axis title fit in a column; the caption gives the
# colour scale once instead of a legend beside every map.
cell_px = max(2, min(10, (MAP_ROW_PX // per_row - 60) // length))
for index, (when, report) in enumerate(shown):
    for first in range(0, run.config.num_heads, per_row):
        for head, column in enumerate(st.columns(per_row), start=first):
            ui.chart(
                column,
                lc.small_map(
                    report.maps[layer, head],
                    tokens,
                    visible=visible,
                    title=f"{when}: layer {layer} head {head}",
                    cell_px=cell_px,
                ),
                key=f"learning_map_{index}_{head}",
            )
