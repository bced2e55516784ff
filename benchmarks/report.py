"""Benchmark rows and how they are shown: the markdown table, and the JSON/markdown result files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "PEERS",
    "Row",
    "describe_limits",
    "format_seconds",
    "markdown_report",
    "markdown_table",
    "rows_to_json",
    "write_results",
]

# Table columns for the contenders, in order: result key -> column title.
PEERS = {"attnscope": "attnscope", "torch": "torch", "numpy": "NumPy naive"}


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


def markdown_table(rows: list[Row], sgemm_gflops: float | None = None) -> str:
    """The result rows as a GitHub markdown table (times are medians per call).

    With `sgemm_gflops`, each GFLOP/s cell also shows its fraction of that SGEMM rate.
    """
    rate = "attnscope GFLOP/s" + (" (% of SGEMM)" if sgemm_gflops else "")
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
    if meta["preset"] != "full":
        lines += [
            "Targets are set for the full sizes: at these sizes, verdicts are indicative.",
            "",
        ]
    rows = [Row(**row) for row in results["rows"]]
    lines += [markdown_table(rows, limits["sgemm"]["gflops"]), "", "Notes:", ""]
    lines += [f"- {row.label}: {'; '.join(row.notes)}" for row in rows if row.notes]
    return "\n".join(lines) + "\n"


def describe_limits(limits: dict) -> str:
    """One line: the SGEMM and read-bandwidth limits, how each was measured, every rate seen."""
    sgemm, bandwidth = limits["sgemm"], limits["read_bandwidth"]
    sgemm_rates = ", ".join(f"{k} {v:.1f}" for k, v in sgemm["rates_gflops"].items())
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


def write_results(results: dict, directory: Path) -> list[Path]:
    """Write ``latest.json`` and ``latest.md`` into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "latest.json", directory / "latest.md"
    _write_atomically(json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _write_atomically(md_path, markdown_report(results))
    return [json_path, md_path]


def rows_to_json(rows: list[Row]) -> list[dict]:
    """The rows as plain dicts (the ``rows`` entry of the result file)."""
    return [asdict(row) for row in rows]
