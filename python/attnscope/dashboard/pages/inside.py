"""Page: one head step by step, and what happens without the √d_k factor."""

import pandas as pd
import streamlit as st
from attnscope.dashboard import charts, inside, ui

D_VALUES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

st.title("Inside one head")
st.markdown(
    "A head owns three learned matrices. Every token's embedding `x` is multiplied by each "
    "of them: `Q = x·W_Q` is what the token is looking for, `K = x·W_K` is how it presents "
    "itself, `V = x·W_V` is what it hands over when chosen. The same three matrices serve "
    "every token of the layer; training is what tunes them."
)
ui.engine_banner()

controls = st.columns([3, 2, 2])
sentence = controls[0].text_input(
    "A short sentence",
    "The cat sleeps",
    key="inside_sentence",
    max_chars=20_000,
    bind="query-params",
)
d_k = controls[1].select_slider(
    "d_k (width of Q and K)", D_VALUES, value=4, key="inside_d_k", bind="query-params"
)
scaling = controls[2].radio(
    "Scale the scores",
    ["÷ √d_k", "no scaling"],
    key="inside_scaling",
    horizontal=True,
    bind="query-params",
)

words = ui.read_sentence(inside.SENTENCE.words, sentence)
steps = ui.one_head(tuple(words), d_k, scaling == "÷ √d_k")
labels = charts.token_labels(words)
SHOWN = 16  # wider matrices are cut to their first columns on screen (not in the maths)
MATRIX_CHROME_PX = 130  # a matrix's row labels and legend beside its cells
shown = min(d_k, SHOWN)
dims = [f"d{i}" for i in range(shown)]
model_dims = [f"e{i}" for i in range(inside.MODEL_DIM)]


def show(matrix, rows, cols, title, key, share, diverging=True):
    """Draw `matrix` with cells small enough for its row of charts (`share` of the page)."""
    size = ui.cell_px(len(cols), share, chrome=MATRIX_CHROME_PX)
    ui.chart(
        st,
        charts.matrix(matrix, rows, cols, title=title, diverging=diverging, cell_px=size),
        key=key,
    )


st.subheader("1 · Project each token")
columns = st.columns(4)
with columns[0]:
    show(steps.x, labels, model_dims, "x (embeddings)", "inside_x", 1 / 4)
for column, (name, w) in zip(
    columns[1:], (("W_Q", steps.w_q), ("W_K", steps.w_k), ("W_V", steps.w_v)), strict=True
):
    with column:
        show(w[:, :shown], model_dims, dims, name, f"inside_{name}", 1 / 4)
columns = st.columns(3)
for column, (name, m) in zip(
    columns, (("Q = x·W_Q", steps.q), ("K = x·W_K", steps.k), ("V = x·W_V", steps.v)), strict=True
):
    with column:
        show(m[:, :shown], labels, dims, name, f"inside_{name[0]}", 1 / 3)
if d_k > SHOWN:
    st.caption(f"Only the first {SHOWN} of the {d_k} columns are drawn; all are used.")

st.subheader("2 · Score, scale, softmax, mix")
columns = st.columns(3)
with columns[0]:
    show(steps.hide_future(steps.scores), labels, labels, "scores Q·Kᵀ", "inside_scores", 1 / 3)
with columns[1]:
    title = f"× {steps.scale:.3f} (= 1/√{d_k})" if scaling == "÷ √d_k" else "× 1 (no scaling)"
    show(steps.hide_future(steps.scaled), labels, labels, title, "inside_scaled", 1 / 3)
with columns[2]:
    ui.chart(
        st,
        charts.heatmap(
            steps.weights, words, visible=steps.visible, title="softmax (engine)", cell_px=30
        ),
        key="inside_weights",
    )
st.markdown(
    "Softmax turns each row of scaled scores into weights: `exp(score)` over the sum of the "
    "row's `exp`, after the causal mask removed the future. The output of a token is its row "
    "of weights times `V`: a blend of the values it found interesting."
)
row = len(words) - 1
ui.significant_table(
    inside.softmax_by_hand(steps, row, labels),
    key="inside_softmax_table",
    columns=("scaled score", "exp(score − max)", "weight = exp / sum", "engine weight"),
)
st.caption(f"The softmax of the last row ('{words[row]}'), by hand and from the engine.")
show(steps.output[:, :shown], labels, dims, "output = weights · V", "inside_output", 1)

st.subheader("3 · Why divide by √d_k")
st.markdown(
    "A score is a sum of `d_k` products, so with unit-size entries its spread grows like "
    "`√d_k`. Without the factor, wide heads produce huge scores, softmax puts nearly all the "
    "weight on one key, and its gradient, the signal training needs, fades to nothing. "
    "Dividing by `√d_k` keeps the spread near 1 at every width. Below: 32 random queries "
    "against 16 random keys at each width, every softmax from the engine."
)
curves = ui.saturation(D_VALUES)


# A fragment: choosing what to show redraws this section only, not the page's other charts.
@st.fragment
def saturation_section(curves, d_k: int) -> None:
    metric = st.radio(
        "Show",
        ["max weight", "entropy (nats)", "softmax gradient", "score std"],
        key="inside_metric",
        horizontal=True,
        bind="query-params",
    )
    ui.chart(
        st,
        charts.lines(curves, "d_k", metric, "scaling", title=f"{metric} vs d_k", marker_x=d_k),
        key="inside_saturation",
    )
    at_d = inside.saturation_at(curves, d_k)
    cols = st.columns(3)
    for column, (name, label) in zip(
        cols,
        (
            ("max weight", f"max weight at d_k = {d_k}"),
            ("entropy (nats)", "entropy (nats)"),
            ("softmax gradient", "softmax gradient"),
        ),
        strict=True,
    ):
        # Three significant digits: a gradient of 2e-7 should not read as 0.000.
        ui.note_metric(
            column,
            label,
            f"{at_d.loc['no scaling', name]:.3g} unscaled",
            f"{at_d.loc['÷ √d_k', name]:.3g} scaled",
        )


saturation_section(curves, d_k)

st.subheader("4 · FlashAttention: the same softmax, one block of keys at a time")
st.markdown(
    "Softmax seems to need the whole row of scores before it can divide by their sum, and at "
    "200,000 tokens a head's rows weigh hundreds of GiB. FlashAttention never holds a whole "
    "row: it walks the keys in blocks and keeps three things per query, the largest score so "
    "far `m`, the sum `l` of `exp(score − m)`, and the output so far. When a block brings a "
    "larger score, the old sum and output are multiplied by `exp(m_old − m_new)`, which puts "
    "them on the new scale, and the block is added. Blocks the causal mask hides entirely are "
    "skipped. Step through one query row:"
)


# A fragment: stepping through the blocks redraws this section only.
@st.fragment
def flash_stepper(steps, words: list[str], labels: list[str], dims: list[str]) -> None:
    shown = len(dims)
    d_k = steps.q.shape[1]
    flash_controls = st.columns([2, 2, 3])
    st.session_state.setdefault("inside_flash_row", len(words) - 1)
    query_row = ui.position_select(flash_controls[0], "Query row", words, key="inside_flash_row")
    block = flash_controls[1].select_slider(
        "Keys per block", [1, 2, 3, 4], value=2, key="inside_flash_block", bind="query-params"
    )
    flash = inside.flash_row(
        steps.q[query_row],
        steps.k,
        steps.v,
        scale=steps.scale,
        visible=steps.visible[query_row],
        block=block,
    )
    walked = ui.bounded_slider(
        flash_controls[2], "Blocks walked", 1, len(flash.steps), 1, key="inside_flash_walked"
    )
    ui.significant_table(
        inside.flash_table(flash, labels, walked),
        key="inside_flash_table",
        columns=("running max m", "rescale exp(m_old − m)", "running sum l"),
    )
    current = flash.steps[walked - 1]
    st.dataframe(
        pd.DataFrame(
            [current.partial_output[:shown], flash.output[:shown]],
            index=[f"accumulator / l after block {walked}", "final output"],
            columns=dims,
        ),
        key="inside_flash_output",
        column_config={d: st.column_config.NumberColumn(format="%.4f") for d in dims},
    )
    if walked < len(flash.steps):
        st.caption("Move the slider to the last block to compare the result with the engine.")
    else:
        gaps = inside.flash_check(flash, steps, query_row)
        st.dataframe(
            pd.DataFrame(
                {
                    "key": labels,
                    "blockwise weight exp(score − m − log l)": flash.weights(),
                    "engine weight": steps.weights[query_row],
                }
            ),
            hide_index=True,
            key="inside_flash_weights",
            column_config={
                "blockwise weight exp(score − m − log l)": st.column_config.NumberColumn(
                    format="%.6f"
                ),
                "engine weight": st.column_config.NumberColumn(format="%.6f"),
            },
        )
        largest = max(gaps.values())
        message = (
            f"After the last block: weights within {gaps['weights']:.1e}, log-sum-exp "
            f"m + log l within {gaps['log-sum-exp']:.1e} and output within {gaps['output']:.1e} "
            "of the engine's (return_weights, return_lse)."
        )
        (st.success if largest <= 1e-6 else st.error)(message)
    st.dataframe(
        inside.flash_memory(len(words), block, d_k), hide_index=True, key="inside_flash_memory"
    )


flash_stepper(steps, words, labels, dims)
