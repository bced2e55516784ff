"""Benchmark rows and how they are shown: the markdown tables, the result files, and the docs.

The performance tables in README.md and docs/ are generated from the result files, never edited
by hand. Each sits between two markers:

    <!-- generated: KIND [rows=ID,ID,...] [file=NAME.json] -->
    ...
    <!-- end: generated -->

KIND is ``run`` (the machine, versions, date and limits of the run), ``brief`` (its date,
machine and threads in one line), ``table`` (every column), ``rows`` (a compact table),
``checks`` (how many targets were met, the largest float64 error), ``models`` (a
``bench_models.py`` result file: its run and table) or ``levels`` (the rows of every
``latest-LEVEL.json`` that ``bench.py --isa LEVEL`` wrote, side by side, each with its CPU and
the SGEMM roof measured at the same instruction set). ``rows=`` picks and orders rows by id;
``file=`` names a file in benchmarks/results (default ``latest.json``).

    python benchmarks/report.py --docs            # rewrite the blocks from the result files
    python benchmarks/report.py --docs --check    # exit 1 if any block differs from them
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import instruction_sets

__all__ = [
    "DOC_FILES",
    "PEERS",
    "RESULTS_DIR",
    "Row",
    "describe_limits",
    "format_seconds",
    "generated_block",
    "markdown_report",
    "markdown_table",
    "render_docs",
    "results_stem",
    "rows_to_json",
    "update_docs",
    "write_results",
]

# Table columns for the contenders, in order: result key -> column title.
PEERS = {"attnscope": "attnscope", "torch": "torch", "numpy": "NumPy naive"}

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
# The files whose generated blocks `--docs` rewrites.
DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


@dataclass
class Row:
    """One line of the benchmark table.

    Attributes:
        id: stable key, e.g. ``"dense_causal_h8"``.
        label: what was run, e.g. ``"B1 H8 L=S=4096 D64 causal"``.
        target: the goal in words, e.g. ``">= 1.15x torch"``.
        cells: per contender in :data:`PEERS`, the median seconds per call, or a short reason
            why there is no time (``"n/a (no torch)"``, ``"skipped: would need 8.0 GiB"``).
        gflops: attnscope's rate, counting only visible (query, key) pairs.
        result: the measured value that is compared with the target, in words.
        metrics: the same values as numbers (ratio, bandwidth, ...), for the JSON file.
        met: whether the target is met; None when it cannot be measured here.
        max_rel_error: attnscope's max error against float64, relative to the largest output.
        verdict: ``"PASS"``, ``"FAIL"``, ``"FAIL (error)"`` or ``"n/a (...)"``.
        notes: how the row was run (torch backend, which API, sampling of the error check).
    """

    id: str
    label: str
    target: str
    cells: dict[str, float | str] = field(default_factory=dict)
    gflops: float | None = None
    result: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    met: bool | None = None
    max_rel_error: float | None = None
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def format_seconds(seconds: float | str | None) -> str:
    """``12.3 µs`` / ``4.56 ms`` / ``1.23 s``; strings (reasons) pass through unchanged."""
    if seconds is None:
        return "—"
    if isinstance(seconds, str):
        return seconds
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _format_error(error: float | None) -> str:
    return "—" if error is None else f"{error:.1e}"


def _format_gflops(gflops: float | None, sgemm_gflops: float | None) -> str:
    if gflops is None:
        return "—"
    if not sgemm_gflops:
        return f"{gflops:.1f}"
    return f"{gflops:.1f} ({gflops / sgemm_gflops:.0%})"


def markdown_table(
    rows: list[Row], sgemm_gflops: float | None = None, level: str | None = None
) -> str:
    """The result rows as a GitHub markdown table (times are medians per call).

    With `sgemm_gflops`, each GFLOP/s cell also shows its fraction of that SGEMM rate;
    `level` names the instruction set every contender and the SGEMM were held to.
    """
    roof = f"{level} SGEMM" if level else "SGEMM"
    rate = "attnscope GFLOP/s" + (f" (% of {roof})" if sgemm_gflops else "")
    header = ["Row", *PEERS.values(), rate, "Result", "Target", "Max rel. err"]
    lines = [
        "| " + " | ".join([*header, "Verdict"]) + " |",
        "|" + "---|" * (len(header) + 1),
    ]
    for row in rows:
        cells = [
            row.label,
            *(format_seconds(row.cells.get(name)) for name in PEERS),
            _format_gflops(row.gflops, sgemm_gflops),
            row.result or "—",
            row.target,
            _format_error(row.max_rel_error),
            f"**{row.verdict}**" if row.verdict.startswith("FAIL") else row.verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """The whole result file: run description, measured limits, table and per-row notes."""
    meta, limits = results["meta"], results["limits"]
    machine = meta["machine"]
    lines = [
        f"# attnscope benchmark ({meta['preset']} sizes)",
        "",
        f"- Machine: {machine['cpu']}, {machine['usable_cpus']} usable of "
        f"{machine['logical_cpus']} logical CPUs, {machine['memory_gib']} GiB RAM; {machine['os']}",
        f"- Threads: {meta['threads']} for every contender (numpy BLAS: {meta['numpy_threads']})",
        f"- Versions: attnscope {meta['attnscope']}, torch {meta['torch']}, "
        f"numpy {meta['numpy']}, Python {machine['python']}",
        f"- Date: {meta['date']}; command: `{meta['command']}`; 1-min load average before "
        f"the run: {meta['load_average']['start']} (other work on the machine)",
        f"- Limits at {meta['threads']} threads: {describe_limits(limits)}",
        "",
    ]
    if meta.get("simd_level"):
        lines[-1:-1] = [f"- Instruction set: {_isa_words(meta)}"]
    if meta["preset"] != "full":
        lines += [
            "Targets are set for the full sizes: at these sizes, verdicts are indicative.",
            "",
        ]
    rows = [Row(**row) for row in results["rows"]]
    table = markdown_table(rows, limits["sgemm"]["gflops"], meta.get("isa"))
    lines += [table, "", "Notes:", ""]
    lines += [f"- {row.label}: {'; '.join(row.notes)}" for row in rows if row.notes]
    return "\n".join(lines) + "\n"


def describe_limits(limits: dict) -> str:
    """One line: the SGEMM and read-bandwidth limits, how each was measured, every rate seen."""
    sgemm, bandwidth = limits["sgemm"], limits["read_bandwidth"]
    not_counted = sgemm.get("not_counted", {})
    sgemm_rates = ", ".join(
        f"{k} {v:.1f}" + (f" (not counted: {not_counted[k]})" if k in not_counted else "")
        for k, v in sgemm["rates_gflops"].items()
    )
    read_rates = ", ".join(f"{k} {v:.1f}" for k, v in bandwidth["rates_gbs"].items())
    count = len(limits.get("measurements", [])) or 1
    return (
        f"SGEMM {sgemm['gflops']:.1f} GFLOP/s ({sgemm['how']}; {sgemm_rates}); "
        f"memory read {bandwidth['gbs']:.1f} GB/s ({bandwidth['how']}; {read_rates})"
        + (f"; best of {count} measurements (start and end of the run)" if count > 1 else "")
    )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def results_stem(preset: str, level: str | None = None, every_row: bool = True) -> str:
    """The name (without suffix) of a run's result files.

    Only a full-size run of every row is ``latest``, the file the docs are generated from;
    a run held to one instruction set is ``latest-LEVEL`` (read by the ``levels`` block), so
    it never replaces the default run. Quick and smoke runs, and a default-level run of some
    rows only, get names of their own (``quick``, ``smoke``, ``partial``).
    """
    if preset == "full":
        stem = "latest" if every_row or level else "partial"
    else:
        stem = preset
    return f"{stem}-{level}" if level else stem


def write_results(results: dict, directory: Path, stem: str = "latest") -> list[Path]:
    """Write ``STEM.json`` and ``STEM.md`` into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    _write_atomically(json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _write_atomically(md_path, markdown_report(results))
    return [json_path, md_path]


def rows_to_json(rows: list[Row]) -> list[dict]:
    """The rows as plain dicts (the ``rows`` entry of the result file)."""
    return [asdict(row) for row in rows]


# --- Generated blocks in README.md and docs/ ---

_BLOCK = re.compile(
    r"(?P<start><!-- generated: (?P<spec>[^>]*?) -->\n).*?(?P<end><!-- end: generated -->)",
    re.DOTALL,
)
_KINDS = ("run", "brief", "table", "rows", "checks", "models", "levels")


def _format_date(text: str) -> str:
    """``2026-12-02 03:48 UTC`` from an ISO timestamp (``2026-12-01 09:24`` if it has no zone)."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.strftime("%Y-%m-%d %H:%M")
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _simple_table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "---|" * len(header)
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            rule,
            *("| " + " | ".join(cells) + " |" for cells in lines),
        ]
    )


def _pick_rows(rows: list[dict], ids: list[str] | None, source: str) -> list[dict]:
    """The rows named by `ids`, in that order (all of them when `ids` is None)."""
    if ids is None:
        return rows
    by_id = {row["id"]: row for row in rows}
    unknown = [row_id for row_id in ids if row_id not in by_id]
    if unknown:
        raise ValueError(f"rows: {', '.join(unknown)} not in {source} (it has {', '.join(by_id)})")
    return [by_id[row_id] for row_id in ids]


def _isa_words(meta: dict) -> str:
    """The instruction set the engine ran at and the one torch dispatched to, in words."""
    level = meta["simd_level"]
    if meta.get("isa"):
        words = f"engine kernels held to {level} (`--isa {level}`)"
    else:
        words = f"engine kernels: {level} (the widest this CPU runs)"
    capability = meta.get("torch_cpu_capability")
    if capability:
        held = ", ".join(f"{name}={value}" for name, value in meta.get("torch_limits", {}).items())
        words += f", torch's ATen capability {capability}" + (f" ({held})" if held else "")
    return words


def _run_paragraph(results: dict) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    simd = f", {_isa_words(meta)}" if meta.get("simd_level") else ""
    flags = machine.get("simd_flags")
    cpu = machine["cpu"] + (f" (vector flags: {' '.join(flags)})" if flags else "")
    load = meta["load_average"]
    return (
        f"Run of {_format_date(meta['date'])}, `{meta['command']}` ({meta['preset']} sizes), on "
        f"{cpu} with {machine['usable_cpus']} usable of {machine['logical_cpus']} "
        f"logical CPUs and {machine['memory_gib']} GiB RAM{simd}; {machine['os']}. "
        f"{meta['threads']} threads for every contender (NumPy's BLAS: {meta['numpy_threads']}). "
        f"Versions: attnscope {meta['attnscope']}, torch {meta['torch']}, NumPy {meta['numpy']}, "
        f"Python {machine['python']}. The 1-minute load average was {load['start']} before the "
        f"run and {load['end']} after it (other work on the machine). Measured in the same run: "
        f"{describe_limits(results['limits'])}."
    )


def _brief_line(results: dict) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    level = f", engine kernels {meta['simd_level']}" if meta.get("simd_level") else ""
    return (
        f"Run of {_format_date(meta['date'])} ({meta['preset']} sizes) on {machine['cpu']}"
        f"{level}, {machine['usable_cpus']} CPUs, {meta['threads']} threads for every "
        f"contender, torch {meta['torch']}."
    )


def _compact_table(rows: list[Row]) -> str:
    header = ["Row", "attnscope", "torch", "Result", "Target", "Max rel. err", "Verdict"]
    return _simple_table(
        header,
        [
            [
                row.label,
                format_seconds(row.cells.get("attnscope")),
                format_seconds(row.cells.get("torch")),
                row.result or "—",
                row.target,
                _format_error(row.max_rel_error),
                f"**{row.verdict}**" if row.verdict.startswith("FAIL") else row.verdict,
            ]
            for row in rows
        ],
    )


def _checks_sentence(results: dict) -> str:
    rows = [Row(**row) for row in results["rows"]]
    judged = [row for row in rows if row.met is not None]
    missed = [row.label for row in judged if not row.met]
    tolerance = results["meta"]["error_tolerance"]
    errors = [row.max_rel_error for row in rows if row.max_rel_error is not None]
    over = [row.label for row in rows if row.verdict == "FAIL (error)"]
    text = f"{len(judged) - len(missed)} of {len(judged)} rows meet their target"
    text += f"; {len(missed)} do not (marked **FAIL**). " if missed else ". "
    if over:
        return text + f"Over the float64 error limit of {tolerance:.0e}: {'; '.join(over)}."
    return text + (
        f"Every row passes the float64 check: the largest error is {max(errors):.1e} of the "
        f"largest output, the limit {tolerance:.0e}."
    )


def _models_block(results: dict, ids: list[str] | None, source: str) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    paragraph = (
        f"Run of {_format_date(meta['date'])}, `{meta['command']}`, on {machine['cpu']} with "
        f"{machine['usable_cpus']} usable CPUs and {machine['memory_gib']} GiB RAM; "
        f"{meta['threads']} threads for attnscope, torch and NumPy's BLAS ({meta['env_note']}); "
        f"transformers {meta['transformers']}, torch {meta['torch']}, NumPy {meta['numpy']}; "
        f"load average {meta['load_average']} at the start."
    )
    met = {True: " (met)", False: " (**missed**)", None: ""}
    lines = [
        [
            row["label"],
            format_seconds(row["times"].get("attnscope")),
            format_seconds(row["times"].get("transformers")),
            row.get("result", "—"),
            f"{row['target']}{met[row.get('met')]}" if "target" in row else "—",
        ]
        for row in _pick_rows(results["rows"], ids, source)
    ]
    table = _simple_table(["Row", "attnscope", "transformers", "Result", "Target"], lines)
    sizes = results["memory"]
    memory = "; ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sizes.items())
    return f"{paragraph}\n\n{table}\n\nResident memory of each loaded model: {memory}."


def _levels_block(ids: list[str] | None, results_dir: Path) -> str:
    """The rows of each ``latest-LEVEL.json``, side by side, and the run behind each file.

    Rows a level's file lacks are left out of that level; rows no file has, left out.
    """
    runs = {
        level: json.loads(path.read_text(encoding="utf-8"))
        for level in instruction_sets.LEVELS
        if (path := results_dir / f"{results_stem('full', level)}.json").exists()
    }
    if not runs:
        return (
            "No run held to one instruction set is recorded yet: "
            "`python benchmarks/bench.py --isa avx2` writes `results/latest-avx2.json`."
        )
    rows_by_level = {level: {row["id"]: row for row in run["rows"]} for level, run in runs.items()}
    if ids is None:
        ids = list(dict.fromkeys(row["id"] for run in runs.values() for row in run["rows"]))
    # A level's run may hold some rows only; an id that no run of any kind has is a mistake.
    known = set().union(*rows_by_level.values())
    if (results_dir / "latest.json").exists():
        full_run = json.loads((results_dir / "latest.json").read_text(encoding="utf-8"))
        known |= {row["id"] for row in full_run["rows"]}
    unknown = [row_id for row_id in ids if row_id not in known]
    if unknown:
        files = ", ".join(["latest.json", *(f"latest-{level}.json" for level in runs)])
        raise ValueError(f"rows: {', '.join(unknown)} in none of {files}")
    lines = []
    for row_id in ids:
        for level, run in runs.items():
            if row_id not in rows_by_level[level]:
                continue
            row = Row(**rows_by_level[level][row_id])
            meta, roof = run["meta"], run["limits"]["sgemm"]["gflops"]
            lines.append(
                [
                    row.label,
                    f"{level}, {meta['machine']['cpu']}",
                    format_seconds(row.cells.get("attnscope")),
                    format_seconds(row.cells.get("torch")),
                    row.result or "—",
                    _format_gflops(row.gflops, roof),
                    meta.get("torch_cpu_capability") or "—",
                ]
            )
    header = [
        "Row",
        "Instruction set, CPU",
        "attnscope",
        "torch",
        "Result",
        "attnscope GFLOP/s (% of the same level's SGEMM)",
        "torch capability",
    ]
    notes = [f"- {level}: {_run_paragraph(run)}" for level, run in runs.items()]
    return _simple_table(header, lines) + "\n\n" + "\n".join(notes)


def generated_block(spec: str, results_dir: Path = RESULTS_DIR) -> str:
    """The text of one generated block, from its marker's spec (``"rows rows=decode,tiny"``)."""
    kind, *options = spec.split()
    if kind not in _KINDS:
        raise ValueError(f"generated block {spec!r}: kind must be one of {', '.join(_KINDS)}")
    settings = dict(option.partition("=")[::2] for option in options)
    unknown = set(settings) - {"rows", "file"}
    if unknown:
        raise ValueError(f"generated block {spec!r}: unknown option {', '.join(sorted(unknown))}")
    ids = settings["rows"].split(",") if "rows" in settings else None
    if kind == "levels":
        return _levels_block(ids, results_dir)
    source = settings.get("file", "latest.json")
    results = json.loads((results_dir / source).read_text(encoding="utf-8"))
    if kind == "models":
        return _models_block(results, ids, source)
    if kind == "run":
        return _run_paragraph(results)
    if kind == "brief":
        return _brief_line(results)
    if kind == "checks":
        return _checks_sentence(results)
    rows = [Row(**row) for row in _pick_rows(results["rows"], ids, source)]
    if kind == "rows":
        return _compact_table(rows)
    return markdown_table(rows, results["limits"]["sgemm"]["gflops"], results["meta"].get("isa"))


def render_docs(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every generated block rewritten from the result files in `results_dir`."""

    def rewrite(block: re.Match) -> str:
        body = generated_block(block["spec"], results_dir)
        return f"{block['start']}{body}\n{block['end']}"

    return _BLOCK.sub(rewrite, text)


def update_docs(
    paths: tuple[Path, ...] = DOC_FILES, results_dir: Path = RESULTS_DIR, check: bool = False
) -> list[Path]:
    """Rewrite the generated blocks of `paths`; returns the files that were (with `check`:
    that would be) changed. With `check`, nothing is written."""
    changed = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        rendered = render_docs(text, results_dir)
        if rendered != text:
            changed.append(path)
            if not check:
                _write_atomically(path, rendered)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--docs", action="store_true", help="rewrite the generated tables in README.md and docs/"
    )
    parser.add_argument(
        "--check", action="store_true", help="with --docs: write nothing, exit 1 if out of date"
    )
    args = parser.parse_args(argv)
    if not args.docs:
        parser.error("nothing to do: pass --docs")
    changed = update_docs(check=args.check)
    for path in changed:
        verb = "out of date" if args.check else "rewritten"
        print(f"{path.relative_to(ROOT)}: {verb}", file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
