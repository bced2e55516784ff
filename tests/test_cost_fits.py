"""The cost page's arithmetic on synthetic timings: the exact counts of visible pairs, the fits
on the longest lengths and their verdicts, the estimates at 200,000 tokens, the sweep's time
budget and the decode table's note. No test here times anything real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from attnscope import masks, reference
from attnscope.dashboard import cost, engine, kv_cost

SIZES = [128, 256, 512, 1024, 2048, 4096, 8192]
FULL, CAUSAL, WINDOW = "attnscope full", "attnscope causal", f"attnscope window {cost.SWEEP_WINDOW}"


def synthetic(seconds_of: dict[str, object], sizes=SIZES) -> pd.DataFrame:
    """A sweep's frame whose times come from `seconds_of[method](n)`."""
    rows = [
        {"n": n, "method": method, "seconds": time_at(n), "status": "measured"}
        for method, time_at in seconds_of.items()
        for n in sizes
    ]
    return pd.DataFrame(rows)


def per_pair(method: str, seconds: float = 5e-9, fixed: float = 5e-5):
    """Times of a method costing `seconds` per visible pair plus a fixed cost per call."""
    kind = cost.mask_kind(method)
    return lambda n: fixed + seconds * cost.visible_pairs(n, kind)


@pytest.mark.parametrize("n", [1, 2, 7, 255, 256, 257, 300, 1000])
def test_visible_pairs_count_the_reference_masks(n):
    dense = {
        "full": reference.visibility(n, n),
        "causal": reference.visibility(n, n, is_causal=True),
        "window": reference.visibility(n, n, is_causal=True, window=cost.SWEEP_WINDOW),
    }
    for kind, visible in dense.items():
        assert cost.visible_pairs(n, kind) == int(visible.sum()), kind


@pytest.mark.skipif(not engine.compiled_available(), reason="the engine's mask layout")
def test_visible_pairs_match_the_engine_at_200k():
    n = 200_000
    assert cost.visible_pairs(n, "causal") == masks.causal().layout(n, n, block=4096).visible_pairs
    window = masks.causal() & masks.window(cost.SWEEP_WINDOW - 1)
    assert cost.visible_pairs(n, "window") == window.layout(n, n, block=4096).visible_pairs


def test_visible_pairs_refuse_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        cost.visible_pairs(8, "diagonal")
    with pytest.raises(ValueError, match="n must"):
        cost.visible_pairs(-1, "full")
    with pytest.raises(ValueError, match="window"):
        cost.visible_pairs(8, "window", window=0)
    assert [cost.mask_kind(m) for m in (FULL, CAUSAL, WINDOW, cost.NAIVE)] == [
        "full",
        "causal",
        "window",
        "full",
    ]


def test_growth_fits_the_longest_lengths_and_expects_what_the_pairs_say():
    frame = synthetic({m: per_pair(m) for m in (FULL, CAUSAL, WINDOW)})
    growth = cost.growth_table(frame).set_index("method")
    assert list(growth["fitted on"]) == ["n = 2,048–8,192"] * 3
    # Fixed costs bend the short lengths; the longest three follow the pair counts.
    assert growth.loc[FULL, "fitted p"] == pytest.approx(2.0, abs=0.02)
    assert growth.loc[CAUSAL, "fitted p"] == pytest.approx(2.0, abs=0.02)
    assert growth.loc[WINDOW, "fitted p"] == pytest.approx(1.0, abs=0.1)
    assert growth["within"].all()
    assert growth.loc[FULL, "expected ×"] == 4.0
    assert growth.loc[CAUSAL, "expected ×"] == pytest.approx(4.0, abs=1e-3)
    assert growth.loc[WINDOW, "expected ×"] == pytest.approx(2.0, abs=0.05)
    assert growth.loc[FULL, "time when n doubles"] == pytest.approx(4.0, abs=0.01)
    shown = cost.growth_shown(cost.growth_table(frame)).set_index("method")
    assert shown.loc[FULL, "expected"] == "×4.0" and shown.loc[WINDOW, "expected"] == "×2.0"
    assert set(shown["fit"]) == {"as expected"}


def test_a_fit_outside_its_range_is_flagged():
    # A busy machine: the longest full-attention call ran twice as slow as it should.
    slow = per_pair(FULL)
    frame = synthetic({FULL: lambda n: slow(n) * (2 if n == 8192 else 1), CAUSAL: per_pair(CAUSAL)})
    growth = cost.growth_table(frame).set_index("method")
    assert growth.loc[FULL, "fitted p"] > 2.2 and not growth.loc[FULL, "within"]
    assert growth.loc[CAUSAL, "within"]
    shown = cost.growth_shown(cost.growth_table(frame)).set_index("method")
    assert "not used" in shown.loc[FULL, "fit"]
    # Too few lengths: no fit, and the verdict says so.
    short = cost.growth_table(synthetic({FULL: per_pair(FULL)}, sizes=[128, 256]))
    assert short["fitted p"].isna().all() and not short["within"].any()


def test_estimates_are_time_per_pair_times_exact_pairs():
    frame = synthetic({m: per_pair(m, fixed=0.0) for m in (FULL, CAUSAL, WINDOW)})
    table = cost.projections_table(frame).set_index(["method", "n"])
    assert table.loc[(FULL, 8192), "how"] == "measured"
    for method in (FULL, CAUSAL, WINDOW):
        pairs = cost.visible_pairs(200_000, cost.mask_kind(method))
        assert table.loc[(method, 200_000), "seconds"] == pytest.approx(5e-9 * pairs)
        assert f"{pairs:,} pairs" in table.loc[(method, 200_000), "how"]
    at_200k = table.xs(200_000, level="n")["seconds"]
    assert at_200k[CAUSAL] < at_200k[FULL] and at_200k[WINDOW] < at_200k[CAUSAL]
    # The estimate ignores a wild exponent: only the longest point's time per pair counts.
    noisy = frame.copy()
    noisy.loc[(noisy["method"] == CAUSAL) & (noisy["n"] == 2048), "seconds"] *= 5
    again = cost.projections_table(noisy).set_index(["method", "n"])
    assert again.loc[(CAUSAL, 200_000), "seconds"] == table.loc[(CAUSAL, 200_000), "seconds"]


@pytest.fixture
def fake_clock(monkeypatch):
    """The sweep's clock, made fake: ``(clock, timed)``, where ``timed(*methods)`` makes the
    sweep time those methods, each call advancing ``clock[0]`` by 1 ns per visible pair."""
    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])

    def fake(kind):
        def run(q, k, v):
            clock[0] += 1e-9 * cost.visible_pairs(len(q), kind)

        return run

    def timed(*names):
        table = {name: (fake(cost.mask_kind(name)), False) for name in names}
        monkeypatch.setattr(cost, "methods", lambda include_torch=True: table)

    return clock, timed


def test_a_cheap_method_keeps_lengthening_after_an_expensive_one_stops(fake_clock):
    clock, timed = fake_clock
    timed(FULL, WINDOW)
    sizes = [1024, 2048, 4096, 8192, 16384]
    frame = cost.sweep(sizes, 4, total_seconds=0.5)
    measured = frame[frame["status"] == "measured"].groupby("method")["n"].max()
    assert measured[FULL] == 4096 and measured[WINDOW] == 16384
    assert clock[0] <= 0.5


def test_time_per_pair_is_the_least_disturbed_of_the_longest_points():
    frame = synthetic({FULL: per_pair(FULL, fixed=0.0)})
    assert cost.seconds_per_pair(frame, FULL) == (8192, pytest.approx(5e-9))
    # A busy moment slowed the longest point: the estimate comes from the next one down.
    frame.loc[frame["n"] == 8192, "seconds"] *= 3
    assert cost.seconds_per_pair(frame, FULL) == (4096, pytest.approx(5e-9))
    table = cost.projections_table(frame).set_index(["method", "n"])
    assert table.loc[(FULL, 200_000), "seconds"] == pytest.approx(5e-9 * 200_000**2)
    assert "at n = 4,096" in table.loc[(FULL, 200_000), "how"]
    assert cost.seconds_per_pair(frame[frame["method"] == "none"], FULL) is None


def test_estimate_timeline_continues_each_method_from_its_longest_point():
    frame = synthetic({FULL: per_pair(FULL, fixed=0.0)}, sizes=[512, 1024])
    line = cost.estimate_timeline(frame)
    estimated = line[line["kind"] == "estimated"]
    assert list(estimated["n"]) == [1024, *cost.TARGET_LENGTHS]
    np.testing.assert_allclose(estimated["seconds"], [5e-9 * n * n for n in estimated["n"]])
    assert len(line[line["kind"] == "measured"]) == 2


def test_sweep_stops_lengthening_before_its_time_runs_out(fake_clock):
    clock, timed = fake_clock
    timed(FULL, CAUSAL)
    sizes = [256, 512, 1024, 2048, 4096, 8192]
    frame = cost.sweep(sizes, 4, total_seconds=0.5).set_index(["method", "n"])
    # A point runs at most 50 times and otherwise for time_call's 40 ms: about 0.28 s up to
    # 4,096, where 8,192's three runs of full (3 × 67 ms) and causal attention would pass the
    # 0.3 s the lengthening may take (60% of 0.5 s). Rounds of re-timing use the rest.
    assert frame.loc[(FULL, 4096), "status"] == "measured"
    assert frame.loc[(FULL, 8192), "status"] == "skipped: the sweep's 0.5 s would run out"
    assert frame.loc[(CAUSAL, 8192), "status"].startswith("skipped")
    assert cost.LENGTHEN_SHARE == 0.6 and clock[0] <= 0.5
    unbounded = cost.sweep(sizes, 4)
    assert (unbounded["status"] == "measured").all()


def test_the_longest_points_are_timed_again_in_rounds(monkeypatch):
    # The machine is busy while the sweep lengthens (n = 2,048 runs three times slower) and
    # quiet when it comes back to time the longest points again.
    clock = [0.0]
    quiet = [False]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])

    def full(q, k, v):
        busy = len(q) == 2048 and not quiet[0]
        clock[0] += 1e-9 * len(q) ** 2 * (3 if busy else 1)

    monkeypatch.setattr(cost, "methods", lambda include_torch=True: {FULL: (full, False)})
    retime = cost._retime_longest
    rounds = []

    def spy(*args):
        quiet[0] = True
        before = clock[0]
        retime(*args)
        rounds.append(clock[0] - before)

    monkeypatch.setattr(cost, "_retime_longest", spy)
    sizes = [256, 512, 1024, 2048]
    frame = cost.sweep(sizes, 4, total_seconds=10.0)
    assert quiet[0] and clock[0] <= 10.0
    assert rounds[0] > 0  # it used the time the lengthening left
    growth = cost.growth_table(frame).set_index("method")
    assert growth.loc[FULL, "within"]
    assert frame.set_index("n").loc[2048, "seconds"] == pytest.approx(1e-9 * 2048**2)
    # A sweep without a time budget keeps the disturbed point as measured, and it is flagged.
    quiet[0] = False
    monkeypatch.setattr(cost, "_retime_longest", retime)
    busy = cost.sweep(sizes, 4)
    assert busy.set_index("n").loc[2048, "seconds"] == pytest.approx(3e-9 * 2048**2)
    assert not cost.growth_table(busy).set_index("method").loc[FULL, "within"]


def test_storage_speed_note_says_what_the_numbers_show():
    def steps(*speed_ups):
        return pd.DataFrame({"storage": kv_cost.STORAGES, "speed-up vs float32": [1.0, *speed_ups]})

    same = kv_cost.storage_speed_note(steps(0.96, 1.03, 0.99))
    assert "0.96–1.03×" in same and "not time" in same
    assert "faster" in kv_cost.storage_speed_note(steps(1.8, 1.9, 3.1))
    assert "slower" in kv_cost.storage_speed_note(steps(1.1, 1.2, 0.5))
