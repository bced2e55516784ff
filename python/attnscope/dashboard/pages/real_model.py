"""Page: trained models on the engine. Every head of one model, the two regimes side by side
(MiniLM reads both ways, SmolLM2 only backwards), and SmolLM2 writing through its KV cache."""

import attnscope
import attnscope.models as am
import numpy as np
import streamlit as st
from attnscope.dashboard import generation, head_matters_view, model_charts, ui
from attnscope.dashboard import real_model as rm

LOCAL_FOLDER = "A local folder…"
VIEWS = ("Every head", "Regimes on trained heads", "Generate", "Does this head matter?")
DEFAULT_PROMPT = "Why does a language model only look at the words before the current one?"
# The page's main controls live in the URL (their keys are the parameters' names), so a link
# opens the page as its sender saw it.
URL = ui.URL


def reset_on_new_tokens(prefix: str, tokens: list[str], defaults: dict[str, int]) -> None:
    """Another model or text: positions mean other tokens now, so the pickers start again."""
    if st.session_state.get(f"{prefix}_tokens") != tokens:
        st.session_state[f"{prefix}_tokens"] = tokens
        for name, value in defaults.items():
            st.session_state[f"{prefix}_{name}"] = value


def head_search(prefix: str, reading) -> rm.HeadSearch:
    """Source and target pickers and the most specific head between them."""
    reset_on_new_tokens(
        prefix,
        reading.tokens,
        dict(zip(("source", "target"), rm.default_pair(reading.tokens), strict=True)),
    )
    finders = st.columns(2)
    source = ui.token_picker(finders[0], "Source (looking)", reading.tokens, f"{prefix}_source")
    target = ui.token_picker(finders[1], "Target (looked at)", reading.tokens, f"{prefix}_target")
    search = rm.find_heads(reading, source, target)
    source_word, target_word = rm.plain(reading.tokens[source]), rm.plain(reading.tokens[target])
    if search.target_hidden:
        st.info(
            f"In a causal model '{source_word}' cannot see '{target_word}', which comes later: "
            "every head gives it 0. Pick a target before the source."
        )
    layer, head, weight = search.best
    st.metric(
        f"Most specific head for {source_word} → {target_word}",
        f"layer {layer}, head {head}",
        f"{source_word} gives it {weight:.3f}, the other tokens {search.best_others:.3f} on "
        f"average (spread evenly: {search.uniform:.3f})",
        delta_color="off",
    )
    return search


def counterfactual_buttons(container, text_key: str) -> None:
    """One button per word pair of rm.COUNTERFACTUALS, exchanging the pair in the text."""

    def swap(first: str, second: str) -> None:
        st.session_state[text_key] = rm.swap_words(st.session_state[text_key], first, second)

    buttons = container.columns(len(rm.COUNTERFACTUALS))
    for button, (first, second) in zip(buttons, rm.COUNTERFACTUALS, strict=True):
        button.button(
            f"{first} ↔ {second}",
            key=f"{text_key}_swap_{first}_{second}",
            on_click=swap,
            args=(first, second),
            help=f"The counterfactual: the same text with every '{first}' and '{second}' "
            "exchanged. A head that tracks who the pronoun means should move its weight; one "
            "that looks at a position or a word whatever the sentence says should not.",
        )


def every_head_view() -> None:
    names = rm.model_names()
    if rm.local_models_allowed():
        names.append(LOCAL_FOLDER)
    controls = st.columns([2, 3])
    choice = controls[0].selectbox(
        "Model",
        names,
        key="real_model_name",
        bind=URL,
        help="all-MiniLM-L6-v2 (bidirectional encoder) and SmolLM2-135M-Instruct (causal "
        "language model) ship in pip packages and run offline; gpt2 and distilgpt2 come from "
        f"the Hugging Face hub when online. Reading a model from a folder on the server is off "
        f"unless the server was started with {rm.LOCAL_MODELS_VARIABLE}=1.",
    )
    source = choice
    if choice == LOCAL_FOLDER:
        source = controls[0].text_input(
            "Folder (Hugging Face layout: config.json, model.safetensors, tokenizer.json)",
            key="real_model_folder",
        )
        if not source.strip():
            st.info("Type the path of a folder holding a BERT or GPT-2 checkpoint.")
            return
    st.session_state.setdefault("real_model_text", rm.PRONOUN_SENTENCE)
    text = controls[1].text_area(
        "Text", key="real_model_text", height=80, max_chars=50_000, bind=URL
    )
    counterfactual_buttons(controls[1], "real_model_text")
    local = choice == LOCAL_FOLDER
    model = ui.load(source, any_error=local)
    reading = model and ui.shielded(lambda: ui.cached_reading(source, text), any_error=local)
    table = reading and ui.shielded(lambda: ui.cached_head_table(source, text), any_error=local)
    if table is None:
        return
    kind = (
        "causal: each token sees only the ones before it" if reading.is_causal else "bidirectional"
    )
    st.caption(
        f"{rm.plain(model.name)}: {model.num_layers} layers × {model.num_heads} heads, {kind}; "
        f"{reading.n} tokens (this page reads up to {rm.token_limit(model)})."
    )
    grid_section(model, table)
    one_head_section(model, reading, table)
    st.subheader("Find the head")
    st.markdown(
        "Pick the token that is looking (the source, say *she*) and the token it should find "
        "(the target, say *nurse*). A head can give the target a large weight from every token "
        "(it looks at *nurse* whatever is asking), so weight alone proves little. Every head "
        "is ranked by **specificity**: the source's weight on the target minus the mean weight "
        "the other tokens give it. Then press a swap button above the text: in the "
        "counterfactual sentence, does the winner still point the pronoun at the same noun?"
    )
    search = head_search("real_model", reading)
    source_word = rm.plain(reading.tokens[search.source])
    target_word = rm.plain(reading.tokens[search.target])
    st.dataframe(
        search.ranking.head(10)[["rank", "layer", "head", "specificity", "weight", "others"]],
        hide_index=True,
        key="real_model_ranking",
        column_config={
            "specificity": st.column_config.NumberColumn(format="%.3f"),
            "weight": st.column_config.NumberColumn(
                f"{source_word} → {target_word}", format="%.3f"
            ),
            "others": st.column_config.NumberColumn(
                f"other tokens → {target_word} (mean)", format="%.3f"
            ),
        },
    )


def grid_section(model, table) -> None:
    st.subheader("Every head at a glance")
    statistic = st.selectbox(
        "Colour the heads by",
        list(am.STATISTICS),
        key="real_model_statistic",
        bind=URL,
        format_func=lambda name: name.replace("_", " "),
    )
    st.caption(f"**{statistic.replace('_', ' ')}**: {rm.STATISTIC_HELP[statistic]}.")
    grid_event = st.altair_chart(
        model_charts.head_grid(table, statistic),
        key="real_model_grid",
        on_select="rerun",
        selection_mode="pick",
        width="content",
    )
    follow_grid_click(grid_event, model.num_layers, model.num_heads)
    st.caption(
        f"Dominant behaviour per head: {rm.label_counts(table)}. Click a cell to open that head."
    )


def one_head_section(model, reading, table) -> None:
    st.subheader("One head")
    layer, head = ui.layer_and_head("real_model", model.num_layers, model.num_heads)
    head_heatmap(reading, layer, head)
    label, statistics = rm.head_summary(table, layer, head)
    st.metric("Behaviour", label)
    st.caption(
        "Whichever of previous token, next token, self, sink or induction takes at least half "
        "the weight; failing that, local (1.5 tokens away or less on average), broad (spread "
        "nearly evenly) or mixed."
    )
    st.dataframe(
        statistics,
        hide_index=True,
        key="real_model_head_stats",
        column_config={"value": st.column_config.NumberColumn(format="%.3f")},
    )


def head_heatmap(reading, layer: int, head: int) -> None:
    """One head's map (in blocks of tokens when the text is long) and one query's full row."""
    tokens = reading.tokens
    ui.draw_map(
        reading.attentions[layer, head],
        reading.visible(),
        tokens,
        tokens,
        title=f"Layer {layer}, head {head}",
        key="real_model_heatmap",
    )
    if reading.is_causal:
        st.caption("Grey cells are hidden by the causal mask: no token sees its future.")
    reset_on_new_tokens("real_model_row", tokens, {"query": rm.default_pair(tokens)[0]})
    query = ui.token_picker(st, "Where one query looks", tokens, "real_model_row_query")
    seen = np.flatnonzero(reading.visible()[query])
    ui.chart(
        st,
        model_charts.key_bars(
            reading.attentions[layer, head, query, seen],
            rm.block_labels(tokens, seen, 1),
            title=f"Layer {layer}, head {head}: where '{tokens[query]}' looks",
            show_labels=len(seen) <= 64,
        ),
        key="real_model_row_bars",
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


def regimes_view() -> None:
    st.markdown(
        "The same sentence, read by two trained models. MiniLM is an encoder: every token sees "
        "the whole sentence. SmolLM2 is a causal language model: a token sees only itself and "
        "what came before, so the upper-right triangle of its maps is grey. Each side ranks "
        "its own heads by how much more the source token looks at the target than the other "
        "tokens do (specificity); the map shows the winner."
    )
    st.session_state.setdefault("real_model_regimes_text", rm.PRONOUN_SENTENCE)
    sentence = st.text_input("Sentence", key="real_model_regimes_text", max_chars=2_000, bind=URL)
    counterfactual_buttons(st, "real_model_regimes_text")
    columns = st.columns(2)
    for column, name, regime in zip(
        columns, (rm.BIDIRECTIONAL_MODEL, rm.CAUSAL_MODEL), ("bidirectional", "causal"), strict=True
    ):
        with column:
            st.subheader(f"{name}: {regime}")
            regime_column(name, regime, sentence)


def regime_column(name: str, regime: str, sentence: str) -> None:
    model = ui.load(name)
    reading = model and ui.shielded(
        lambda: ui.cached_reading(name, sentence, rm.REGIMES_MAX_TOKENS)
    )
    if reading is None:
        return
    search = head_search(f"real_model_{regime}", reading)
    layer, head, _ = search.best
    ui.draw_map(
        reading.attentions[layer, head],
        reading.visible(),
        reading.tokens,
        reading.tokens,
        title=f"{name}: layer {layer}, head {head}",
        key=f"real_model_{regime}_heatmap",
        width_px=330,
    )
    reverse = rm.find_heads(reading, search.target, search.source)
    words = rm.plain(reading.tokens[search.target]), rm.plain(reading.tokens[search.source])
    hidden = (
        " (every head gives 0: the mask hides the later token)" if reverse.target_hidden else ""
    )
    st.caption(
        f"The other way round, {words[0]} → {words[1]}: the most specific head gives "
        f"{reverse.best[2]:.3f}{hidden}."
    )


def generate_view() -> None:
    st.markdown(
        "SmolLM2 writes one token at a time. The first step reads the whole prompt and stores "
        "every token's keys and values in a cache, one per layer; each later step feeds only "
        "the token just written, which attends over everything cached. Nothing is computed "
        "twice, so the cache grows by one token per step while each step stays cheap."
    )
    model = ui.load(rm.CAUSAL_MODEL)
    if model is None:
        return
    settings = st.columns([2, 1, 2])
    mode = settings[0].radio(
        "The prompt is",
        generation.MODES,
        key="real_model_gen_mode",
        bind=URL,
        horizontal=True,
        format_func={"chat": "a chat message", "continue": "text to continue"}.get,
    )
    max_new_tokens = settings[1].number_input(
        f"New tokens (1–{generation.MAX_NEW_TOKENS})",
        value=32,
        step=1,
        key="real_model_gen_tokens",
        bind=URL,
    )
    temperature = settings[2].slider(
        "Temperature (0: always the likeliest token)",
        0.0,
        1.5,
        0.0,
        0.1,
        key="real_model_gen_temperature",
        bind=URL,
        help="Above 0 the next token is drawn at random, likelier tokens more often; the draw "
        "is seeded, so the same settings write the same text.",
    )
    prompt = st.text_area(
        "Prompt", DEFAULT_PROMPT, key="real_model_gen_prompt", height=80, max_chars=5_000, bind=URL
    )
    clicked = st.button("Generate", key="real_model_generate", type="primary")
    answer = st.empty()
    if clicked:
        stream(model, prompt, mode, max_new_tokens, temperature, answer)
    replay = st.session_state.get("real_model_replay")
    if replay is None:
        st.info("Press Generate: the answer appears token by token, then its replay below.")
        return
    answer.code(replay.text, language=None, wrap_lines=True)
    show_replay(replay)
    cache_section(model, replay)


def stream(model, prompt: str, mode: str, max_new_tokens, temperature: float, answer) -> None:
    try:
        request = generation.prepare(
            model, prompt, mode=mode, max_new_tokens=max_new_tokens, temperature=temperature
        )
    except ValueError as problem:
        st.error(rm.plain(str(problem)))
        return
    progress = st.progress(0.0, text="Reading the prompt…")

    def show(replay: generation.Replay) -> None:
        answer.code(replay.text, language=None, wrap_lines=True)
        done = replay.steps / request.max_new_tokens
        progress.progress(done, text=f"{replay.steps} of at most {request.max_new_tokens} tokens")

    try:
        st.session_state["real_model_replay"] = generation.run(model, request, on_step=show)
        st.session_state["real_model_request"] = request
        st.session_state.pop("real_model_recomputed", None)
    except ValueError as problem:
        st.error(rm.plain(str(problem)))
    progress.empty()


def prompt_reading_note(replay: generation.Replay) -> str:
    """What reading the prompt is, and its cost per token beside a decoding step's."""
    n = len(replay.prompt_tokens)
    per_token, step = replay.prompt_cost()
    note = (
        f"Reading the prompt is one causal pass: all {n} prompt tokens go through each layer "
        "together, each attending to itself and the tokens before it, and the last one's "
        f"output picks the first new token. It took {per_token:.1f} ms per prompt token"
    )
    if step is None:
        return note + "."
    note += (
        f"; a decoding step took {step:.1f} ms (median). The pass multiplies every weight "
        f"matrix by all {n} tokens at once, reading each weight once for all of them, while a "
        "step reads every weight for a single token"
    )
    if step >= 2 * per_token:
        return note + f": here a prompt token cost {step / per_token:.0f}× less than a new one."
    return note + (
        ", so per token the pass should cost less. Here it did not: that happens when the "
        "prompt is only a few tokens, or when the pass's matrix products, which split across "
        "threads, wait for cores busy with other work."
    )


def cache_section(model, replay: generation.Replay) -> None:
    """The same reply written again with no cache, timed beside the cached run."""
    st.subheader("With and without the cache")
    st.markdown(
        "Without a cache, each step must feed the whole sequence so far through every layer "
        "again, one causal pass, just to get the next token from its last position. The button "
        "writes this reply that way and times every step beside the cached run."
    )
    request = st.session_state.get("real_model_request")
    fed, seconds = generation.recompute_estimate(replay)
    if request is not None and st.button(
        "Write it again without the cache",
        key="real_model_recompute",
        help=f"Its {replay.steps} steps feed {fed:,} tokens through the layers in all, against "
        f"{len(replay.prompt_tokens) + replay.steps - 1:,} with the cache: at the prompt "
        f"read's pace, about {seconds:,.0f} s.",
    ):
        progress = st.progress(0.0, text="Reading the prompt again…")

        def show(recomputed: generation.Replay) -> None:
            progress.progress(
                recomputed.steps / replay.steps,
                text=f"Without the cache: {recomputed.steps} of {replay.steps} tokens",
            )

        recomputed = ui.shielded(
            lambda: generation.run(model, request, on_step=show, use_cache=False)
        )
        progress.empty()
        if recomputed is not None:
            st.session_state["real_model_recomputed"] = (replay, recomputed)
    kept = st.session_state.get("real_model_recomputed")
    if kept is None or kept[0] is not replay:
        return
    show_cache_comparison(replay, kept[1])


def show_cache_comparison(replay: generation.Replay, recomputed: generation.Replay) -> None:
    differs = generation.first_difference(replay, recomputed)
    if differs is not None:
        st.warning(
            f"The two runs part at step {differs}: they add the same numbers in a different "
            "order, and a difference in the last digits changed which token came out on top."
        )
    comparison = generation.cache_comparison(replay, recomputed)
    ratio = generation.decoding_ratio(comparison)
    numbers = st.columns(3)
    numbers[0].metric("Same tokens", "yes" if differs is None else "no")
    decoding = comparison.iloc[1:]
    numbers[1].metric(
        "Writing without the cache",
        f"{decoding['ms without'].sum():,.0f} ms" if ratio else "one token",
        f"with it: {decoding['ms with the cache'].sum():,.0f} ms" if ratio else None,
        delta_color="off",
    )
    numbers[2].metric("Times longer without", f"{ratio:.1f}×" if ratio else "—")
    charts_row = st.columns(2)
    ui.chart(charts_row[0], model_charts.cache_lines(comparison), key="real_model_cache_time")
    if ratio:
        ui.chart(charts_row[1], model_charts.ratio_line(comparison), key="real_model_cache_ratio")
    st.caption(
        "Step 0 is the same work both ways (reading the prompt). After it, a cached step feeds "
        "one token, whatever the length; a step without the cache feeds every token so far, "
        "so its time, and the ratio, grow with the sequence."
    )
    st.dataframe(
        comparison,
        hide_index=True,
        key="real_model_cache_table",
        column_config={
            name: st.column_config.NumberColumn(format="%.1f")
            for name in ("ms with the cache", "ms without", "times longer without")
        },
    )


def sink_note(replay: generation.Replay, layer: int, head: int, step: int) -> str:
    """The first token's share of the weight, measured, and why it is so large."""
    share = replay.first_token_share()
    top_layer, top_head = np.unravel_index(int(share.argmax()), share.shape)
    first = rm.plain(replay.cache_tokens()[0])
    return (
        f"The first cached token ({first}) gets {replay.attention[step][layer, head, 0]:.2f} "
        f"of this step's weight here, {share[layer, head]:.2f} in this head averaged over the "
        f"steps, {share.mean():.2f} averaged over all {share.size} heads and "
        f"{share.max():.2f} in the heaviest (layer {top_layer}, head {top_head}). It is an "
        "**attention sink**: softmax must hand out a total weight of 1 in every row, and a "
        "head with nothing useful to read at this step parks the rest on a token every query "
        "can see, whatever it says. A windowed cache that drops these first tokens sends the "
        "model's perplexity soaring (StreamingLLM's finding); the Sparse page's perplexity "
        "test keeps them as sinks."
    )


def show_replay(replay: generation.Replay) -> None:
    timing = replay.timing()
    rate = replay.decode_rate()
    numbers = st.columns(4)
    numbers[0].metric("Prompt tokens", len(replay.prompt_tokens))
    numbers[1].metric("Reading the prompt", f"{timing['milliseconds'].iloc[0]:.0f} ms")
    numbers[2].metric("Writing", f"{rate:.1f} tokens/s" if rate else "one token")
    numbers[3].metric("KV cache at the end", f"{replay.cache_nbytes[-1] / 2**20:.2f} MiB")
    st.caption(prompt_reading_note(replay))

    st.subheader("Replay: each new token's attention over the cache")
    opening = ui.shielded(lambda: ui.chapter_head(rm.CAUSAL_MODEL))
    layer, head = ui.layer_and_head(
        "real_model_replay", replay.num_layers, replay.num_heads, default=opening or (0, 0)
    )
    weights, visible = replay.head_rows(layer, head)
    ui.draw_map(
        weights,
        visible,
        replay.step_tokens(),
        replay.cache_tokens(),
        title=f"Layer {layer}, head {head}: a row per step, a column per cached token",
        key="real_model_replay_heatmap",
        width_px=720,
        row_title="step (the token it wrote)",
        col_title="cached token",
    )
    opens_on = (
        f" The replay opens on layer {opening[0]}, head {opening[1]}: in the chapter's "
        "sentence, the head where *she* looks at *nurse* most specifically (the Every head "
        "view's finder)."
        if opening
        else ""
    )
    st.caption(
        "Row 0 is the prompt's last token choosing the first new token; each row below has one "
        f"more cached token to look at. Grey cells were not in the cache yet.{opens_on}"
    )
    step = ui.bounded_slider(
        st, "Step", 0, replay.steps - 1, replay.steps - 1, "real_model_replay_step"
    )
    seen = int(visible[step].sum())
    ui.chart(
        st,
        model_charts.key_bars(
            weights[step, :seen],
            rm.block_labels(replay.cache_tokens(), range(seen), 1),
            groups=replay.key_groups()[:seen],
            title=f"Step {step} wrote '{generation.piece_label(replay.pieces[step])}': its weights",
            show_labels=seen <= 64,
        ),
        key="real_model_replay_bars",
    )
    st.caption(sink_note(replay, layer, head, step))
    charts_row = st.columns(2)
    ui.chart(
        charts_row[0],
        model_charts.step_lines(
            timing, "milliseconds", title="Time per step", y_title="ms", log_y=True
        ),
        key="real_model_replay_time",
    )
    ui.chart(
        charts_row[1],
        model_charts.step_lines(
            timing, "cache KiB", title="KV cache after each step", y_title="KiB"
        ),
        key="real_model_replay_cache",
    )
    st.dataframe(timing, hide_index=True, key="real_model_replay_table")


st.title("Real model: trained heads")
st.markdown(
    "The other pages build heads by hand. Here trained transformers read your text: their "
    "embeddings, norms and MLPs run in NumPy, and every attention head runs on the attnscope "
    "engine. No head below was designed; each learned its pattern in training."
)
if not attnscope.core_available():
    st.error(
        "This page runs trained models on the compiled attnscope engine, which could not be "
        "imported here. Build it with `make build`."
    )
    st.stop()
view = st.radio(
    "Show", VIEWS, key="real_model_view", horizontal=True, label_visibility="collapsed", bind=URL
)
if view == VIEWS[0]:
    every_head_view()
elif view == VIEWS[1]:
    regimes_view()
elif view == VIEWS[2]:
    generate_view()
else:
    head_matters_view.show(ui.load)
