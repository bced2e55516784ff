"""The dashboard's one memory budget and its one input parser: estimates against the arrays
the actions really allocate, refusals before any allocation, and the Cost page's decoding step
refused with a message (not the server's memory) when a custom shape is too large."""

from __future__ import annotations

import tracemalloc

import attnscope
import numpy as np
import pytest
from attnscope.dashboard import budget, cost, kv_cost, text
from test_dashboard_app import open_page

GiB = 2**30


def test_the_budget_comes_from_the_environment_or_defaults_to_one_gib(monkeypatch):
    meminfo = budget.free_bytes()
    assert meminfo is None or meminfo > 0
    assert budget.configured_bytes({}) == GiB
    assert budget.configured_bytes({budget.ENVIRONMENT_VARIABLE: "1048576"}) == 2**20
    assert budget.configured_bytes({budget.ENVIRONMENT_VARIABLE: "512M"}) == 512 * 2**20
    assert budget.configured_bytes({budget.ENVIRONMENT_VARIABLE: "1.5GiB"}) == 3 * 2**29
    for bad in ("lots", "0", "-5G", "1e400"):
        with pytest.raises(ValueError, match=budget.ENVIRONMENT_VARIABLE):
            budget.configured_bytes({budget.ENVIRONMENT_VARIABLE: bad})
    # At most half of what the machine has free at the time.
    monkeypatch.setattr(budget, "free_bytes", lambda: None)
    assert budget.budget_bytes({}) == GiB
    monkeypatch.setattr(budget, "free_bytes", lambda: 100 * 2**20)
    assert budget.budget_bytes({}) == 50 * 2**20
    assert budget.budget_bytes({budget.ENVIRONMENT_VARIABLE: "8M"}) == 8 * 2**20


def test_check_names_the_action_the_sizes_and_what_to_lower():
    small = {budget.ENVIRONMENT_VARIABLE: "1M"}
    assert budget.check(2**20, "A thing", lower="x", environ=small) == 2**20
    with pytest.raises(budget.OverBudget) as refused:
        budget.check(3 * 2**20, "A thing", lower="the size", environ=small)
    assert str(refused.value) == (
        "A thing would need about 3.0 MiB of memory, more than the 1.0 MiB this server allows "
        "one action; lower the size."
    )
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize(("kv_heads", "head_dim", "tokens"), [(2, 64, 300), (3, 80, 1_000)])
def test_decode_estimate_covers_the_arrays_the_step_allocates(kv_heads, head_dim, tokens):
    keys = np.ones((1, kv_heads, tokens, head_dim), dtype=np.float32)
    held = 2 * keys.nbytes
    for storage in kv_cost.STORAGES:
        cache = attnscope.KVCache(kv_heads, head_dim, storage=storage)
        cache.append(keys, keys)
        held += cache.nbytes
    query_heads = 2 * kv_heads
    held += 2 * query_heads * head_dim * 4  # the query and the output
    rows = [kv_cost.storage_row_bytes(head_dim, storage) for storage in kv_cost.STORAGES]
    estimate = budget.estimate_decode_step(query_heads, kv_heads, head_dim, tokens, rows)
    assert held <= estimate <= held * budget.SLACK + 1


def test_a_decoding_step_over_budget_is_refused_before_allocating(monkeypatch):
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "16M")
    shape = kv_cost.ModelShape(1, 8, 8, 128)  # 4,096 tokens: 32 MiB of keys and values
    tracemalloc.start()
    try:
        with pytest.raises(budget.OverBudget, match="lower the kv heads, the head dim or"):
            kv_cost.decode_step_times(shape, 4_096, repeats=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    # The largest custom shape the page accepts is refused under the default budget too.
    monkeypatch.delenv(budget.ENVIRONMENT_VARIABLE)
    with pytest.raises(budget.OverBudget, match="256.0 GiB|GiB of memory"):
        kv_cost.decode_step_times(kv_cost.ModelShape(512, 1024, 1024, 1024), 32_768)
    # Under the budget it still runs.
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "64M")
    steps = kv_cost.decode_step_times(shape, 1_024, repeats=1)
    assert list(steps["storage"]) == list(kv_cost.STORAGES)


def test_cost_page_refuses_a_decoding_step_over_budget_with_a_message(monkeypatch):
    real_sweep = cost.sweep

    def short_sweep(sizes, *args, **kwargs):  # the page's sweep at its two shortest lengths
        return real_sweep(sizes[:2], *args, **{**kwargs, "total_seconds": 2})

    monkeypatch.setattr(cost, "sweep", short_sweep)
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "16M")
    app = open_page("cost.py")
    app.selectbox(key="cost_shape").select("Custom…").run()
    app.number_input(key="cost_custom_query_heads").set_value(8).run()
    app.number_input(key="cost_custom_kv_heads").set_value(8).run()
    app.number_input(key="cost_custom_head_dim").set_value(128).run()
    app.select_slider(key="cost_decode_n").set_value(4_096).run()
    app.button(key="cost_decode_run").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert [e.value for e in app.error] == [
        "A decoding step over 4,096 cached tokens of 8 kv heads of 128 would need about "
        f"{text.human_bytes(cost_estimate(8, 8, 128, 4_096))} of memory, more than the "
        "16.0 MiB this server allows one action; lower the kv heads, the head dim or the "
        "cached tokens."
    ]
    assert not any("speed-up vs float32" in d.value.columns for d in app.dataframe)


def cost_estimate(query_heads, kv_heads, head_dim, tokens) -> int:
    rows = [kv_cost.storage_row_bytes(head_dim, storage) for storage in kv_cost.STORAGES]
    return budget.estimate_decode_step(query_heads, kv_heads, head_dim, tokens, rows)


def test_estimates_of_masks_attention_and_replays():
    assert budget.estimate_dense_mask(100, 300) == np.zeros((100, 300), dtype=bool).nbytes
    assert budget.estimate_dense_mask(100, 300, layout_block=64) == 30_000 + 2 * 5
    arrays = [np.zeros((n, 64), dtype=np.float32) for n in (100, 100, 300, 300)]
    assert budget.estimate_attention(100, 300, 64) == sum(a.nbytes for a in arrays)
    # 3 steps after a 5-token prompt: caches of 5, 6 and 7 keys, per layer and head.
    kept = [np.zeros((2, 4, n), dtype=np.float32) for n in (5, 6, 7)]
    assert budget.estimate_replay(2, 4, 5, 3) == sum(a.nbytes for a in kept)


def test_the_parser_turns_every_bad_value_into_a_named_value_error():
    assert budget.whole_number(7, "n") == 7
    assert budget.whole_number(7.0, "n") == 7
    assert budget.whole_number(np.int64(7), "n") == 7
    assert budget.whole_number(" 1_024 ", "n", minimum=1) == 1_024
    assert budget.whole_numbers("1; 2,3 ,", "ids") == (1, 2, 3)
    assert budget.whole_numbers("", "ids") == ()
    for value in (True, None, 2.5, float("nan"), float("inf"), "ten", "1e3", [1], "9" * 5_000):
        with pytest.raises(ValueError, match="^n must be a whole number"):
            budget.whole_number(value, "n")
    with pytest.raises(ValueError, match="n must be a whole number from 1 to 10, got 11"):
        budget.whole_number(11, "n", minimum=1, maximum=10)
    with pytest.raises(ValueError, match="of at least 0, got -1"):
        budget.whole_number(-1, "n", minimum=0)
    with pytest.raises(ValueError, match="from 0 to 2\\*\\*63 - 1, got 9,223,372,036,854,775,808"):
        budget.whole_number(2**63, "n", minimum=0, maximum=2**63 - 1)
    with pytest.raises(ValueError, match="ids must be whole numbers separated by commas"):
        budget.whole_numbers("1, two", "ids")
    with pytest.raises(ValueError, match="ids must be text"):
        budget.whole_numbers(None, "ids")


def test_a_generation_replay_is_estimated_exactly_and_refused_past_the_budget(
    tmp_path, monkeypatch
):
    import attnscope.models as am
    from attnscope.dashboard import generation
    from fixtures.llama_checkpoints import write_tiny_llama_folder

    model = am.load(write_tiny_llama_folder(tmp_path / "tiny"))
    request = generation.prepare(
        model, "the sun in the north", mode="continue", max_new_tokens=6, temperature=0.0
    )
    replay = generation.run(model, request)
    kept = sum(row.nbytes for row in replay.attention)
    prompt = len(request.prompt_tokens)
    assert kept == budget.estimate_replay(model.num_layers, model.num_heads, prompt, replay.steps)
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "4K")
    with pytest.raises(budget.OverBudget, match="Replaying 6 new tokens of .* lower the new"):
        generation.prepare(
            model, "the sun in the north", mode="continue", max_new_tokens=6, temperature=0.0
        )


def test_sparse_page_masks_and_timings_keep_within_the_budget(monkeypatch):
    from attnscope.dashboard import sparse

    if not sparse.masks_available():
        pytest.skip("this build has no attnscope.masks (mask expressions)")
    pattern = sparse.Pattern(sparse.WINDOW)
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "1M")
    picture = sparse.picture(pattern, 256, 4)  # 64 KiB of mask and 4 KiB of tiles: drawn
    assert picture.dense.nbytes == budget.estimate_dense_mask(256, 256)
    assert sparse.dense_refusal(1_024) is None  # exactly 1 MiB
    assert sparse.dense_refusal(2_048) == (
        "not built: its 2,048×2,048 bool mask alone needs 4.0 MiB"
    )
    monkeypatch.setenv(budget.ENVIRONMENT_VARIABLE, "32K")
    with pytest.raises(budget.OverBudget, match="Drawing the mask at L = 256 .* lower the drawn"):
        sparse.picture(pattern, 256, 4)
    seconds, status = sparse.time_method(pattern, 256, sparse.EXPRESSION)
    assert np.isnan(seconds) and status == "not run: its inputs need 256.0 KiB"
