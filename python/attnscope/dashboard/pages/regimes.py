"""Page: the same Q, K, V under causal and bidirectional attention, and the other regimes."""

import streamlit as st
from attnscope.dashboard import charts, regimes, ui
from attnscope.reference import visibility

st.title("Causal or bidirectional?")
st.markdown(
    "An encoder such as BERT lets every token see the whole sentence, before and after it. "
    "A generator such as GPT, Llama or Claude lets a token see only what came before it. "
    "Below, one small random model produces a single set of `Q, K, V`; the engine runs "
    "it through both regimes."
)
ui.engine_banner()

sentence = st.text_input(
    "Sentence",
    "The doctor fired the nurse because she was tired.",
    key="regimes_sentence",
    max_chars=20_000,
)
words = ui.read_sentence(regimes.SENTENCE.words, sentence)
key = tuple(words)
n = len(words)

result = ui.both_regimes(key)
left, right = st.columns(2)
for column, regime in zip((left, right), regimes.REGIMES, strict=True):
    visible = visibility(n, n, is_causal=regime == "causal")
    ui.chart(
        column,
        charts.heatmap(result[regime][1], words, visible=visible, title=regime, cell_px=20),
        key=f"regimes_{regime}",
    )

st.subheader("Edit a later word: which rows change?")
st.markdown(
    "Replace one word and compare each row's output before and after. Under the causal mask "
    "every row before the edit is bit-for-bit unchanged: those tokens never saw it. That is "
    "why a causal model can be trained to predict the next word (the answer is hidden from "
    "it) and can reuse its past work while generating. Bidirectional rows all move."
)
edit = st.columns([2, 2])
position = ui.bounded_slider(edit[0], "Position to edit", 0, n - 1, n // 2, "regimes_edit_position")
replacement = (
    edit[1]
    .text_input("Replacement word", "surgeon", key="regimes_replacement", max_chars=40)
    .strip()
)
change = ui.edit_effect(key, position, replacement or words[position])
ui.chart(
    st,
    charts.grouped_bars(
        regimes.change_frame(change, charts.token_labels(words)),
        "row",
        "change",
        "regime",
        title=f"Largest change in each output row after '{words[position]}' → "
        f"'{replacement or words[position]}'",
        y_title="max |Δ output|",
    ),
    key="regimes_edit_chart",
)
changed = regimes.rows_changed(change, position)
st.caption(
    f"Causal rows before position {position} that changed: "
    f"{changed['causal before the edit']} of {position}. Bidirectional rows that changed: "
    f"{changed['bidirectional']} of {n}."
)

st.subheader("Fewer queries than keys: which diagonal?")
st.markdown(
    "While generating, a model keeps the keys and values of the tokens it has already "
    "processed (its KV cache) and computes queries only for the newest tokens. Those queries "
    "sit at the end of the sequence, so their causal diagonal must end in the bottom-right "
    "corner. PyTorch's `is_causal` aligns it top-left instead, which would hide keys the new "
    "tokens are entitled to see; `causal_alignment='bottom_right'` fixes that."
)
num_queries = ui.bounded_slider(st, "New tokens (queries)", 1, n, 3, "regimes_num_queries")
aligned = ui.alignment_weights(key, num_queries)
left, right = st.columns(2)
for column, alignment in zip((left, right), ("top_left", "bottom_right"), strict=True):
    weights, visible = aligned[alignment]
    ui.chart(
        column,
        charts.heatmap(
            weights,
            words[-num_queries:],
            words,
            visible=visible,
            title=alignment,
            cell_px=20,
            query_first=n - num_queries,
        ),
        key=f"regimes_align_{alignment}",
    )

st.subheader("Sliding window and grouped-query attention")
left, right = st.columns(2)
with left:
    window = ui.bounded_slider(st, "Window (keys each token sees)", 1, n, 3, "regimes_window")
    weights, visible = ui.window_weights(key, window)
    ui.chart(
        st,
        charts.heatmap(
            weights, words, visible=visible, title=f"causal, window {window}", cell_px=16
        ),
        key="regimes_window_chart",
    )
    st.caption(
        "Each token sees only its last few neighbours (as in Mistral's sliding window), so "
        "the cost grows like n·w instead of n²; stacked layers still pass information further."
    )
with right:
    kv_heads = st.select_slider(
        "Key/value heads for 4 query heads", [1, 2, 4], value=2, key="regimes_kv_heads"
    )
    gqa = ui.gqa_weights(key, 4, kv_heads)
    visible = visibility(n, n, is_causal=True)
    group = 4 // kv_heads
    small = st.columns(2)
    for head in range(4):
        ui.chart(
            small[head % 2],
            charts.heatmap(
                gqa[head],
                words,
                visible=visible,
                cell_px=9,
                show_labels=False,
                title=f"query head {head} → kv head {head // group}",
            ),
            key=f"regimes_gqa_{head}",
        )
    saving = 4 // kv_heads
    st.caption(
        f"{kv_heads} key/value head(s) serve 4 query heads: the KV cache is {saving}× smaller "
        f"({regimes.kv_bytes_per_token(kv_heads)} instead of {regimes.kv_bytes_per_token(4)} "
        "bytes per token and layer here). Heads in one group share keys but ask different "
        "questions, so their patterns still differ."
    )
