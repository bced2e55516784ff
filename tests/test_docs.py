"""The README and docs/: generated tables match the result files, links resolve, examples run.

The benchmark tables in README.md and docs/ are written by `benchmarks/report.py --docs` from
`benchmarks/results/*.json`; a table edited by hand, or a result file committed without
regenerating the docs, fails here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import attnscope
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Every markdown file a reader reaches from the README.
LINKED_FILES = [README, *DOCS, ROOT / "benchmarks" / "README.md", report.RESULTS_DIR / "NOTES.md"]
# Docs whose examples run in well under a second each; models.md loads trained weights and
# learning.md trains for half a minute, so their examples are left to the models' own tests.
RUNNABLE_DOCS = ["api.md", "gradients.md", "masks.md", "kv-cache.md"]

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """`text` without code: fenced blocks and inline code spans hold no links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of `path` (lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered)."""
    anchors: set[str] = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        anchor, count = slug, 1
        while anchor in anchors:
            anchor, count = f"{slug}-{count}", count + 1
        anchors.add(anchor)
    return anchors


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def _run_blocks(path: Path) -> None:
    """Run the file's Python examples in order, in one namespace, as a reader would; those that
    import torch only where torch is installed."""
    namespace: dict = {}
    left_out = []
    for number, block in enumerate(_python_blocks(path), start=1):
        if re.search(r"^import torch", block, re.M) and importlib.util.find_spec("torch") is None:
            left_out.append(number)
            continue
        exec(compile(block, f"{path.name}, example {number}", "exec"), namespace)
    if left_out:
        pytest.skip(f"{path.name}: examples {left_out} need torch (an optional peer)")


def test_generated_tables_match_the_result_files():
    stale = report.update_docs(check=True)
    assert not stale, (
        f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} differ from the benchmark "
        "result files: run `python benchmarks/report.py --docs`, never edit the tables by hand"
    )


def test_the_docs_hold_the_generated_blocks():
    # The checks above only mean something while the tables sit inside generated blocks.
    specs = {
        path.name: re.findall(r"<!-- generated: ([^>]*?) -->", path.read_text(encoding="utf-8"))
        for path in (README, *DOCS)
    }
    assert "table" in specs["performance.md"] and "run" in specs["performance.md"]
    assert any(spec.startswith("levels") for spec in specs["performance.md"])
    assert any(spec.startswith("rows ") for spec in specs["README.md"])
    assert "brief" in specs["README.md"]
    for name in ("gradients.md", "masks.md", "kv-cache.md"):
        assert any(spec.startswith("rows ") for spec in specs[name]), name
    assert "models file=models_2t.json" in specs["models.md"]
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert text.count("<!-- generated:") == text.count("<!-- end: generated -->")


def test_a_table_edited_by_hand_is_rewritten():
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    row = json.loads((report.RESULTS_DIR / "latest.json").read_text(encoding="utf-8"))["rows"][0]
    cell = report.format_seconds(row["cells"]["attnscope"])
    assert f"| {row['label']} | {cell} |" in text
    edited = text.replace(f"| {row['label']} | {cell} |", f"| {row['label']} | 1.00 ms |")
    assert edited != text
    assert report.render_docs(edited) == text


def test_blocks_follow_the_result_file(tmp_path):
    # A new result file changes the generated text: the numbers come from the file.
    for name in ("latest.json", "models_2t.json"):
        shutil.copy(report.RESULTS_DIR / name, tmp_path / name)
    results = json.loads((tmp_path / "latest.json").read_text(encoding="utf-8"))
    decode = next(row for row in results["rows"] if row["id"] == "decode")
    decode["cells"]["attnscope"] = 0.0123456
    decode["verdict"] = "PASS"
    results["meta"]["date"] = "2031-01-02T03:04:05+00:00"
    (tmp_path / "latest.json").write_text(json.dumps(results), encoding="utf-8")

    text = "intro\n<!-- generated: rows rows=decode -->\nold\n<!-- end: generated -->\nend\n"
    rendered = report.render_docs(text, tmp_path)
    assert rendered.startswith("intro\n<!-- generated: rows rows=decode -->\n| Row |")
    assert f"| {decode['label']} | 12.35 ms |" in rendered
    assert "old" not in rendered and rendered.endswith("<!-- end: generated -->\nend\n")
    assert "2031-01-02 03:04 UTC" in report.generated_block("brief", tmp_path)
    assert report.render_docs(rendered, tmp_path) == rendered


def _level_file(tmp_path: Path, level: str, cpu: str, keep: set[str]) -> dict:
    """`latest-LEVEL.json` in `tmp_path`: the committed full run's `keep` rows, as if that run
    had been held to `level` on `cpu`."""
    results = json.loads((report.RESULTS_DIR / "latest.json").read_text(encoding="utf-8"))
    results["rows"] = [row for row in results["rows"] if row["id"] in keep]
    results["meta"].update(simd_level=level, isa=level, torch_cpu_capability=level.upper())
    results["meta"]["machine"]["cpu"] = cpu
    (tmp_path / f"latest-{level}.json").write_text(json.dumps(results), encoding="utf-8")
    return results


def test_levels_block_sets_each_level_side_by_side(tmp_path):
    assert "No run held to one instruction set" in report.generated_block("levels", tmp_path)
    avx2 = _level_file(tmp_path, "avx2", "Test CPU A", {"sdpa_full_h8_d64", "backward_full"})
    _level_file(tmp_path, "portable", "Test CPU B", {"sdpa_full_h8_d64"})
    block = report.generated_block("levels rows=backward_full,sdpa_full_h8_d64", tmp_path)
    lines = block.splitlines()
    assert "attnscope GFLOP/s (% of the same level's SGEMM)" in lines[0]
    full = next(row for row in avx2["rows"] if row["id"] == "sdpa_full_h8_d64")
    # The chosen order, each row at every level that has it, the widest level first.
    assert [line.split(" | ")[:2] for line in lines[2:5]] == [
        ["| forward+backward B1 H8 L=S=2048 D64 full", "avx2, Test CPU A"],
        [f"| {full['label']}", "avx2, Test CPU A"],
        [f"| {full['label']}", "portable, Test CPU B"],
    ]
    roof = avx2["limits"]["sgemm"]["gflops"]
    assert f"{full['gflops']:.1f} ({full['gflops'] / roof:.0%})" in lines[3]
    assert "- avx2: Run of" in block and "engine kernels held to avx2 (`--isa avx2`)" in block
    # A row of the full run that no level's run holds is left out; an unknown id is refused.
    shutil.copy(report.RESULTS_DIR / "latest.json", tmp_path / "latest.json")
    partial = report.generated_block("levels rows=window,sdpa_full_h8_d64", tmp_path)
    assert partial.splitlines()[2:4] == lines[3:5] and partial.splitlines()[4] == ""
    with pytest.raises(ValueError, match="no_such_row in none of latest.json, latest-avx2.json"):
        report.generated_block("levels rows=no_such_row", tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("plot", "kind must be one of"),
        ("rows rows=decode,no_such_row", "no_such_row not in latest.json"),
        ("table colour=red", "unknown option colour"),
    ],
)
def test_a_bad_block_is_refused_with_its_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        report.generated_block(spec)


def test_check_mode_reports_without_writing(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: brief -->\nstale\n<!-- end: generated -->\n", "utf-8")
    assert report.update_docs((page,), check=True) == [page]
    assert "stale" in page.read_text(encoding="utf-8")
    assert report.update_docs((page,)) == [page]
    assert "stale" not in page.read_text(encoding="utf-8")
    assert report.update_docs((page,), check=True) == []


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda path: path.name)
def test_relative_links_resolve(path):
    broken = []
    for target in _LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _heading_anchors(linked):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{path.relative_to(ROOT)}: {'; '.join(broken)}"


def test_readme_is_a_front_page_that_indexes_the_docs():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    links = set(_LINK.findall(_prose(text)))
    assert {f"docs/{path.name}" for path in DOCS} <= links
    for command in ("make run", "make test"):
        assert command in text


@pytest.mark.skipif(not attnscope.core_available(), reason="the compiled engine is not built")
@pytest.mark.parametrize(
    "path", [README, *(ROOT / "docs" / name for name in RUNNABLE_DOCS)], ids=lambda p: p.name
)
def test_examples_run(path):
    assert _python_blocks(path), f"{path.name} has no Python example"
    _run_blocks(path)


def test_the_layout_names_every_folder_of_the_crate():
    # The README and docs/engine.md describe rust/ folder by folder, not file by file: a new
    # folder that neither names has left them behind.
    folders = sorted(path.name for path in (ROOT / "rust").iterdir() if path.is_dir())
    assert folders
    for doc in (README, ROOT / "docs" / "engine.md"):
        text = doc.read_text(encoding="utf-8")
        missing = [name for name in folders if f"`{name}/`" not in text]
        assert not missing, f"{doc.name} does not describe rust/{', rust/'.join(missing)}"
