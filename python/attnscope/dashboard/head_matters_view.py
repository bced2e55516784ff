"""The Real model page's view "Does this head matter?": where SmolLM2's heads look from "she",
and what removing or patching each one does to the word the model writes next.

The computing is in :mod:`attnscope.dashboard.head_matters`, the charts in
:mod:`attnscope.dashboard.head_matters_charts`; this module only lays them out.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from attnscope.reference import visibility

from . import head_matters as hm
from . import head_matters_charts, model_charts, ui
from . import real_model as rm
from .charts import grouped_bars

PREFIX = "real_model_matter"
TARGETS = {hm.PREDICTION: "what the model predicts", "nurse": "nurse", "doctor": "doctor"}
ABLATIONS = {"zero": "zero (the head writes nothing)", "mean": "mean (its average output)"}


def show(load: Callable[[str], object]) -> None:
    """The whole view; `load(name)` returns the model or None after saying why it is missing."""
    st.markdown(
        "The other views show where each head looks. This one asks whether the model *uses* "
        "what a head finds: remove the head (ablation) and see what happens to the next word, "
        "or copy the head's output from the *she* sentence into the *he* sentence (patching) "
        "and see how much of the answer comes back."
    )
    model = load(hm.MODEL)
    if model is None:
        return
    text, target, ablation = controls()
    bar = st.empty()

    def progress(done: float, label: str) -> None:
        bar.progress(min(done, 1.0), text=f"Ablating and patching every head: {label}…")

    try:
        analysis = ui.cached_analysis(hm.MODEL, text, target, progress)
    except ValueError as problem:  # the page's ReadingError, or a text the model refuses
        st.error(rm.plain(str(problem)))
        return
    finally:
        bar.empty()
    summary(model, analysis)
    chosen = chosen_head(analysis)
    scatter_section(analysis, ablation, chosen)
    patching_section(analysis)
    head_section(model, analysis, ablation)
    st.subheader("What this does and does not show")
    st.markdown(
        "Attention is not explanation: a head's weights say where it reads, not whether what "
        "it reads reaches the answer, because the output projection mixes it with every other "
        "head and the later layers may ignore it. Ablation asks the causal question directly, "
        "but only for this sentence, this target and this way of removing the head: a head "
        "whose job other heads take over looks unimportant, and zero and mean ablation need "
        "not agree (see above where they part)."
    )


def controls() -> tuple[str, str, str]:
    key = f"{PREFIX}_text"
    st.session_state.setdefault(key, hm.SENTENCE)
    text = st.text_input("Sentence", key=key, max_chars=400)
    buttons = st.columns([1, 1, 3])
    buttons[0].button(
        "Swap she ↔ he",
        key=f"{PREFIX}_swap",
        on_click=_swap_pronoun,
        disabled=hm.swap_pronoun(text) is None,
    )
    buttons[1].button(
        "The chapter's sentence",
        key=f"{PREFIX}_reset",
        on_click=lambda: st.session_state.__setitem__(key, hm.SENTENCE),
    )
    choices = st.columns(2)
    label = "Target: the next word whose log-probability is measured"
    target = _radio(choices[0], label, TARGETS, "target")
    ablation = _radio(choices[1], "Ablation", ABLATIONS, "ablation")
    return text, target, ablation


def _radio(container, label: str, options: dict[str, str], name: str) -> str:
    """A row of radio buttons over `options` (value -> what it shows), keyed by `name`."""
    return container.radio(
        label, list(options), key=f"{PREFIX}_{name}", format_func=options.get, horizontal=True
    )


def _swap_pronoun() -> None:
    key = f"{PREFIX}_text"
    swapped = hm.swap_pronoun(st.session_state.get(key, ""))
    if swapped is not None:
        st.session_state[key] = swapped


def summary(model, analysis: hm.Analysis) -> None:
    logits = analysis.trace.logits[-1]
    probabilities = hm.probabilities(logits)
    top = int(logits.argmax())
    numbers = st.columns(3)
    numbers[0].metric(
        "SmolLM2 predicts",
        hm.token_label(model, top),
        f"p = {probabilities[top]:.2f}",
        delta_color="off",
    )
    numbers[1].metric(
        "Target",
        analysis.target_label,
        f"p = {probabilities[analysis.target]:.2f}",
        delta_color="off",
    )
    numbers[2].metric(
        "Heads ablated, one at a time",
        f"{len(analysis.table)} × 2",
        "zero and mean",
        delta_color="off",
    )


def chosen_head(analysis: hm.Analysis) -> tuple[int, int]:
    """The head the pickers show: after another text or target, or once the pickers were off
    the page (another view, or an error; Streamlit then forgets them), the one that looks
    hardest."""
    marker = (tuple(analysis.trace.ids.tolist()), analysis.target)
    pickers = (f"{PREFIX}_layer", f"{PREFIX}_head")
    forgotten = any(key not in st.session_state for key in pickers)
    if forgotten or st.session_state.get(f"{PREFIX}_seen") != marker:
        st.session_state[f"{PREFIX}_seen"] = marker
        best = analysis.table.loc[analysis.table["attention"].idxmax()]
        st.session_state[f"{PREFIX}_layer"] = int(best["layer"])
        st.session_state[f"{PREFIX}_head"] = int(best["head"])
    return st.session_state[f"{PREFIX}_layer"], st.session_state[f"{PREFIX}_head"]


def follow_pick(event, chart: str) -> None:
    """A new click on a chart moves the head pickers to the clicked head."""
    points = (event or {}).get("selection", {}).get("pick") or []
    if not points:
        return
    picked = (int(points[0].get("layer", -1)), int(points[0].get("head", -1)))
    if picked == st.session_state.get(f"{PREFIX}_{chart}_seen"):
        return
    st.session_state[f"{PREFIX}_{chart}_seen"] = picked
    st.session_state[f"{PREFIX}_layer"], st.session_state[f"{PREFIX}_head"] = picked
    st.rerun()


def scatter_section(analysis: hm.Analysis, ablation: str, chosen: tuple[int, int]) -> None:
    table = analysis.table
    source, noun, target = analysis.source_word, analysis.looked_at_word, analysis.target_label
    st.subheader("Looking is not mattering")
    event = st.altair_chart(
        head_matters_charts.effect_scatter(
            table,
            ablation,
            chosen,
            title=f"Every head: attention {source} → {noun} against the effect of removing it",
            x_title=f"attention weight {source} → {noun}",
            y_title=f"change of log p({target}), {ablation} ablation",
        ),
        key=f"{PREFIX}_scatter",
        on_select="rerun",
        selection_mode="pick",
        width="stretch",
    )
    follow_pick(event, "scatter")
    looker = table.loc[table["attention"].idxmax()]
    st.markdown(
        rm.plain(
            f"Removing one head moves log p({target}) most for: "
            f"{hm.top_heads(table, ablation, largest=False)} (below 0: the head helped). "
            f"The head that looks hardest from {source} to {noun}, layer {int(looker['layer'])} "
            f"head {int(looker['head'])} ({looker['attention']:.0%} of its weight), changes it "
            f"by {looker[ablation]:+.2f}."
        )
    )
    st.caption(rm.plain(hm.disagreement(table)) + " Click a point to open that head below.")


def patching_section(analysis: hm.Analysis) -> None:
    st.subheader("Patching: which heads carry she → nurse?")
    if analysis.patching is None:
        st.info(rm.plain(analysis.patch_note))
        return
    first, second = analysis.patch_pair
    st.markdown(
        rm.plain(
            f'Run the swapped sentence ("{analysis.counterfactual}") and copy one head\'s '
            f"output from the original. A cell is the share of the original's preference for "
            f"{first} over {second} (logit difference) that this one head brings back: 1 is "
            "all of it, 0 nothing."
        )
    )
    event = st.altair_chart(
        head_matters_charts.patching_grid(
            analysis.patching, title=f"Share of the {first}-vs-{second} difference restored"
        ),
        key=f"{PREFIX}_grid",
        on_select="rerun",
        selection_mode="pick",
        width="content",
    )
    follow_pick(event, "grid")
    st.caption(
        rm.plain(f"Heads that restore the most: {hm.top_heads(analysis.patching, 'share')}.")
    )


def head_section(model, analysis: hm.Analysis, ablation: str) -> None:
    st.subheader("One head")
    pickers = st.columns(2)
    layer = pickers[0].selectbox("Layer", range(model.num_layers), key=f"{PREFIX}_layer")
    head = pickers[1].selectbox("Head", range(model.num_heads), key=f"{PREFIX}_head")
    row = analysis.table[(analysis.table["layer"] == layer) & (analysis.table["head"] == head)]
    numbers = st.columns(3)
    target = analysis.target_label
    numbers[0].metric(f"Zero ablation: log p({target})", f"{float(row['zero'].iloc[0]):+.3f}")
    numbers[1].metric(f"Mean ablation: log p({target})", f"{float(row['mean'].iloc[0]):+.3f}")
    if analysis.patching is not None:
        share = analysis.patching
        share = share[(share["layer"] == layer) & (share["head"] == head)]["share"]
        numbers[2].metric("Patching restores", f"{float(share.iloc[0]):+.1%}")
    tokens = analysis.tokens
    n = len(tokens)
    ui.chart(
        st,
        model_charts.labelled_heatmap(
            analysis.trace.attentions[layer, head],
            rm.block_labels(tokens, range(n), 1),
            rm.block_labels(tokens, range(n), 1),
            visible=visibility(n, n, is_causal=True),
            title=f"Layer {layer}, head {head}: where each token looks",
        ),
        key=f"{PREFIX}_map",
    )
    after = ui.cached_next_tokens(
        hm.MODEL, tuple(analysis.trace.ids.tolist()), layer, head, ablation
    )
    bars = after.melt(id_vars="token", var_name="run", value_name="probability")
    bars["run"] = bars["run"].map({"before": "with the head", "after": f"{ablation} ablated"})
    ui.chart(
        st,
        grouped_bars(
            bars,
            "token",
            "probability",
            "run",
            title=f"Next token with and without layer {layer}, head {head}",
            y_title="probability",
        ),
        key=f"{PREFIX}_bars",
    )
