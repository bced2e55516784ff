"""The benchmark harness runs end to end at tiny sizes and attnscope passes its float64 check there.

Correctness only: no test here looks at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attnscope
import numpy as np
import pytest
from attnscope import reference

if not attnscope.core_available():
    pytest.skip("attnscope's compiled engine is not built", allow_module_level=True)

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench  # noqa: E402
import instruction_sets  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
from attnscope import _core  # noqa: E402

RULES = [
    {},
    {"is_causal": True},
    {"is_causal": True, "causal_alignment": "bottom_right"},
    {"is_causal": True, "window": 3},
    {"window": (2, None)},
    {"window": (None, 1), "causal_alignment": "bottom_right"},
]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize(("num_queries", "num_keys"), [(7, 7), (4, 9), (9, 4), (1, 6)])
def test_visibility_helpers_match_reference(rules, num_queries, num_keys):
    expected = reference.visibility(num_queries, num_keys, **rules)
    rows = np.arange(num_queries)
    np.testing.assert_array_equal(
        peers.visible_rows(rows, num_queries, num_keys, **rules), expected
    )
    assert peers.visible_pairs(num_queries, num_keys, **rules) == expected.sum()


@pytest.mark.parametrize("is_causal", [False, True])
def test_naive_peer_matches_reference(is_causal):
    rng = np.random.default_rng(1)
    query, key, value = (rng.standard_normal((2, 3, 10, 8)) for _ in range(3))
    hidden = ~reference.visibility(10, 10, is_causal=is_causal) if is_causal else None
    np.testing.assert_allclose(
        peers.naive_attention(query, key, value, hidden),
        reference.scaled_dot_product_attention(query, key, value, is_causal=is_causal),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sampled_error_check_catches_a_wrong_output(kv_heads):
    rng = np.random.default_rng(2)
    query = rng.standard_normal((1, 4, 12, 4)).astype(np.float32)
    key, value = (rng.standard_normal((1, kv_heads, 12, 4)).astype(np.float32) for _ in range(2))
    grouped = kv_heads != 4
    right = reference.scaled_dot_product_attention(
        query, key, value, is_causal=True, enable_gqa=grouped
    )
    assert peers.max_relative_error(right, query, key, value, is_causal=True) < 1e-12
    for head in (0, 3):  # the first and last query head, which read different kv heads
        wrong = right.copy()
        wrong[0, head, -1, 0] += 0.1
        assert peers.max_relative_error(wrong, query, key, value, is_causal=True) > 1e-3


def test_grouped_naive_peer_is_one_taller_query_block_per_kv_head():
    # How the benchmark hands grouped decode to the NumPy peer: the query heads that share a
    # kv head become one block of rows.
    rng = np.random.default_rng(4)
    query = rng.standard_normal((1, 8, 1, 16))
    key, value = (rng.standard_normal((1, 2, 40, 16)) for _ in range(2))
    taller = peers.naive_attention(query.reshape(1, 2, 4, 16), key, value)
    expected = reference.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    np.testing.assert_allclose(taller.reshape(expected.shape), expected, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def smoke_results():
    return bench.run(preset="smoke", log=lambda line: None, command="test")


def test_smoke_run_has_every_row_and_passes_the_error_check(smoke_results):
    meta, limits, rows = smoke_results["meta"], smoke_results["limits"], smoke_results["rows"]
    assert meta["threads"] >= 1 and meta["preset"] == "smoke"
    assert meta["isa"] is None and meta["simd_level"] in instruction_sets.LEVELS
    assert meta["machine"]["cpu"]
    assert limits["sgemm"]["gflops"] > 0 and limits["read_bandwidth"]["gbs"] > 0

    ids = [row["id"] for row in rows]
    assert ids[:4] == [
        "sdpa_full_h2_d16",
        "sdpa_causal_h2_d16",
        "sdpa_full_h2_d32",
        "sdpa_causal_h2_d32",
    ]
    assert ids[4:] == [
        "window",
        "window_doubling",
        "decode",
        "decode_gqa",
        "decode_bfloat16",
        "decode_float16",
        "decode_int8",
        "decode_bfloat16_gqa",
        "decode_float16_gqa",
        "decode_int8_gqa",
        "tiny",
        "scaling",
        "peak_memory",
        "mha",
        "sparse_longformer",
        "sparse_sinks_window",
        "sparse_documents",
        "sparse_longformer_torch",
        "sparse_documents_torch",
        "sparse_bigbird_torch",
        "score_mod_softcap",
        "score_mod_alibi",
        "sparse_peak_memory",
        "backward_full",
        "backward_causal",
        "backward_peak_memory",
    ]

    for row in rows:
        assert row["verdict"], row
        if row["id"] == "scaling" and row["verdict"].startswith("n/a"):
            continue  # a one-CPU machine cannot measure scaling
        assert row["max_rel_error"] is not None, row["id"]
        assert row["max_rel_error"] <= peers.ERROR_TOLERANCE, row
        assert row["verdict"] != "FAIL (error)"
        assert isinstance(row["cells"]["attnscope"], float) and row["cells"]["attnscope"] > 0
        assert row["gflops"] > 0


def test_result_files_hold_the_table(smoke_results, tmp_path):
    json_path, md_path = report.write_results(smoke_results, tmp_path)
    assert json.loads(json_path.read_text(encoding="utf-8"))["rows"] == smoke_results["rows"]
    markdown = md_path.read_text(encoding="utf-8")
    assert "| Row | attnscope | torch | NumPy naive |" in markdown
    for row in smoke_results["rows"]:
        assert row["label"] in markdown


def test_command_line_prints_the_table_and_writes_nothing_with_no_write(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench.py"), "--smoke", "--no-write", "--rows", "tiny"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "threads: SGEMM" in done.stdout
    assert "| B1 H4 L=S=16 D16 full, per call |" in done.stdout
    assert list(tmp_path.iterdir()) == []


# --- Held to one instruction set (--isa) ---

UNSUPPORTED = next(
    (level for level in instruction_sets.LEVELS if instruction_sets.unsupported_reason(level)),
    None,
)


def test_isa_argument_names_a_level_and_its_own_result_file():
    args = bench._parse_args(["--smoke", "--isa", "portable", "--rows", "tiny"])
    assert (args.isa, args.stem) == ("portable", "smoke-portable")
    assert bench._parse_args(["--isa", "avx2", "--rows", "dense"]).stem == "latest-avx2"
    assert bench._parse_args([]).isa is None
    with pytest.raises(SystemExit) as refused:
        bench._parse_args(["--isa", "sse9"])
    assert refused.value.code == 2


@pytest.mark.parametrize(
    ("preset", "level", "every_row", "stem"),
    [
        ("full", None, True, "latest"),  # the one file the docs' main tables come from
        ("full", None, False, "partial"),
        ("full", "avx2", False, "latest-avx2"),
        ("quick", None, True, "quick"),
        ("quick", "portable", True, "quick-portable"),
        ("smoke", None, False, "smoke"),
    ],
)
def test_only_a_full_run_of_every_row_writes_latest(preset, level, every_row, stem):
    assert report.results_stem(preset, level, every_row) == stem


def test_a_run_held_to_portable_records_the_level_and_restores_it():
    automatic = _core.simd_level()
    results = bench.run(
        preset="smoke", groups=["tiny"], use_torch=False, log=lambda line: None, isa="portable"
    )
    meta, (row,) = results["meta"], results["rows"]
    assert (meta["simd_level"], meta["isa"]) == ("portable", "portable")
    assert meta["machine"]["cpu"] and meta["roof_source"] == results["limits"]["sgemm"]["how"]
    assert results["limits"]["sgemm"]["level"] == "portable"
    assert row["max_rel_error"] <= peers.ERROR_TOLERANCE
    assert _core.simd_level() == automatic


@pytest.mark.skipif(UNSUPPORTED is None, reason="this CPU and engine run every level")
def test_a_level_this_cpu_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match=f"isa: .*{UNSUPPORTED}"):
        bench.run(preset="smoke", groups=["tiny"], use_torch=False, isa=UNSUPPORTED)
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench.py"), "--smoke", "--isa", UNSUPPORTED],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert f"--isa {UNSUPPORTED} refused" in done.stderr and "Traceback" not in done.stderr


def test_command_line_holds_torch_and_writes_the_level_file(tmp_path):
    # A child process, since torch reads its limits when imported: with torch installed it
    # must report the portable capability, and the result goes to a file of its own.
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench.py"), "--smoke", "--isa", "portable"]
        + ["--rows", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "smoke-portable.json",
        "smoke-portable.md",
    ]
    meta = json.loads((tmp_path / "smoke-portable.json").read_text(encoding="utf-8"))["meta"]
    assert (meta["simd_level"], meta["isa"]) == ("portable", "portable")
    assert "held to portable" in done.stdout
    if meta["torch"] == "not installed":
        assert meta["torch_cpu_capability"] is None
    else:
        assert meta["torch_cpu_capability"] == "DEFAULT"
        assert meta["torch_limits"]["ATEN_CPU_CAPABILITY"] == "default"
        assert "torch_note" not in meta
