"""attnscope.learning: the trainer's gradients against finite differences, its attention
against the reference, its data and head scores against hand-built cases, its determinism,
its argument checks, short runs that learn, and its refusal without the compiled engine."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from attnscope import _attention, _engine, learning
from attnscope import reference as ref

TINY = learning.TrainConfig(
    num_layers=2,
    num_heads=2,
    d_model=8,
    vocab_size=10,
    seq_len=6,
    batch_size=3,
    steps=12,
    report_every=4,
    eval_size=4,
    dtype=np.float64,
)


def numerical_gradient(trainer: learning.Trainer, batch: learning.Batch, name: str) -> np.ndarray:
    """Central differences of the loss w.r.t. every entry of one parameter (float64)."""
    param = trainer.params[name]
    grad = np.zeros_like(param)
    step = 1e-6
    for index in np.ndindex(param.shape):
        kept = param[index]
        param[index] = kept + step
        above, _ = trainer.loss_and_gradients(batch)
        param[index] = kept - step
        below, _ = trainer.loss_and_gradients(batch)
        param[index] = kept
        grad[index] = (above - below) / (2 * step)
    return grad


@pytest.mark.parametrize(
    ("task", "options"),
    [
        ("induction", {}),
        ("induction", {"scale": 1.0, "layer_norm": False}),
        ("previous_token", {"mlp": True}),
        ("agreement", {"vocab_size": 18, "seq_len": 5, "num_layers": 1, "num_heads": 4}),
    ],
)
def test_gradients_match_finite_differences(task, options):
    config = replace(TINY, task=task, **options)
    trainer = learning.Trainer(config)
    # Take a few steps first so the weights are not at their symmetric start.
    for _ in range(3):
        trainer.train_step()
    batch = learning.make_batch(
        task, np.random.default_rng(5), 3, config.seq_len, config.vocab_size
    )
    _, grads = trainer.loss_and_gradients(batch)
    assert set(grads) == set(trainer.params)
    for name, grad in grads.items():
        expected = numerical_gradient(trainer, batch, name)
        assert grad.shape == expected.shape and grad.dtype == np.float64
        largest = max(float(np.abs(expected).max()), 1e-3)
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-6 * largest, err_msg=name)


def test_attention_maps_are_the_reference_attention_of_the_model():
    config = replace(TINY, layer_norm=False)
    trainer = learning.Trainer(config)
    tokens = learning.held_out_data(config)[1]
    maps = trainer.attention_maps(tokens)
    assert maps.shape == (2, len(tokens), 2, 6, 6)
    # Layer 0 reads the embeddings themselves: its maps follow from W_Q, W_K alone.
    params = trainer.params
    x = params["token_embedding"][tokens] + params["position_embedding"]
    heads = [
        (x @ params[f"0.w_{m}"]).reshape(len(tokens), 6, 2, 4).transpose(0, 2, 1, 3) for m in "qkv"
    ]
    _, weights = ref.scaled_dot_product_attention(*heads, is_causal=True, return_weights=True)
    np.testing.assert_allclose(maps[0], weights, rtol=0, atol=1e-12)


def test_float32_training_follows_float64():
    # The same run in both precisions: float32 rounding must not change the losses' course.
    config = replace(TINY, steps=8, report_every=8)
    losses = {
        dtype: [r.loss for r in learning.train(replace(config, dtype=dtype))]
        for dtype in (np.float32, np.float64)
    }
    np.testing.assert_allclose(losses[np.float32], losses[np.float64], rtol=1e-4)


def test_same_seed_same_run_bitwise():
    config = replace(TINY, dtype=np.float32)
    first, second = learning.train(config), learning.train(config)
    assert [r.step for r in first] == [0, 4, 8, 12]
    for a, b in zip(first, second, strict=True):
        assert a.loss == b.loss and a.train_loss == b.train_loss and a.accuracy == b.accuracy
        for field in ("previous_token", "induction", "entropy", "qk_grad_norm", "maps"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    other = learning.train(replace(config, seed=1))
    assert other[-1].loss != first[-1].loss


def test_reports_go_to_the_callback_in_order():
    seen = []
    reports = learning.train(replace(TINY, steps=6, report_every=4), on_report=seen.append)
    assert seen == reports
    assert [r.step for r in reports] == [0, 4, 6]
    assert reports[0].train_loss is None and reports[1].train_loss is not None
    assert all(r.steps == 6 for r in reports)


def repeated_block_maps(period: int, row_target) -> np.ndarray:
    """A (1, 1, 1, 2P, 2P) causal map where row i puts all its weight on row_target(i)."""
    length = 2 * period
    maps = np.zeros((1, 1, 1, length, length))
    for i in range(length):
        maps[0, 0, 0, i, row_target(i)] = 1.0
    return maps


def test_head_scores_of_hand_built_patterns():
    period = 6
    induction_target = lambda i: i - period + 1 if i >= period else i  # noqa: E731
    previous, induction, entropy = learning.head_scores(
        repeated_block_maps(period, induction_target)
    )
    assert induction[0, 0] == 1.0
    assert previous[0, 0] == 0.0  # i - P + 1 is never i - 1 when P > 2
    assert entropy[0, 0] == 0.0
    previous, induction, _ = learning.head_scores(
        repeated_block_maps(period, lambda i: max(i - 1, 0))
    )
    assert previous[0, 0] == 1.0 and induction[0, 0] == 0.0

    # Uniform causal attention: row i gives 1/(i+1) to each key it sees.
    length = 2 * period
    uniform = np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None]
    previous, induction, entropy = learning.head_scores(uniform[None, None, None])
    rows = np.arange(length)
    assert math.isclose(previous[0, 0], np.mean(1 / (rows[1:] + 1)))
    assert math.isclose(induction[0, 0], np.mean(1 / (rows[period:] + 1)))
    assert math.isclose(entropy[0, 0], np.mean(np.log(rows + 1)))


def test_induction_batches_repeat_with_a_varying_period():
    batch = learning.make_batch("induction", np.random.default_rng(0), 200, 32, 64)
    tokens, targets, counted = batch.tokens, batch.targets, batch.counted
    assert np.array_equal(targets[:, :-1], tokens[:, 1:])
    periods = set()
    for row in range(len(tokens)):
        positions = np.flatnonzero(counted[row])
        period = positions[0]  # the first counted position starts the second copy
        periods.add(int(period))
        assert np.array_equal(positions, np.arange(period, 2 * period - 1))
        block = tokens[row, :period]
        assert len(set(block)) == period  # distinct: the earlier occurrence is unique
        assert np.array_equal(tokens[row, period : 2 * period], block)
    assert periods == set(range(8, 17))


def test_agreement_targets_are_the_noun_of_the_pronouns_gender():
    names = learning.token_names("agreement", 30)
    batch = learning.make_batch("agreement", np.random.default_rng(0), 100, 9, 30)
    assert np.array_equal(batch.counted.sum(axis=1), np.ones(100))
    for tokens, target in zip(batch.tokens, batch.targets[:, -1], strict=True):
        words = [names[i] for i in tokens]
        nouns = learning.AGREEMENT_WORDS[words[-1]]
        earlier = [w for w in words[:-1] if w in nouns]
        assert earlier == [names[target]]


def test_previous_token_batches():
    batch = learning.make_batch("previous_token", np.random.default_rng(0), 4, 10, 20)
    assert np.array_equal(batch.targets[:, 1:], batch.tokens[:, :-1])
    assert not batch.counted[:, 0].any() and batch.counted[:, 1:].all()


def test_short_training_learns_the_previous_token_task():
    config = learning.TrainConfig(
        task="previous_token", num_layers=1, steps=150, report_every=50, seed=3
    )
    reports = learning.train(config)
    first, last = reports[0], reports[-1]
    assert last.loss < 0.5 * first.loss
    assert last.accuracy > 0.5 > first.accuracy
    # The task is solved by looking one step back: some head learned exactly that.
    assert last.previous_token.max() > 0.5 > first.previous_token.max()


def test_removing_the_scale_saturates_wide_heads_at_the_start():
    # Same weights, d_k = 64: without 1/√d_k the scores are 8 times larger and the softmax
    # starts far more peaked.
    config = learning.TrainConfig(d_model=128, num_heads=2, steps=0, eval_size=16)
    scaled = learning.train(config)[0]
    unscaled = learning.train(replace(config, scale=1.0))[0]
    assert unscaled.entropy.mean() < 0.5 * scaled.entropy.mean()


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"task": "sorting"}, ValueError, "task"),
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"num_heads": 3}, ValueError, "multiple of num_heads"),
        ({"d_model": 64.0}, TypeError, "d_model"),
        ({"steps": True}, TypeError, "steps"),
        ({"scale": "sqrt2"}, ValueError, "scale"),
        ({"scale": 0.0}, ValueError, "scale"),
        ({"scale": True}, TypeError, "scale"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"mlp": 1}, TypeError, "mlp"),
        ({"dtype": np.int32}, TypeError, "dtype"),
        ({"dtype": "no such type"}, TypeError, "dtype"),
        ({"dtype": None}, TypeError, "dtype"),
        ({"vocab_size": 8, "seq_len": 32}, ValueError, "vocab_size"),
        ({"task": "agreement", "vocab_size": 12}, ValueError, "vocab_size"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_configs_are_refused_with_the_argument_named(options, error, words):
    with pytest.raises(error, match=words):
        learning.TrainConfig(**options)


def test_bad_calls_are_refused():
    with pytest.raises(TypeError, match="config"):
        learning.Trainer({"task": "induction"})
    with pytest.raises(ValueError, match="task"):
        learning.make_batch("copy", np.random.default_rng(0), 2, 8, 16)
    trainer = learning.Trainer(TINY)
    with pytest.raises(ValueError, match="tokens"):
        trainer.attention_maps(np.zeros((2, 7), dtype=int))  # longer than seq_len
    with pytest.raises(TypeError, match="integer"):
        trainer.attention_maps(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="token ids"):
        trainer.attention_maps(np.full((2, 6), 10))
    with pytest.raises(ValueError, match="maps"):
        learning.head_scores(np.zeros((2, 3, 4, 4)))
    before = {name: p.copy() for name, p in trainer.params.items()}
    with pytest.raises(ValueError, match="steps"):
        list(trainer.run(steps=-1))
    grads = {name: np.zeros_like(p) for name, p in trainer.params.items()}
    grads["unembedding"] = grads["unembedding"][:, :3]
    with pytest.raises(ValueError, match="unembedding"):
        trainer.apply_gradients(grads)
    with pytest.raises(ValueError, match="one array per parameter"):
        trainer.apply_gradients({"token_embedding": grads["token_embedding"]})
    assert trainer.step == 0
    assert all(np.array_equal(before[n], trainer.params[n]) for n in before)


@pytest.mark.parametrize("learning_rate", [1e300, 1e30])
def test_a_diverging_run_stops_with_a_report_that_says_so(learning_rate):
    healthy = learning.train(replace(TINY, dtype=np.float32, steps=40, report_every=4))
    config = replace(TINY, dtype=np.float32, steps=40, report_every=4, learning_rate=learning_rate)
    reports = learning.train(config)
    *kept, last = reports
    assert last.diverged and not any(r.diverged for r in kept)
    assert last.step < config.steps  # stopped early, at the step that broke
    assert math.isnan(last.loss) and np.isnan(last.maps).all()
    assert not math.isfinite(last.train_loss)  # the steps that broke are reported as they were
    # The reports before the divergence are measured as usual: step 0 is the healthy run's.
    assert [r.step for r in kept] == [r.step for r in healthy[: len(kept)]]
    assert kept[0].loss == healthy[0].loss
    for report in kept:
        assert math.isfinite(report.loss) and np.isfinite(report.maps).all()
    # The trainer says the same when asked directly.
    trainer = learning.Trainer(config)
    for _ in range(last.step):
        trainer.train_step()
    assert not trainer.weights_finite() or trainer.report().diverged


def test_without_the_compiled_engine_training_refuses_and_says_why(monkeypatch):
    made_before = learning.Trainer(TINY)
    # As if attnscope._core had failed to import (_attention binds the two calls it makes).
    monkeypatch.setattr(_engine, "_compiled", None)
    monkeypatch.setattr(_attention, "_core_sdpa", None)
    monkeypatch.setattr(_attention, "_core_backward", None)
    not_built = pytest.raises(ImportError, match="compiled engine .* could not be imported")
    with not_built:
        learning.Trainer(TINY)
    with not_built:
        learning.train(TINY)
    # A trainer made while the engine was there does not fall back to the reference either.
    with not_built:
        made_before.train_step()
    with not_built:
        made_before.attention_maps(made_before.probe)
