"""Page: the chapter's story in eight steps, each with a small live result and a link to the
page and control that explores it."""

import pandas as pd
import streamlit as st
from attnscope.dashboard import charts, story, ui

PAGES = "python/attnscope/dashboard/pages"

st.title("Start here: attention in eight steps")
st.markdown(
    "The chapter's argument, one step at a time. Each step says the idea in a sentence or "
    "two, shows a small result the engine just computed on this machine, and links to the "
    "page where you can change it yourself. Unfamiliar words are in the **Glossary** in the "
    "sidebar, on every page."
)
ui.engine_banner()
results = ui.story_results()


def step(number: int, title: str):
    """A step's heading and its two columns: words and link on the left, result on the right."""
    st.subheader(f"{number} · {title}")
    return st.columns([3, 2], gap="large")


def link(column, page: str, label: str, **query_params: str) -> None:
    column.page_link(
        f"{PAGES}/{page}", label=label, icon=":material/arrow_forward:", query_params=query_params
    )


# 1 · The bottleneck attention removes
pronoun = results["pronoun"]
words_column, result_column = step(1, "The bottleneck attention removes")
words_column.markdown(
    "Before 2017, language models read a text word by word through one hidden vector that "
    "every word updates: whatever 'she' needs from 'nurse' has to survive "
    f"{pronoun['distance']} updates here, and thousands in a long document, while the "
    "model cannot work on word 100 before word 99. Attention drops the recurrence: every "
    "token looks directly at every other, all at once. In the chapter's sentence, a "
    f"hand-built coreference head sends 'she' straight to 'nurse' with weight "
    f"{pronoun['weight']:.2f} (it goes by word class and distance; a trained head learns "
    "meaning)."
)
link(words_column, "heads.py", "Heads: who looks at whom", heads_head="Coreference")
ui.chart(
    result_column,
    charts.row_bars(pronoun["row"], pronoun["words"], title="Where 'she' looks"),
    key="start_pronoun",
)

# 2 · Q, K and V
qkv = results["qkv"]
words_column, result_column = step(2, "Query, key, value")
words_column.markdown(
    "Each token's embedding `x` is multiplied by three learned matrices: `Q = x·W_Q` is the "
    "question it asks, `K = x·W_K` the label it shows, `V = x·W_V` the content it hands "
    "over. Each query is compared with every key; softmax turns the scores into weights, "
    "and the token's new vector is the weighted blend of the values."
)
link(words_column, "inside.py", "Inside one head: every matrix of one head")
ui.chart(
    result_column,
    charts.heatmap(qkv.weights, list(story.QKV_WORDS), visible=qkv.visible, cell_px=30),
    key="start_qkv",
)

# 3 · √d_k
saturation = results["saturation"]
words_column, result_column = step(3, "Why divide by √d_k")
words_column.markdown(
    f"A score adds up d_k products, so wide heads give huge scores. At d_k = {story.WIDE_HEAD} "
    "without the factor, softmax puts almost all of a row's weight on one key and its "
    "gradient, the signal learning needs, shrinks. Dividing by √d_k keeps their spread near 1."
)
link(
    words_column,
    "inside.py",
    f"Inside one head at d_k = {story.WIDE_HEAD}, unscaled",
    inside_d_k=str(story.WIDE_HEAD),
    inside_scaling="no scaling",
)
link(
    words_column,
    "learning.py",
    "Learning: train with and without √d_k",
    learning_mode="Compare with and without √d_k",
)
ui.note_metric(
    result_column,
    "Largest weight of a row, unscaled",
    f"{saturation['unscaled']:.2f}",
    f"{saturation['scaled']:.2f} with ÷ √d_k",
)
ui.note_metric(
    result_column,
    "Softmax gradient, unscaled",
    f"{saturation['unscaled gradient']:.3f}",
    f"{saturation['scaled gradient']:.3f} with ÷ √d_k",
)

# 4 · Heads
subject, weight = results["subject"]
words_column, result_column = step(4, "Many heads, many questions")
words_column.markdown(
    "One set of questions is not enough: a token may need its subject, its referent and "
    "its neighbours at once. A layer runs several heads in parallel, each with its own "
    "matrices. Trained models grow heads for local context, syntax, coreference and "
    "patterns nobody has named; on the Learning page you can watch two of them appear."
)
link(words_column, "heads.py", "Heads: the subject ↔ verb head", heads_head="Subject ↔ verb")
link(words_column, "learning.py", "Learning: heads emerge")
ui.note_metric(
    result_column, "'sleeps' looks at (subject ↔ verb head)", subject, f"weight {weight:.2f}"
)

# 5 · Causal vs bidirectional
edit = results["edit"]
words_column, result_column = step(5, "Causal or bidirectional")
words_column.markdown(
    "BERT-style encoders let every token see the whole sentence. Generators (GPT, Claude, "
    "Llama) use a causal mask: a token sees only what came before it, so the model must "
    "predict the next word rather than read it. Replace 'nurse' by 'teacher' in the "
    "chapter's sentence and count the rows before the edit that move:"
)
link(words_column, "regimes.py", "Causal vs bidirectional: edit a later word")
cells = result_column.columns(2)
cells[0].metric("causal rows moved", edit["causal before the edit"])
cells[1].metric("bidirectional rows moved", f"{edit['bidirectional']} of {edit['rows']}")

# 6 · Cost
pairs = results["pairs"]
words_column, result_column = step(6, "Attention is the main bottleneck")
words_column.markdown(
    "Every query scores every key: n tokens make about n² pairs, so doubling the context "
    f"quadruples the work (causal pairs at 2,048 tokens: {pairs['n']:,}; at 4,096: "
    f"{pairs['2n']:,}, ×{pairs['2n'] / pairs['n']:.2f}). The rest of a layer grows only "
    f"linearly, so at long contexts attention dominates. The chart counts the operations of "
    f"a layer {story.LAYER_WIDTH:,} wide, per token: 4·width per key it attends to (n/2 on "
    "average under a causal mask), against 24·width² for its four projections and a "
    "feed-forward block four times wider."
)
link(words_column, "cost.py", "Cost of context: time it on this machine")
lengths = [2**p for p in range(9, 19)]
share = pd.DataFrame(
    {
        "n": lengths,
        "share": [story.attention_share(n) for n in lengths],
        "layer": "causal attention",
    }
)
ui.chart(
    result_column,
    charts.lines(
        share,
        "n",
        "share",
        "layer",
        title="Attention's share of a layer's arithmetic",
        x_title="context length n (log)",
        y_title="share",
        y_format=".0%",
    ),
    key="start_share",
)

# 7 · The tricks that reach 200,000 tokens
memory = results["memory"]
words_column, result_column = step(7, "The tricks that reach 200,000 tokens")
words_column.markdown(
    f"At 200,000 tokens one head's score matrix and its weights alone would take "
    f"{memory['materialised']}. FlashAttention walks the keys in blocks with a running "
    f"maximum and sum and never stores them ({memory['tiled']} for q, k, v and the output). "
    f"A sliding window of {story.LONG_WINDOW:,} keys cuts the causal pairs from "
    f"{pairs['long causal']:,} to {pairs['long window']:,}; sparse patterns skip whole tiles."
)
link(words_column, "inside.py", "Inside one head: step through FlashAttention")
link(words_column, "sparse.py", "Sparse attention: windows, sinks and tiles")
cells = result_column.columns(2)
cells[0].metric("n×n matrices at 200k", memory["materialised"])
cells[1].metric("tiled kernel at 200k", memory["tiled"])

# 8 · The KV cache
cache_gap = results["cache"]
words_column, result_column = step(8, "The KV cache")
words_column.markdown(
    "A causal model never changes its past rows, so while it writes it can keep every "
    "earlier token's keys and values and compute only the new token's. Each step then reads "
    "the cache once instead of recomputing the whole sequence; the price is memory that "
    "grows with every token, which grouped-query heads and smaller storage shrink."
)
link(words_column, "cost.py", "Cost of context: the KV cache's memory")
link(words_column, "real_model.py", "Real model: generate through the cache")
if cache_gap is None:
    result_column.info("The KV cache needs the compiled engine.")
else:
    ui.note_metric(
        result_column,
        "8 tokens through the cache vs recomputed",
        f"{cache_gap:.1e}",
        "largest difference (float32)",
    )
