"""The dashboard's computing functions: the designed heads do what the page says, and every
number they show agrees with attnscope.reference."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from attnscope import reference
from attnscope.dashboard import cost, engine, heads, inside, kv_cost, naive, regimes, text
from attnscope.models.stats import row_entropy
from threadpoolctl import threadpool_info


def tokens_of(sentence: str):
    tokens, note = text.tokenize(sentence)
    assert note is None
    return tokens


def strongest(sentence: str, head: str, word: str, causal: bool = True) -> str:
    """The word that `word`'s row weights most in `head`."""
    tokens = tokens_of(sentence)
    words = [t.text for t in tokens]
    weights = heads.head_weights(tokens, causal=causal)[heads.HEAD_NAMES.index(head)]
    return words[int(weights[words.index(word)].argmax())]


# --- engine selection -----------------------------------------------------------------------


def test_engine_weights_match_reference():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 7, 5)) for _ in range(3))
    out, weights = engine.attention(q, k, v, is_causal=True)
    ref_out, ref_weights = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, return_weights=True
    )
    np.testing.assert_allclose(weights, ref_weights, atol=1e-12)
    np.testing.assert_allclose(out, ref_out, atol=1e-12)


def test_fallback_uses_reference_and_says_so(monkeypatch):
    monkeypatch.setattr(engine, "compiled_available", lambda: False)
    assert engine.engine_name() == engine.FALLBACK_NAME
    assert "attnscope.reference" in engine.fallback_message()
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((4, 3)) for _ in range(3))
    _, weights = engine.attention(q, k, v, window=2)
    _, expected = reference.scaled_dot_product_attention(q, k, v, window=2, return_weights=True)
    np.testing.assert_array_equal(weights, expected)
    assert engine.get_threads() == 1


# --- text -----------------------------------------------------------------------------------


def test_tokenize_rejects_empty_and_shortens_long_text():
    with pytest.raises(text.InputError):
        text.tokenize("   ")
    tokens, note = text.tokenize("word " * 2_000)
    assert len(tokens) == text.MAX_TOKENS
    assert "2,000" in note


def test_sentence_rule_cuts_to_the_limit_and_says_so():
    rule = text.SentenceRule(2, empty="nothing here", shortened="{count:,} words, {limit} kept")
    assert rule.words("a, b") == (["a", ","], "3 words, 2 kept")
    assert rule.words("one two") == (["one", "two"], None)
    with pytest.raises(text.InputError, match="nothing here"):
        rule.words(" \n")


def test_every_page_gives_a_word_the_same_vector():
    vector = text.word_vector("Cat", 16)
    np.testing.assert_array_equal(vector, text.word_vector("cat", 16))
    assert not np.array_equal(vector, text.word_vector("hat", 16))
    # The regimes page adds a position code to it; the inside page rounds it to print it.
    position_zero = regimes.embeddings(["x"])[0] - text.word_vector("x", regimes.MODEL_DIM)
    np.testing.assert_allclose(regimes.embeddings(["cat"])[0], vector + position_zero)
    steps = inside.one_head(["cat"], 4)
    np.testing.assert_array_equal(steps.x[0], np.round(text.word_vector("cat", 4), 2))


def test_tagger_on_the_examples():
    roles = {t.text: t.role for t in tokens_of(text.EXAMPLES["The doctor and the nurse"])}
    assert roles["doctor"] == roles["nurse"] == "noun"
    assert roles["fired"] == roles["was"] == "verb"
    assert roles["she"] == "pronoun"
    assert roles["."] == "punctuation"
    assert text.tag(["queen"])[0].gender == "feminine"


# --- designed heads -------------------------------------------------------------------------


def test_head_weights_are_the_reference_softmax_of_the_designed_qkv():
    tokens = tokens_of(text.EXAMPLES["The cat sleeps"])
    q, k, v = heads.head_qkv(tokens)
    for causal in (True, False):
        _, expected = reference.scaled_dot_product_attention(
            q, k, v, is_causal=causal, return_weights=True
        )
        np.testing.assert_allclose(heads.head_weights(tokens, causal), expected, atol=1e-9)


def test_projections_reproduce_the_score_rule():
    tokens = tokens_of(text.EXAMPLES["Agreement"])
    x = heads.embed(tokens)
    for index, spec in enumerate(heads.HEADS):
        w_q, w_k, _, _ = heads.projections(spec)
        expected = x @ heads.score_rule(spec) @ x.T
        np.testing.assert_allclose((x @ w_q) @ (x @ w_k).T / math.sqrt(heads.HEAD_DIM), expected)
        np.testing.assert_allclose(heads.head_scores(tokens, index), expected, atol=1e-9)


def test_position_code_singles_out_one_position():
    distances = np.arange(1, text.MAX_TOKENS)
    kernel = np.cos(np.outer(distances, heads.FREQUENCIES)).sum(axis=1)
    assert np.abs(kernel).max() < 0.02
    # Through the projections: the previous-token head's scores are its gain times the number
    # of frequencies on the diagonal below the main one, and about 0 at every other visible key.
    tokens, _ = text.tokenize("word " * text.MAX_TOKENS)
    index = heads.HEAD_NAMES.index("Previous token")
    (offset,) = heads.HEADS[index].offsets
    scores = heads.head_scores(tokens, index)
    n = len(tokens)
    below = np.eye(n, k=-offset.back, dtype=bool)
    np.testing.assert_allclose(scores[below], offset.gain * len(heads.FREQUENCIES))
    others = reference.visibility(n, n, is_causal=True) & ~below
    assert np.abs(scores[others]).max() < 0.02 * offset.gain


def test_masked_scores_hide_the_future_only_when_causal():
    tokens = tokens_of(text.EXAMPLES["Rhyme"])
    index = heads.HEAD_NAMES.index("Rhyme")
    scores = heads.head_scores(tokens, index)
    np.testing.assert_array_equal(heads.masked_scores(tokens, index, causal=False), scores)
    causal = heads.masked_scores(tokens, index, causal=True)
    np.testing.assert_array_equal(causal, np.tril(scores))


def test_expander_matrices_are_parts_of_the_embeddings_and_w_q():
    tokens = tokens_of(text.EXAMPLES["Coreference"])
    readable = heads.readable_embeddings(tokens)
    x = heads.embed(tokens)
    for column, name in enumerate(heads.READABLE_FEATURES):
        np.testing.assert_array_equal(readable[:, column], x[:, heads.FEATURE_INDEX[name]])
    assert not any(name.startswith(("pos:", "rime:")) for name in heads.READABLE_FEATURES)
    spec = heads.HEADS[heads.HEAD_NAMES.index("Coreference")]
    shown, read, written = heads.query_weights_used(spec)
    w_q, _, _, key_features = heads.projections(spec)
    rows = [heads.FEATURE_INDEX[name] for name in read]
    columns = [key_features.index(name) for name in written]
    np.testing.assert_array_equal(shown, w_q[np.ix_(rows, columns)])
    # Nothing the rule uses is left out.
    assert np.abs(w_q).sum() == pytest.approx(np.abs(shown).sum())


def test_previous_token_head():
    tokens = tokens_of(text.EXAMPLES["The cat sleeps"])
    weights = heads.head_weights(tokens)[heads.HEAD_NAMES.index("Previous token")]
    rows = np.arange(1, len(tokens))
    assert (weights[rows, rows - 1] > 0.99).all()


def test_the_chapter_examples():
    assert strongest(text.EXAMPLES["The cat sleeps"], "Subject ↔ verb", "sleeps") == "cat"
    assert strongest(text.EXAMPLES["The cat sleeps"], "Subject ↔ verb", "barks") == "dog"
    assert strongest(text.EXAMPLES["Coreference"], "Coreference", "he") == "baby"
    assert strongest(text.EXAMPLES["The doctor and the nurse"], "Coreference", "she") == "nurse"
    # Agreement beats distance: "queen" is closer, but "he" is masculine.
    assert strongest(text.EXAMPLES["Agreement"], "Coreference", "he") == "king"
    assert strongest(text.EXAMPLES["Rhyme"], "Rhyme", "hat") == "cat"
    assert strongest(text.EXAMPLES["The cat sleeps"], "Delimiters", "dog") == ","


def test_bidirectional_subject_looks_ahead_to_its_verb():
    sentence = text.EXAMPLES["The cat sleeps"]
    assert strongest(sentence, "Subject ↔ verb", "cat", causal=False) == "sleeps"
    assert strongest(sentence, "Subject ↔ verb", "cat", causal=True) == "cat"


# --- regimes --------------------------------------------------------------------------------

WORDS, _ = regimes.SENTENCE.words("The doctor fired the nurse because she was tired.")


def test_sentence_rules_of_each_page():
    assert regimes.SENTENCE.words("a " * 30) == (
        ["a"] * regimes.MAX_WORDS,
        "Only the first 24 tokens are used on this page.",
    )
    assert inside.SENTENCE.words("a " * 9)[0] == ["a"] * 8
    assert "first 8 tokens" in inside.SENTENCE.words("a " * 9)[1]
    for page in (regimes, inside):
        with pytest.raises(text.InputError):
            page.SENTENCE.words("")


def test_both_regimes_match_reference():
    q, k, v = regimes.qkv(WORDS)
    result = regimes.both_regimes(WORDS)
    for regime, causal in (("causal", True), ("bidirectional", False)):
        out, weights = reference.scaled_dot_product_attention(
            q, k, v, is_causal=causal, return_weights=True
        )
        np.testing.assert_allclose(result[regime][1], weights, atol=1e-12)
        np.testing.assert_allclose(result[regime][0], out, atol=1e-12)


def test_editing_a_later_word_leaves_earlier_causal_rows_untouched():
    position = 6
    change = regimes.edit_effect(WORDS, position, "he")
    assert (change["causal"][:position] == 0).all()
    assert (change["causal"][position:] > 0).all()
    assert (change["bidirectional"] > 0).all()
    assert regimes.rows_changed(change, position) == {
        "causal before the edit": 0,
        "bidirectional": len(WORDS),
    }
    frame = regimes.change_frame(change, [f"row {i}" for i in range(len(WORDS))])
    for regime in regimes.REGIMES:
        drawn = frame[frame["regime"] == regime]
        np.testing.assert_array_equal(drawn["change"], change[regime])
        assert drawn["row"].iloc[-1] == f"row {len(WORDS) - 1}"


def test_alignment_for_fewer_queries_than_keys():
    aligned = regimes.alignment_weights(WORDS, 3)
    top_left, visible_tl = aligned["top_left"]
    bottom_right, visible_br = aligned["bottom_right"]
    n = len(WORDS)
    assert visible_tl[0].sum() == 1  # the first new token sees only the very first key
    assert visible_br[-1].all()  # the last new token sees everything
    np.testing.assert_allclose(top_left[:, visible_tl.shape[1] - 1], 0)
    q, k, v = regimes.qkv(WORDS)
    _, expected = reference.scaled_dot_product_attention(
        q[-3:], k, v, is_causal=True, causal_alignment="bottom_right", return_weights=True
    )
    np.testing.assert_allclose(bottom_right, expected, atol=1e-12)
    assert bottom_right.shape == (3, n)


def test_window_and_gqa_match_reference():
    weights, visible = regimes.window_weights(WORDS, 3)
    assert (visible.sum(axis=1) <= 3).all()
    assert np.all(weights[~visible] == 0)
    q, k, v = regimes.qkv(WORDS)
    _, expected = reference.scaled_dot_product_attention(
        q, k, v, is_causal=True, window=3, return_weights=True
    )
    np.testing.assert_allclose(weights, expected, atol=1e-12)

    gqa = regimes.gqa_weights(WORDS, 4, 2)
    x = regimes.embeddings(WORDS)
    w_q, _, _ = regimes.projections(heads=4, seed=regimes.SEED + 1)
    _, w_k, w_v = regimes.projections(heads=2, seed=regimes.SEED + 2)
    for head in range(4):
        kv = head // 2
        _, expected = reference.scaled_dot_product_attention(
            x @ w_q[head], x @ w_k[kv], x @ w_v[kv], is_causal=True, return_weights=True
        )
        np.testing.assert_allclose(gqa[head], expected, atol=1e-12)
    with pytest.raises(text.InputError):
        regimes.gqa_weights(WORDS, 4, 3)


# --- inside one head ------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [True, False])
def test_one_head_steps(scaled):
    steps = inside.one_head(["The", "cat", "sleeps"], 8, scaled)
    np.testing.assert_allclose(steps.q, steps.x @ steps.w_q)
    assert steps.scale == (1 / math.sqrt(8) if scaled else 1.0)
    visible = reference.visibility(3, 3, is_causal=True)
    np.testing.assert_array_equal(steps.visible, visible)
    np.testing.assert_allclose(steps.weights, reference.softmax(steps.scaled, visible), atol=1e-12)
    np.testing.assert_allclose(steps.output, steps.weights @ steps.v, atol=1e-9)
    np.testing.assert_array_equal(steps.hide_future(steps.scores), np.tril(steps.scores))


def test_softmax_by_hand_is_the_engine_softmax_of_the_visible_keys():
    steps = inside.one_head(["The", "cat", "sat", "on", "it"], 16)
    for row in (0, 2, 4):
        table = inside.softmax_by_hand(steps, row, ["a", "b", "c", "d", "e"])
        assert list(table["key"]) == ["a", "b", "c", "d", "e"][: row + 1]
        expected = reference.softmax(steps.scaled, steps.visible)[row, : row + 1]
        np.testing.assert_allclose(table["weight = exp / sum"], expected, atol=1e-12)
        np.testing.assert_allclose(table["engine weight"], expected, atol=1e-12)


def test_softmax_gradient_and_entropy():
    uniform = np.full((1, 4), 0.25)
    one_hot = np.array([[0.0, 1.0, 0.0, 0.0]])
    assert row_entropy(uniform)[0] == pytest.approx(math.log(4))
    assert row_entropy(one_hot)[0] == 0
    assert inside.softmax_gradient_norm(one_hot)[0] == 0
    # diag(p) - p·pᵀ for p uniform over 4: 3/16 on the diagonal, -1/16 elsewhere.
    assert inside.softmax_gradient_norm(uniform)[0] == pytest.approx(math.sqrt(12 / 16**2 * 4))


def test_without_scaling_softmax_saturates():
    curves = inside.saturation((4, 64, 1024)).set_index(["scaling", "d_k"])
    unscaled, scaled = curves.loc["no scaling"], curves.loc["÷ √d_k"]
    assert unscaled.loc[1024, "max weight"] > 0.9
    assert unscaled.loc[1024, "entropy (nats)"] < 0.3
    assert unscaled.loc[1024, "softmax gradient"] < 0.3 * scaled.loc[1024, "softmax gradient"]
    assert scaled["score std"].between(0.7, 1.4).all()
    assert scaled.loc[1024, "max weight"] < 0.5
    at_64 = inside.saturation_at(inside.saturation((4, 64, 1024)), 64)
    assert at_64.loc["no scaling", "max weight"] == unscaled.loc[64, "max weight"]


# --- cost -----------------------------------------------------------------------------------


def test_lengths_and_memory_models():
    assert cost.lengths(128, 2048) == [128, 256, 512, 1024, 2048]
    assert cost.naive_bytes(1024) == 2 * 1024 * 1024 * 4
    llama = kv_cost.MODEL_SHAPES["Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)"]
    assert kv_cost.kv_cache_bytes(llama, 8_192) == 2**30  # 1 GiB in 16-bit
    table = kv_cost.kv_cache_frame(llama, [8_192, 16_384], bytes_per_value=1).set_index("n")
    assert list(table["size"]) == ["512.0 MiB", "1.0 GiB"]
    assert table.loc[16_384, "GiB"] == 1.0


def test_naive_attention_matches_reference():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((33, 16), dtype=np.float32) for _ in range(3))
    for causal in (False, True):
        expected = reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
        hidden = ~reference.visibility(33, 33, is_causal=causal)
        got = naive.naive_attention(q, k, v, hidden)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_fit_exponent_recovers_a_power_law():
    frame = cost.pd.DataFrame(
        {
            "n": [128, 256, 512, 1024],
            "method": "m",
            "seconds": [3e-9 * n**2 for n in (128, 256, 512, 1024)],
            "status": "measured",
        }
    )
    exponent, constant = cost.fit_exponent(frame, "m")
    assert exponent == pytest.approx(2.0)
    table = cost.projections_table(frame, targets=(1024, 2048))
    assert list(table["how"]) == [
        "measured",
        f"estimated: time per pair at n = 1,024 × {2048**2:,} pairs",
    ]
    assert table["seconds"].iloc[1] == pytest.approx(3e-9 * 2048**2)


def test_timeline_and_tables_extrapolate():
    sizes = [128, 256, 512, 1024]
    frame = cost.pd.DataFrame(
        {
            "n": sizes * 2,
            "method": ["m"] * 4 + ["naive"] * 4,
            "seconds": [3e-9 * n**2 for n in sizes] + [1e-6, 4e-6, np.nan, np.nan],
            "status": ["measured"] * 6 + ["skipped: needs 2 MiB for n² matrices"] * 2,
        }
    )
    fitted = {method: cost.fit_exponent(frame, method) for method in ("m", "naive")}
    assert fitted["naive"] is None  # two points are too few to fit
    assert fitted["m"][0] == pytest.approx(2.0)
    line = cost.timeline(frame, fitted)
    guessed = line[line["kind"] == "extrapolated"]
    assert list(guessed["n"]) == [1024, *cost.TARGET_LENGTHS]
    np.testing.assert_allclose(guessed["seconds"], [3e-9 * n**2 for n in guessed["n"]])
    assert len(line[line["kind"] == "measured"]) == 6
    growth = cost.growth_table(frame).set_index("method")
    assert growth.loc["m", "fitted p"] == pytest.approx(2.0)
    assert growth.isna().loc["naive", "fitted p"] and not growth.loc["naive", "within"]
    stopped = cost.stopped_methods(frame)
    assert list(zip(stopped["method"], stopped["n"], strict=True)) == [("naive", 512)]

    shown = cost.projections_shown(cost.projections_table(frame, targets=(1024, 8_192)))
    assert shown.loc["m", "n = 1,024"] == text.human_seconds(3e-9 * 1024**2)
    assert shown.loc["m", "n = 8,192"] == text.human_seconds(3e-9 * 8192**2) + " *"


def test_fit_exponent_leaves_out_short_contexts():
    # Short calls sit on a flat floor of fixed costs; from FIT_MIN_N on they grow as n².
    sizes = [128, 256, 512, 1024, 2048]
    floor = {128: 2e-3, 256: 2e-3}
    frame = cost.pd.DataFrame(
        {
            "n": sizes,
            "method": "m",
            "seconds": [floor.get(n, 3e-9 * n**2) for n in sizes],
            "status": "measured",
        }
    )
    assert cost.FIT_MIN_N == 512
    exponent, constant = cost.fit_exponent(frame, "m")
    assert exponent == pytest.approx(2.0)
    assert constant == pytest.approx(3e-9)
    everything, _ = cost.fit_exponent(frame, "m", min_n=0)
    assert everything < 1.5  # what the floor does to a fit over every point
    # Too few long points: the longest three are fitted.
    short = frame[frame["n"] <= 1024]
    assert cost.fit_exponent(short, "m") == cost.fit_exponent(short[1:], "m", min_n=0)


def test_time_call_keeps_the_best_of_more_runs_for_faster_calls(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])

    def calls_taking(durations):
        runs = iter(durations)
        count = [0]

        def function():
            count[0] += 1
            clock[0] += next(runs)

        return function, count

    # Slow calls: at least three runs once the budget is spent, the fastest one kept.
    function, count = calls_taking([0.05, 0.02, 0.03, 0.02])
    assert cost.time_call(function, budget_seconds=0.04) == pytest.approx(0.02)
    assert count[0] == 3
    # Very slow calls stop at four budgets, even before three runs.
    function, count = calls_taking([0.1, 0.1, 0.1])
    cost.time_call(function, budget_seconds=0.04)
    assert count[0] == 2
    # Fast calls repeat until the budget is spent, up to max_repeats.
    function, count = calls_taking([1e-3] * 100)
    cost.time_call(function, budget_seconds=0.04)
    assert count[0] == 40
    function, count = calls_taking([1e-5] * 100)
    cost.time_call(function, budget_seconds=0.04, max_repeats=50)
    assert count[0] == 50


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.mark.skipif(not blas_threads(), reason="NumPy here uses no BLAS that threadpoolctl sees")
@pytest.mark.parametrize("threads", [1, 2])
def test_sweep_runs_numpy_under_the_engine_thread_limit(monkeypatch, threads):
    before = blas_threads()
    seen = []
    naive_attention = cost.naive_attention

    def spy(q, k, v, hidden=None):
        seen.extend(blas_threads())
        return naive_attention(q, k, v, hidden)

    monkeypatch.setattr(cost, "naive_attention", spy)
    frame = cost.sweep([64], 16, include_torch=False, threads=threads)
    assert set(seen) == {1, threads}
    assert frame.set_index("method").loc[cost.NAIVE, "status"] == "measured"
    assert blas_threads() == before  # the limit is lifted afterwards


def test_sweep_measures_and_respects_the_memory_budget():
    frame = cost.sweep([64, 128], 16, memory_budget=100_000, include_torch=False)
    naive = frame[frame["method"] == "NumPy naive full"].set_index("n")
    assert naive.loc[64, "status"] == "measured"  # 2·64²·4 bytes = 32 KiB
    assert naive.loc[128, "status"].startswith("skipped")  # 128 KiB > budget
    assert (frame[frame["status"] == "measured"]["seconds"] > 0).all()
    with pytest.raises(cost.SweepTooLarge):
        cost.sweep([1 << 20], 64, memory_budget=2**20, include_torch=False)


def test_results_csv_marks_estimates():
    frame = cost.pd.DataFrame(
        {
            "n": [128, 256, 512],
            "method": "NumPy naive full",
            "seconds": [1e-3, 4e-3, 1.6e-2],
            "status": "measured",
            "gflops": 1.0,
        }
    )
    projections = cost.projections_table(frame, targets=(512, 200_000), memory_budget=2**30)
    assert "would need" in projections["how"].iloc[1]  # 2·200000²·4 bytes is far over 1 GiB
    csv = cost.results_csv(frame, projections, threads=2)
    rows = cost.pd.read_csv(io.StringIO(csv))
    assert len(rows) == 3 + 1
    assert list(rows["estimated"]) == [False, False, False, True]
    assert (rows["threads"] == 2).all()
