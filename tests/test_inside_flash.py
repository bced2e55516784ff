"""The FlashAttention stepper on the 'Inside one head' page: its block-by-block online softmax
gives the reference's softmax row, log-sum-exp and output, and the engine's to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
from attnscope import reference
from attnscope.dashboard import engine, inside


def random_head(n: int = 11, d_k: int = 6, d_v: int = 5, seed: int = 0, spread: float = 3.0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((n, d_k)) * spread,
        rng.standard_normal((n, d_k)),
        rng.standard_normal((n, d_v)),
    )


@pytest.mark.parametrize("block", [1, 2, 3, 4, 11, 64])
@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"is_causal": True, "window": 3}])
def test_flash_row_equals_the_reference_softmax(block, options):
    q, k, v = random_head()
    n = len(q)
    scale = 1 / np.sqrt(q.shape[1])
    out, weights, lse = reference.scaled_dot_product_attention(
        q, k, v, scale=scale, return_weights=True, return_lse=True, **options
    )
    visible = reference.visibility(n, n, **options)
    for row in range(n):
        flash = inside.flash_row(q[row], k, v, scale=scale, visible=visible[row], block=block)
        assert len(flash.steps) == -(-n // block)
        np.testing.assert_allclose(flash.weights(), weights[row], rtol=0, atol=1e-12)
        np.testing.assert_allclose(flash.output, out[row], rtol=0, atol=1e-12)
        assert flash.lse == pytest.approx(lse[row], abs=1e-12)
        # No step holds more than one block of scores.
        assert max(step.scores.size for step in flash.steps) <= block
        # Blocks the mask hides entirely are skipped and change nothing.
        for step in flash.steps:
            assert step.skipped == (not visible[row, step.start : step.stop].any())


def test_flash_row_rescales_when_a_later_block_has_a_larger_score():
    # Scores 0, 0 in the first block, then 5: m rises from 0 to 5, so the first block's sum
    # and output are multiplied by exp(0 − 5).
    query = np.array([1.0])
    keys = np.array([[0.0], [0.0], [5.0]])
    values = np.array([[1.0], [2.0], [3.0]])
    flash = inside.flash_row(query, keys, values, scale=1.0, visible=np.ones(3, bool), block=2)
    first, second = flash.steps
    assert first.running_max == 0.0 and first.running_sum == 2.0 and first.rescale == 0.0
    assert second.rescale == pytest.approx(np.exp(-5.0))
    assert second.running_sum == pytest.approx(2 * np.exp(-5.0) + 1.0)
    assert first.partial_output == pytest.approx([1.5])
    expected = reference.softmax(query @ keys.T, np.ones(3, bool)) @ values
    np.testing.assert_allclose(flash.output, expected, atol=1e-12)


def test_flash_row_with_no_visible_key_gives_zeros():
    q, k, v = random_head(n=4)
    flash = inside.flash_row(q[0], k, v, scale=1.0, visible=np.zeros(4, bool), block=2)
    assert flash.lse == -np.inf and all(step.skipped for step in flash.steps)
    assert not flash.output.any() and not flash.weights().any()


def test_flash_row_refuses_bad_arguments():
    q, k, v = random_head(n=4)
    visible = np.ones(4, bool)
    with pytest.raises(ValueError, match="block"):
        inside.flash_row(q[0], k, v, scale=1.0, visible=visible, block=0)
    with pytest.raises(ValueError, match="block"):
        inside.flash_row(q[0], k, v, scale=1.0, visible=visible, block=1.5)
    with pytest.raises(ValueError, match="width"):
        inside.flash_row(q[0, :3], k, v, scale=1.0, visible=visible, block=2)
    with pytest.raises(ValueError, match="query must be"):
        inside.flash_row(q, k, v, scale=1.0, visible=visible, block=2)
    with pytest.raises(ValueError, match="visible"):
        inside.flash_row(q[0], k, v, scale=1.0, visible=visible[:3], block=2)
    before = q.copy()
    inside.flash_row(q[0], k, v, scale=1.0, visible=visible, block=2)
    np.testing.assert_array_equal(q, before)  # inputs are never modified


def test_flash_row_matches_the_engine_weights_and_lse():
    q, k, v = random_head(n=9)
    out, weights, lse = engine.attention_with_lse(q, k, v, is_causal=True)
    visible = reference.visibility(9, 9, is_causal=True)
    for row in range(9):
        flash = inside.flash_row(
            q[row], k, v, scale=1 / np.sqrt(q.shape[1]), visible=visible[row], block=2
        )
        np.testing.assert_allclose(flash.weights(), weights[row], atol=1e-6)
        assert flash.lse == pytest.approx(lse[row], abs=1e-6)
        np.testing.assert_allclose(flash.output, out[row], atol=1e-6)


def test_flash_tables():
    q, k, v = random_head(n=5)
    visible = reference.visibility(5, 5, is_causal=True)[1]
    flash = inside.flash_row(q[1], k, v, scale=1.0, visible=visible, block=2)
    table = inside.flash_table(flash, list("abcde"), upto=3)
    assert list(table["keys"]) == ["a, b", "c, d", "e"]
    assert list(table["block max"])[1:] == ["skipped", "skipped"]
    assert table["scaled scores"].iloc[1] == "hidden, hidden"
    memory = inside.flash_memory(5, 2, 4)
    assert memory.iloc[0, 1] == "5 scores" and memory.iloc[1, 1] == "2 scores + m + l + 4 outputs"
