"""Head ablation, activation patching and attention rollout on real models.

An intervention replaces one head's slice of the concatenated head outputs before the output
projection (TransformerLens's ``hook_z``). Checked four ways:

- against transformers with forward pre-hooks on each output projection that zero, average or
  replace that slice, live where torch and transformers are importable (SmolLM2, MiniLM, tiny
  GPT-2 and Llama checkpoints), and through numbers those hooks stored once
  (tests/fixtures/interventions_reference.npz, made by make_interventions_reference.py) where
  they are not;
- against a plain float64 NumPy GPT-2 written here, on a tiny random checkpoint;
- ``head_effects`` and ``patching_effects`` against the naive loop: one full ``encode`` per head;
- no intervention is bit for bit the plain forward pass, and bad arguments are refused.

Tolerance on logits: 2e-3 of their largest magnitude. The Q4_1 GGUF model is dequantized to
the same float32 weights on both sides; the stored SmolLM2 cases agree to 1.5e-6 of that scale
(measured), so 2e-3 leaves room for another BLAS while ablating the wrong head or slice moves
the logits by far more (the stored cases change them by 0.1 to several units).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import attnscope.models as am
import numpy as np
import pytest
from attnscope.models import interventions
from conftest import needs_minilm, needs_smollm2
from fixtures.llama_checkpoints import write_tiny_llama_folder
from fixtures.make_interventions_reference import (
    CLEAN,
    CORRUPT,
    MINILM_CASES,
    MINILM_TEXT,
    SMOLLM2_CASES,
    head_slice,
    log_softmax,
    run,
)
from fixtures.models_checkpoints import write_tiny_gpt2

REFERENCE_FILE = Path(__file__).parent / "fixtures" / "interventions_reference.npz"
LOGITS_RELATIVE = 2e-3
GPT2_TEXT = "the doctor fired the nurse because she was tired"
LLAMA_TEXT = "the nurse sat in the shade"


def transformers_or_skip():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def assert_logits_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LOGITS_RELATIVE * scale)


def edits_for(trace_or_outputs, how: str, heads, width: int | None = None) -> dict:
    """The hooks' edits for `heads`: an ablation kind, or the clean run's slices for a patch."""
    if how != "patch":
        return dict.fromkeys(heads, how)
    return {h: head_slice(trace_or_outputs, *h, width) for h in heads}


def our_run(model: am.Model, clean_ids, corrupt_ids, how: str, heads) -> am.Trace:
    """encode with the same intervention: ablation of the clean input, or the corrupt input
    patched from the clean one."""
    if how == "patch":
        source = model.encode(ids=clean_ids)
        return model.encode(ids=corrupt_ids, patch=dict.fromkeys(heads, source))
    return model.encode(ids=clean_ids, ablate=list(heads), ablation=how)


# --- models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE_FILE) as stored:
        return dict(stored)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny", n_layer=3, n_head=4)


@pytest.fixture(scope="module")
def gpt2(gpt2_folder) -> am.Model:
    return am.load(gpt2_folder)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return write_tiny_llama_folder(tmp_path_factory.mktemp("llama") / "tiny", num_hidden_layers=3)


@pytest.fixture(scope="module")
def llama(llama_folder) -> am.Model:
    return am.load(llama_folder)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    transformers = transformers_or_skip()
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    path = smollm2.path
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager"
    ).eval()


@pytest.fixture(params=["gpt2", "llama", "minilm"])
def any_model(request) -> am.Model:
    return request.getfixturevalue(request.param)


def text_for(model: am.Model) -> str:
    return LLAMA_TEXT if model.family == "Llama" else GPT2_TEXT


# --- no intervention ---------------------------------------------------------------------------


def test_no_intervention_is_bitwise_the_plain_forward(any_model):
    text = text_for(any_model)
    plain = any_model.encode(text)
    for options in ({"ablate": []}, {"ablate": [], "ablation": "mean", "patch": {}}):
        again = any_model.encode(text, **options)
        for name in ("attentions", "hidden_states", "logits", "head_outputs"):
            assert np.array_equal(getattr(again, name), getattr(plain, name)), (options, name)


def test_patching_a_head_with_its_own_output_changes_nothing(llama):
    plain = llama.encode(LLAMA_TEXT)
    patched = llama.encode(LLAMA_TEXT, patch={(1, 2): plain, (2, 0): plain})
    assert np.array_equal(patched.logits, plain.logits)


def test_head_outputs_shape_and_the_ablated_slice(any_model):
    text = text_for(any_model)
    trace = any_model.encode(text, ablate=[(1, 2)])
    n = len(trace.tokens)
    shape = (any_model.num_layers, any_model.num_heads, n, any_model.head_dim)
    assert trace.head_outputs.shape == shape and trace.head_outputs.dtype == np.float32
    assert not trace.head_outputs[1, 2].any()
    plain = any_model.encode(text)
    # Layers up to the ablated one are untouched; what follows it is computed again.
    np.testing.assert_array_equal(trace.attentions[:2], plain.attentions[:2])
    assert not np.array_equal(trace.attentions[2], plain.attentions[2])
    mean = any_model.encode(text, ablate=[(1, 2)], ablation="mean")
    expected = np.broadcast_to(plain.head_outputs[1, 2].mean(axis=0), (n, any_model.head_dim))
    np.testing.assert_allclose(mean.head_outputs[1, 2], expected, rtol=0, atol=1e-6)


# --- a plain NumPy GPT-2 -------------------------------------------------------------------------


def numpy_gpt2(folder: Path, ids: np.ndarray, edits: dict) -> tuple[np.ndarray, np.ndarray]:
    """GPT-2 in float64, written from the paper's equations, with `edits` {(layer, head):
    "zero" | "mean" | (n, head_dim) array} applied to the concatenated head outputs. Returns
    the logits and every layer's concatenated head outputs (as the hooks record them)."""
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    heads, d = config["n_head"], config["n_embd"]
    width, n = d // heads, ids.size

    def norm(x, name):
        centred = x - x.mean(-1, keepdims=True)
        scale = np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
        return centred / scale * w[name + ".weight"] + w[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = w["wte.weight"][ids] + w["wpe.weight"][:n]
    recorded = []
    for layer in range(config["n_layer"]):
        p = f"h.{layer}."
        qkv = norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        merged = np.empty((n, d))
        for head in range(heads):
            q, k, v = (qkv[:, i * d + head * width : i * d + (head + 1) * width] for i in range(3))
            scores = q @ k.T / np.sqrt(width) + np.triu(np.full((n, n), -np.inf), 1)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            merged[:, head * width : (head + 1) * width] = weights @ v
        for (where, head), how in edits.items():
            if where != layer:
                continue
            part = merged[:, head * width : (head + 1) * width]
            if isinstance(how, str):
                part[:] = 0.0 if how == "zero" else part.mean(axis=0)
            else:
                part[:] = how
        recorded.append(merged.copy())
        x = x + merged @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        up = norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
        x = x + gelu(up) @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return norm(x, "ln_f") @ w["wte.weight"].T, np.stack(recorded)


GPT2_CASES = (
    ("zero", ((1, 2),)),
    ("mean", ((1, 2),)),
    ("zero", ((0, 0), (1, 2), (1, 3), (2, 1))),
    ("mean", ((0, 3), (2, 0), (2, 2))),
    ("patch", ((1, 1),)),
    ("patch", ((0, 2), (2, 3))),
)
GPT2_CORRUPT = "the doctor fired the nurse because he was tired"


@pytest.mark.parametrize(("how", "heads"), GPT2_CASES)
def test_gpt2_interventions_match_a_numpy_gpt2(gpt2, gpt2_folder, how, heads):
    clean = gpt2.tokenize(GPT2_TEXT)[1]
    corrupt = gpt2.tokenize(GPT2_CORRUPT)[1]
    _, clean_outputs = numpy_gpt2(gpt2_folder, clean, {})
    width = gpt2.head_dim
    edits = edits_for(clean_outputs, how, heads, width)
    expected, recorded = numpy_gpt2(gpt2_folder, corrupt if how == "patch" else clean, edits)
    plain, _ = numpy_gpt2(gpt2_folder, corrupt if how == "patch" else clean, {})
    assert np.abs(expected - plain).max() > 0.05  # the intervention matters here
    trace = our_run(gpt2, clean, corrupt, how, heads)
    assert_logits_close(trace.logits, expected)
    ours = trace.head_outputs.transpose(0, 2, 1, 3).reshape(recorded.shape)
    np.testing.assert_allclose(ours, recorded, rtol=0, atol=1e-4 * np.abs(recorded).max())


# --- transformers, stored and live --------------------------------------------------------------


@needs_smollm2
@pytest.mark.parametrize(("name", "how", "heads"), SMOLLM2_CASES)
def test_smollm2_interventions_match_stored_hooked_transformers(
    smollm2, name, how, heads, reference
):
    clean, corrupt = reference["smollm2_clean_ids"], reference["smollm2_corrupt_ids"]
    np.testing.assert_array_equal(smollm2.tokenize(CLEAN)[1], clean)
    np.testing.assert_array_equal(smollm2.tokenize(CORRUPT)[1], corrupt)
    logits = our_run(smollm2, clean, corrupt, how, heads).logits
    assert_logits_close(
        logits[:, reference["smollm2_ids_kept"]], reference[f"smollm2_{name}_logits"]
    )
    peak = logits.max(axis=-1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64))
    expected = reference[f"smollm2_{name}_lse"]
    np.testing.assert_allclose(lse, expected, rtol=0, atol=LOGITS_RELATIVE * np.abs(expected).max())


@pytest.fixture(scope="module")
def smollm2_effects(smollm2) -> np.ndarray:
    """Every head's zero-ablation effect on log p(nurse) after the clean sentence."""
    return am.head_effects(smollm2, CLEAN, target=smollm2.tokenizer.token_to_id("Ġnurse"))


@needs_smollm2
def test_smollm2_head_effects_match_stored_hooked_transformers(smollm2_effects, reference):
    effects = smollm2_effects
    expected = reference["smollm2_zero_effects"]
    assert effects.shape == expected.shape == (30, 9)
    # Measured gap 2e-5 (changes of log-probabilities up to 1.03 in size).
    np.testing.assert_allclose(effects, expected, rtol=0, atol=1e-3)
    assert np.abs(expected).max() > 0.1


@needs_smollm2
def test_smollm2_patching_effects_match_stored_hooked_transformers(smollm2, reference):
    nurse, doctor = (int(i) for i in reference["smollm2_words"][:2])
    shares = am.patching_effects(smollm2, CLEAN, CORRUPT, nurse, doctor)
    expected = reference["smollm2_patching"]
    # Shares of a clean-minus-corrupt gap of half a logit: measured gap 7e-5.
    np.testing.assert_allclose(shares, expected, rtol=0, atol=2e-3)
    assert np.abs(expected).max() > 0.1


@needs_minilm
@pytest.mark.parametrize(("name", "how", "heads"), MINILM_CASES)
def test_minilm_interventions_match_stored_hooked_transformers(minilm, name, how, heads, reference):
    ids = reference["minilm_ids"]
    np.testing.assert_array_equal(minilm.tokenize(MINILM_TEXT)[1], ids)
    hidden = minilm.encode(ids=ids, ablate=list(heads), ablation=how).hidden_states
    plain = minilm.encode(ids=ids).hidden_states
    for row, which in ((hidden[0], "first"), (hidden.mean(axis=0), "mean")):
        expected = reference[f"minilm_{name}_{which}"]
        np.testing.assert_allclose(
            row, expected, rtol=0, atol=1e-4 * max(1, np.abs(expected).max())
        )
    assert np.abs(hidden - plain).max() > 0.05


@needs_minilm
def test_minilm_head_effects_match_stored_hooked_transformers(minilm, reference):
    effects = am.head_effects(minilm, MINILM_TEXT)
    np.testing.assert_allclose(effects, reference["minilm_zero_effects"], rtol=0, atol=1e-5)
    assert effects.min() >= -1e-6 and effects.max() > 1e-3


@needs_smollm2
@pytest.mark.parametrize(("name", "how", "heads"), SMOLLM2_CASES)
def test_smollm2_interventions_match_hooked_transformers_live(
    smollm2, hf_smollm2, name, how, heads
):
    clean, corrupt = smollm2.tokenize(CLEAN)[1], smollm2.tokenize(CORRUPT)[1]
    recorded = run(hf_smollm2, clean)["head_outputs"]
    edits = edits_for(recorded, how, heads, smollm2.head_dim)
    expected = run(hf_smollm2, corrupt if how == "patch" else clean, edits)["logits"]
    trace = our_run(smollm2, clean, corrupt, how, heads)
    assert_logits_close(trace.logits, expected)


@needs_minilm
@pytest.mark.parametrize(("name", "how", "heads"), MINILM_CASES)
def test_minilm_interventions_match_hooked_transformers_live(minilm, name, how, heads):
    transformers = transformers_or_skip()
    hf = transformers.BertModel.from_pretrained(str(minilm.path), attn_implementation="eager")
    ids = minilm.tokenize(MINILM_TEXT)[1]
    expected = run(hf.eval(), ids, dict.fromkeys(heads, how))["hidden_states"]
    hidden = minilm.encode(ids=ids, ablate=list(heads), ablation=how).hidden_states
    np.testing.assert_allclose(hidden, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("how", "heads"), GPT2_CASES)
def test_tiny_models_match_hooked_transformers_live(request, family, how, heads):
    transformers = transformers_or_skip()
    model = request.getfixturevalue(family)
    folder = request.getfixturevalue(f"{family}_folder")
    kind = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    hf = kind.from_pretrained(str(folder), attn_implementation="eager").eval()
    clean = model.tokenize(text_for(model))[1]
    corrupt = np.roll(clean, 1)
    recorded = run(hf, clean)["head_outputs"]
    expected = run(
        hf, corrupt if how == "patch" else clean, edits_for(recorded, how, heads, model.head_dim)
    )
    trace = our_run(model, clean, corrupt, how, heads)
    assert_logits_close(trace.logits, expected["logits"])


# --- head_effects and patching_effects against the naive loop -----------------------------------


def naive_effects(model: am.Model, text: str, target, ablation: str, heads) -> np.ndarray:
    """One full encode per head: log p(target) change, or 1 - cosine of the pooled output."""
    plain = model.encode(text)
    effects = []
    for layer, head in heads:
        ablated = model.encode(text, ablate=[(layer, head)], ablation=ablation)
        if model.is_causal:
            change = log_softmax(ablated.logits[-1])[target] - log_softmax(plain.logits[-1])[target]
        else:
            a, b = ablated.hidden_states.mean(0), plain.hidden_states.mean(0)
            a, b = a.astype(np.float64), b.astype(np.float64)
            change = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        effects.append(change)
    return np.array(effects)


def every_head(model: am.Model) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(model.num_layers) for head in range(model.num_heads)]


@pytest.mark.parametrize(
    ("family", "ablation", "batch_rows"),
    [
        ("gpt2", "zero", None),
        ("gpt2", "mean", 1),
        ("llama", "zero", None),
        ("llama", "mean", None),
        ("llama", "zero", 1),
        ("minilm", "mean", 1),
    ],
)
def test_head_effects_equal_one_encode_per_head(request, family, ablation, batch_rows, monkeypatch):
    any_model = request.getfixturevalue(family)
    if batch_rows is not None:  # one layer per group: the grouped path
        monkeypatch.setattr(interventions, "_BATCH_ROWS", batch_rows)
    text = text_for(any_model)
    target = None
    if any_model.is_causal:
        target = int(np.argsort(any_model.encode(text).logits[-1])[-3])  # not the top token
    effects = am.head_effects(any_model, text, target=target, ablation=ablation)
    heads = every_head(any_model)
    expected = naive_effects(any_model, text, target, ablation, heads)
    # float32 rounding of logits: ~1e-6 of their magnitude, which the batch's other summation
    # order moves by a few times that.
    scale = np.abs(any_model.encode(text).logits).max() if any_model.is_causal else 1.0
    np.testing.assert_allclose(effects.ravel(), expected, rtol=0, atol=1e-5 * max(1.0, scale))
    assert np.abs(expected).max() > 1e-3


def test_head_effects_default_target_is_the_top_token(llama):
    top = int(llama.encode(LLAMA_TEXT).logits[-1].argmax())
    np.testing.assert_array_equal(
        am.head_effects(llama, LLAMA_TEXT), am.head_effects(llama, LLAMA_TEXT, target=top)
    )


@needs_smollm2
def test_smollm2_head_effects_equal_one_encode_per_head(smollm2, smollm2_effects):
    heads = [(0, 1), (13, 8), (24, 6), (29, 0), (29, 8)]
    nurse = smollm2.tokenizer.token_to_id("Ġnurse")
    effects = smollm2_effects
    expected = naive_effects(smollm2, CLEAN, nurse, "zero", heads)
    np.testing.assert_allclose([effects[h] for h in heads], expected, rtol=0, atol=1e-4)


def test_patching_effects_equal_one_encode_per_head(llama, gpt2):
    for model in (llama, gpt2):
        clean = model.tokenize(text_for(model))[1]
        corrupt = np.roll(clean, 1)
        plain = model.encode(ids=clean)
        corrupted = model.encode(ids=corrupt).logits[-1]
        target, foil = (int(i) for i in np.argsort(plain.logits[-1])[[-1, -2]])

        def difference(logits, target=target, foil=foil):
            return float(logits[target]) - float(logits[foil])

        gap = difference(plain.logits[-1]) - difference(corrupted)
        expected = [
            (
                difference(model.encode(ids=corrupt, patch={h: plain}).logits[-1])
                - difference(corrupted)
            )
            / gap
            for h in every_head(model)
        ]
        shares = am.patching_effects(model, clean, corrupt, target, foil)
        np.testing.assert_allclose(shares.ravel(), expected, rtol=0, atol=1e-4)
        assert np.abs(shares).max() > 0.01


def test_progress_climbs_to_one(llama):
    seen = []
    am.head_effects(llama, LLAMA_TEXT, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and 0 < seen[0] < 1
    seen.clear()
    clean = llama.tokenize(LLAMA_TEXT)[1]
    am.patching_effects(llama, clean, np.roll(clean, 1), 5, 6, progress=seen.append)
    assert seen[-1] == pytest.approx(1.0)


# --- attention rollout ----------------------------------------------------------------------


def test_attention_rollout_is_the_product_of_mixed_layers():
    rng = np.random.default_rng(0)
    weights = rng.random((3, 2, 5, 5))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.eye(5)
    for layer in weights:
        mixed = 0.5 * layer.mean(axis=0) + 0.5 * np.eye(5)
        mixed = mixed / mixed.sum(-1, keepdims=True)
        expected = mixed @ expected
    rollout = am.attention_rollout(weights)
    np.testing.assert_allclose(rollout, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)


def test_attention_rollout_of_a_causal_model_never_reaches_ahead(llama):
    rollout = am.attention_rollout(llama.encode(LLAMA_TEXT).attentions)
    assert not np.triu(rollout, 1).any()
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-6)


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"ablate": (1, 2)}, TypeError, "ablate must hold (layer, head) pairs"),
        ({"ablate": "1,2"}, TypeError, "ablate must be a list"),
        ({"ablate": 3}, TypeError, "ablate must be a list"),
        ({"ablate": [(1, 2, 3)]}, TypeError, "ablate must hold (layer, head) pairs"),
        ({"ablate": [(1.0, 2)]}, TypeError, "ablate: layers and heads must be integers"),
        ({"ablate": [(True, 2)]}, TypeError, "ablate: layers and heads must be integers"),
        ({"ablate": [(1, np.True_)]}, TypeError, "ablate: layers and heads must be integers"),
        ({"ablate": [(3, 0)]}, ValueError, "ablate: layer 3 is out of range"),
        ({"ablate": [(-1, 0)]}, ValueError, "ablate: layer -1 is out of range"),
        ({"ablate": [(0, 4)]}, ValueError, "ablate: head 4 is out of range"),
        ({"ablation": "random"}, ValueError, "ablation must be 'zero' or 'mean'"),
        ({"ablation": None}, TypeError, "ablation must be 'zero' or 'mean'"),
        ({"patch": [(0, 1)]}, TypeError, "patch must be a dict"),
        ({"patch": {(0, 1): "trace"}}, TypeError, "patch[(0, 1)] must be a Trace"),
        ({"patch": {(0, 9): None}}, ValueError, "patch: head 9 is out of range"),
        ({"patch": {0: None}}, TypeError, "patch must hold (layer, head) pairs"),
    ],
)
def test_encode_refuses_bad_interventions(llama, options, error, words):
    with pytest.raises(error, match=_escaped(words)):
        llama.encode(LLAMA_TEXT, **options)


def _escaped(words: str) -> str:
    import re

    return re.escape(words)


def test_encode_refuses_bad_patch_sources(llama):
    plain = llama.encode(LLAMA_TEXT)
    shorter = llama.encode(LLAMA_TEXT[:-5])
    with pytest.raises(ValueError, match=r"patch\[\(1, 2\)\] read \d+ tokens but this input has"):
        llama.encode(LLAMA_TEXT, patch={(1, 2): shorter})
    two_layers = dataclasses.replace(plain, head_outputs=plain.head_outputs[:2])
    with pytest.raises(ValueError, match=r"patch\[\(1, 2\)\]: its head outputs have shape"):
        llama.encode(LLAMA_TEXT, patch={(1, 2): two_layers})
    bare = am.Trace(plain.tokens, plain.ids, plain.attentions, plain.hidden_states, None, True)
    with pytest.raises(TypeError, match=r"patch\[\(1, 2\)\] is a Trace without head_outputs"):
        llama.encode(LLAMA_TEXT, patch={(1, 2): bare})
    with pytest.raises(ValueError, match=r"head \(1, 2\) is both in ablate and in patch"):
        llama.encode(LLAMA_TEXT, ablate=[(1, 2)], patch={(1, 2): plain})


def test_interventions_leave_their_arguments_alone(llama):
    source = llama.encode(LLAMA_TEXT)
    outputs = source.head_outputs.copy()
    heads = [(0, 1), (2, 3)]
    llama.encode(LLAMA_TEXT, ablate=heads, ablation="mean", patch={(1, 0): source})
    assert heads == [(0, 1), (2, 3)]
    np.testing.assert_array_equal(source.head_outputs, outputs)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: am.head_effects("model", LLAMA_TEXT), TypeError, "model must be"),
        (lambda m: am.head_effects(m, LLAMA_TEXT, target=True), TypeError, "target must be"),
        (lambda m: am.head_effects(m, LLAMA_TEXT, target=1.5), TypeError, "target must be"),
        (lambda m: am.head_effects(m, LLAMA_TEXT, target=10**6), ValueError, "target must be"),
        (lambda m: am.head_effects(m, LLAMA_TEXT, ablation="max"), ValueError, "ablation"),
        (lambda m: am.head_effects(m, LLAMA_TEXT, progress=3), TypeError, "progress"),
        (lambda m: am.head_effects(m), ValueError, "exactly one of text or ids"),
        (lambda m: am.head_effects(m, ids=[]), ValueError, "ids is empty"),
        (lambda m: am.patching_effects(m, [1, 2], [1], 5, 6), ValueError, "same number"),
        (lambda m: am.patching_effects(m, [1, 2], [1, 3], 5, 5), ValueError, "must differ"),
        (lambda m: am.patching_effects(m, [1, 2], [1, 3], 5, -1), ValueError, "foil must be"),
        (lambda m: am.patching_effects(m, [1.5], [1], 5, 6), TypeError, "clean:"),
        (lambda m: am.patching_effects(m, [1], [], 5, 6), ValueError, "corrupt:"),
        (lambda m: am.patching_effects(m, [1, 2], [1, 2], 5, 6), ValueError, "nothing for a"),
        (lambda m: am.attention_rollout(np.ones((2, 3, 3))), ValueError, "attentions must have"),
        (lambda m: am.attention_rollout(np.ones((1, 1, 2, 3))), ValueError, "attentions must have"),
        (lambda m: am.attention_rollout(-np.ones((1, 1, 2, 2))), ValueError, "non-negative"),
        (lambda m: am.attention_rollout(np.full((1, 1, 2, 2), np.nan)), ValueError, "finite"),
        (lambda m: am.attention_rollout(np.ones((1, 1, 2, 2), bool)), TypeError, "real numbers"),
        (lambda m: am.attention_rollout([[["a"]]]), TypeError, "real numbers"),
    ],
)
def test_effects_refuse_bad_arguments(llama, call, error, words):
    with pytest.raises(error, match=_escaped(words)):
        call(llama)


def test_encoders_refuse_targets_and_patching(minilm):
    with pytest.raises(ValueError, match="target: .* is an encoder"):
        am.head_effects(minilm, MINILM_TEXT, target=3)
    with pytest.raises(ValueError, match="model: .* is an encoder"):
        am.patching_effects(minilm, "a b", "a c", 3, 4)
