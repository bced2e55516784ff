"""Page: what context length costs in time and memory, measured live on this machine."""

import contextlib
import os

import attnscope
import streamlit as st
from attnscope.dashboard import charts, cost, engine, ui

LONGEST_CHOICES = [512, 1_024, 2_048, 4_096, 8_192, 16_384, 65_536, 262_144]
BUDGET_CHOICES = [64, 128, 256, 512, 1_024]

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
    row = st.columns(4)
    longest = row[0].select_slider(
        "Longest context n", LONGEST_CHOICES, value=2_048, key="cost_longest"
    )
    head_dim = row[1].select_slider("Head dimension", [32, 64, 128], value=64, key="cost_dim")
    threads = row[2].slider(
        "Engine threads",
        1,
        cpu_count,
        min(engine.get_threads(), cpu_count),
        key="cost_threads",
        disabled=not engine.compiled_available(),
    )
    budget_mib = row[3].select_slider(
        "Memory budget (MiB)", BUDGET_CHOICES, value=256, key="cost_budget"
    )
    with_torch = st.checkbox(
        "Include PyTorch's scaled_dot_product_attention (importing it takes a few seconds)",
        value=False,
        key="cost_torch",
        disabled=not cost.torch_installed(),
        help=None if cost.torch_installed() else "PyTorch is not installed here.",
    )
    st.form_submit_button("Run sweep", key="cost_run", type="primary")

config = (longest, head_dim, threads, budget_mib, with_torch)
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
                memory_budget=budget_mib * 2**20,
                include_torch=with_torch,
                threads=threads,
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

fitted = cost.fits(frame)
ui.chart(
    st,
    charts.lines(
        cost.timeline(frame, fitted),
        "n",
        "seconds",
        "method",
        log_y=True,
        title="Time per call (one head, float32): measured, then extrapolated (dashed)",
        x_title="context length n (log)",
        y_title="seconds (log)",
        dashed="kind",
    ),
    key="cost_time_chart",
)
left, right = st.columns([2, 3])
left.dataframe(cost.exponents_table(fitted), hide_index=True, key="cost_exponents")
right.markdown(
    "Full attention should fit an exponent near 2; causal a little less at these lengths, "
    "as the blocks on its diagonal weigh more in a short context; a fixed window near 1, "
    f"because each token sees at most {cost.SWEEP_WINDOW} keys. The fit uses only n ≥ "
    f"{cost.FIT_MIN_N}: shorter calls mostly time fixed costs (Python, waking threads), not "
    "arithmetic. Each point is the fastest of a few runs, and NumPy's BLAS may use at most "
    f"the engine's {threads} thread(s). A busy machine still adds noise: run the sweep again "
    "if an exponent looks off."
)
for _, item in cost.stopped_methods(frame).iterrows():
    st.caption(f"{item['method']}: stopped at n = {item['n']:,} ({item['status']}).")

st.subheader("What 2,048 / 8,192 / 200,000 tokens would cost here")
projections = cost.projections_table(frame, memory_budget=budget_mib * 2**20)
st.dataframe(cost.projections_shown(projections), key="cost_projection_table")
st.caption(
    "\\* extrapolated from the fitted exponent, not measured: an estimate for this machine, one "
    "head, float32. † the naive path could not even hold its n×n matrices in the memory "
    "budget at that length. The CSV marks every extrapolated row."
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
naive_200k = cost.human_bytes(cost.naive_bytes(200_000))
st.caption(
    f"At 200,000 tokens the naive path would need {naive_200k} for one head of one layer; a "
    f"tiled kernel needs {cost.human_bytes(cost.tiled_bytes(200_000, head_dim))}."
)

st.subheader("KV cache: the memory a long context keeps")
row = st.columns([3, 1])
shape_name = row[0].selectbox("Model shape", list(cost.MODEL_SHAPES), key="cost_shape")
precision = row[1].radio(
    "Cache precision", ["16-bit", "8-bit"], horizontal=True, key="cost_precision"
)
shape = cost.MODEL_SHAPES[shape_name]
bytes_per_value = 2 if precision == "16-bit" else 1
kv = cost.kv_cache_frame(shape, list(cost.TARGET_LENGTHS), bytes_per_value)
st.dataframe(kv[["n", "size"]], hide_index=True, key="cost_kv_table")
st.caption(
    f"Per token: 2 (key and value) × {shape.layers} layers × {shape.kv_heads} kv heads × "
    f"{shape.head_dim} dims × {bytes_per_value} byte(s) = "
    f"{cost.human_bytes(cost.kv_cache_bytes(shape, 1, bytes_per_value))}. Grouped-query "
    "attention (fewer kv heads than query heads) is how large models keep this in check."
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
