"""Streamlit pieces every page shares: the engine banner and cached calls into the compute
modules (cached on plain arguments, so a rerun with the same controls costs nothing)."""

from __future__ import annotations

import streamlit as st

from . import engine, heads, inside, regimes, text


def engine_banner() -> None:
    """Say which implementation computes the page; warn loudly when it is the fallback."""
    message = engine.fallback_message()
    if message:
        st.warning(message, icon=":material/warning:")
    else:
        st.caption(
            f"Every number below is computed live by {engine.engine_name()} "
            f"on {engine.get_threads()} thread(s)."
        )


def chart(container, spec, key: str) -> None:
    """Draw an Altair chart: heatmaps at their natural size, lines and bars across the column."""
    stretch = getattr(spec, "width", None) == "container"
    container.altair_chart(spec, key=key, width="stretch" if stretch else "content")


def bounded_slider(container, label: str, low: int, high: int, value: int, key: str) -> int:
    """An integer slider whose range follows the sentence: a remembered value outside the new
    range is pulled back into it, and a range of one value shows a note instead."""
    if high <= low:
        container.caption(f"{label}: {low} (the sentence leaves no other choice)")
        return low
    if key in st.session_state:
        st.session_state[key] = min(max(st.session_state[key], low), high)
    return container.slider(label, low, high, min(max(value, low), high), key=key)


@st.cache_data(show_spinner=False, max_entries=256)
def head_weights(sentence: str, causal: bool):
    """Tokens (as text) and the ``(heads, n, n)`` weights of the designed heads."""
    tokens, note = text.tokenize(sentence)
    return tokens, note, heads.head_weights(tokens, causal=causal)


@st.cache_data(show_spinner=False, max_entries=256)
def head_scores(sentence: str, head_index: int):
    """One designed head's scaled scores for `sentence`."""
    tokens, _ = text.tokenize(sentence)
    return heads.head_scores(tokens, head_index)


@st.cache_data(show_spinner=False, max_entries=128)
def both_regimes(words: tuple[str, ...]):
    return regimes.both_regimes(list(words))


@st.cache_data(show_spinner=False, max_entries=128)
def edit_effect(words: tuple[str, ...], position: int, replacement: str):
    return regimes.edit_effect(list(words), position, replacement)


@st.cache_data(show_spinner=False, max_entries=128)
def alignment_weights(words: tuple[str, ...], num_queries: int):
    return regimes.alignment_weights(list(words), num_queries)


@st.cache_data(show_spinner=False, max_entries=128)
def window_weights(words: tuple[str, ...], window: int):
    return regimes.window_weights(list(words), window)


@st.cache_data(show_spinner=False, max_entries=128)
def gqa_weights(words: tuple[str, ...], query_heads: int, kv_heads: int):
    return regimes.gqa_weights(list(words), query_heads, kv_heads)


@st.cache_data(show_spinner=False, max_entries=128)
def one_head(words: tuple[str, ...], d_k: int, scaled: bool):
    return inside.one_head(list(words), d_k, scaled)


@st.cache_data(show_spinner=False, max_entries=16)
def saturation(d_values: tuple[int, ...]):
    return inside.saturation(d_values)
