"""Page: attention heads with the behaviours the chapter describes, built and computed live."""

import pandas as pd
import streamlit as st
from attnscope.dashboard import charts, heads, text, ui
from attnscope.reference import visibility

# Where each example is most telling: (head, token to inspect).
FOCUS = {
    "The cat sleeps": ("Subject ↔ verb", "sleeps"),
    "Coreference": ("Coreference", "he"),
    "The doctor and the nurse": ("Coreference", "she"),
    "Agreement": ("Coreference", "he"),
    "Rhyme": ("Rhyme", "hat"),
}


def _load_example() -> None:
    name = st.session_state["heads_example"]
    st.session_state["heads_sentence"] = text.EXAMPLES[name]
    head, word = FOCUS[name]
    st.session_state["heads_head"] = head
    words = text.split_words(text.EXAMPLES[name])
    st.session_state["heads_row"] = words.index(word) if word in words else 0


st.title("Heads: who looks at whom")
st.markdown(
    "Each row of a heatmap is one token asking a question; each column is a token offering "
    "an answer. A cell is how much of the row's new representation comes from that column, "
    "and every row sums to 1. The heads below were not trained: each one is a tiny rule "
    "written into `W_Q` and `W_K`, and the engine's softmax turns it into the pattern you see. "
    "Trained models grow heads like these on their own."
)
ui.engine_banner()

default_example = next(iter(text.EXAMPLES))
st.session_state.setdefault("heads_sentence", text.EXAMPLES[default_example])
st.session_state.setdefault("heads_head", FOCUS[default_example][0])
st.session_state.setdefault("heads_row", 2)

controls = st.columns([2, 3, 1], vertical_alignment="bottom")
controls[0].selectbox("Example", list(text.EXAMPLES), key="heads_example", on_change=_load_example)
sentence = controls[1].text_input(
    "Sentence (edit it)", key="heads_sentence", max_chars=20_000, bind="query-params"
)
causal = controls[2].toggle("Causal mask", value=True, key="heads_causal", bind="query-params")

tokens = ui.read_sentence(text.tokenize, sentence)
words = [token.text for token in tokens]
weights = ui.head_weights(sentence, causal)
n = len(words)
visible = visibility(n, n, is_causal=causal)


# A fragment: choosing another head or row redraws this view only, not the panels below.
@st.fragment
def head_view(sentence: str, tokens: list, weights, visible, causal: bool) -> None:
    words = [token.text for token in tokens]
    n = len(words)
    options = st.columns(2)
    head_name = options[0].selectbox(
        "Head", heads.HEAD_NAMES, key="heads_head", bind="query-params"
    )
    row = ui.position_select(options[1], "Token to inspect (a row)", words, key="heads_row")
    head_index = heads.HEAD_NAMES.index(head_name)
    spec = heads.HEADS[head_index]

    left, right = st.columns([3, 2])
    with left:
        ui.chart(
            st,
            charts.heatmap(
                weights[head_index],
                words,
                visible=visible,
                title=head_name,
                cell_px=ui.cell_px(n, 3 / 5, largest=charts.CELL_PX),
            ),
            key="heads_heatmap",
        )
    with right:
        strongest = int(weights[head_index, row].argmax())
        ui.chart(
            st,
            charts.row_bars(
                weights[head_index, row],
                words,
                visible=visible[row],
                title=f"Where '{words[row]}' looks",
            ),
            key="heads_row_bars",
        )
        ui.note_metric(
            st,
            f"Strongest key for '{words[row]}'",
            f"{strongest} {words[strongest]}",
            f"weight {weights[head_index, row, strongest]:.3f}",
        )
        st.markdown(spec.summary)
        if head_name == "Coreference":
            for note in heads.coreference_gaps(tokens, weights[head_index]):
                st.warning(note, icon=":material/warning:")
        if causal:
            st.caption(
                "Grey cells are the causal mask: a token may not look at anything after it, "
                "which is what makes a model predict the next word rather than read it."
            )

    # Its charts are built only while it is open: a closed expander costs a rerun nothing.
    how = st.expander(
        "How this head is built: embeddings, W_Q, W_K and the scores",
        key="heads_how",
        on_change="rerun",
    )
    if how.open:
        with how:
            st.markdown(
                "Each token's embedding `x` holds readable features: its word class, a gender for "
                "nouns and pronouns that carry one, a sine/cosine code of its position, and three "
                "'rime' features for rhymes. The head's rule below is written into `W_Q` and `W_K` "
                "so that `Q·Kᵀ/√d_k` equals it exactly; the engine masks those scores and applies "
                "softmax. A gap of a few logits is enough for softmax to put almost all the weight "
                "on one key."
            )
            st.dataframe(pd.DataFrame(heads.rule_table(spec)), hide_index=True, key="heads_rule")
            ui.chart(
                st,
                charts.matrix(
                    heads.readable_embeddings(tokens),
                    charts.token_labels(words),
                    heads.READABLE_FEATURES,
                    title="Embeddings x (word-class, gender and start features; position and rime "
                    "codes not shown)",
                ),
                key="heads_embeddings",
            )
            w_q, read_features, key_features = heads.query_weights_used(spec)
            if len(key_features) <= 24:
                ui.chart(
                    st,
                    charts.matrix(
                        w_q,
                        read_features,
                        key_features,
                        title="W_Q (rows it reads from x, columns of the key space)",
                    ),
                    key="heads_wq",
                )
            else:
                st.caption(
                    f"This head's W_Q uses {len(key_features)} key-space columns (its position "
                    "code); the rule table above says what they do."
                )
            st.caption(
                "W_K simply copies those key features out of x: column c of W_K is 1 at the "
                "feature named on column c of W_Q."
            )
            ui.chart(
                st,
                charts.matrix(
                    ui.masked_scores(sentence, head_index, causal),
                    charts.token_labels(words),
                    charts.token_labels(words),
                    title="Scaled scores Q·Kᵀ/√d_k before softmax (masked cells shown as 0)",
                ),
                key="heads_scores",
            )


head_view(sentence, tokens, weights, visible, causal)

st.subheader("All heads side by side")
st.markdown(
    "Multi-head attention runs these heads in parallel on the same tokens: one engine call "
    "with `Q, K, V` of shape (heads, tokens, d_k). Each head asks its own question."
)
columns = st.columns(3)
labelled = n <= 12
panel_px = ui.cell_px(n, 1 / 3, largest=11, chrome=ui.HEATMAP_CHROME_PX if labelled else 90)
for index, name in enumerate(heads.HEAD_NAMES):
    with columns[index % 3]:
        ui.chart(
            st,
            charts.heatmap(
                weights[index],
                words,
                visible=visible,
                title=name,
                cell_px=panel_px,
                show_labels=labelled,
            ),
            key=f"heads_panel_{index}",
        )
