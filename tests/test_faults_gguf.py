"""Damaged Llama checkpoints refused at `load` with the field or tensor named: metadata out of
range (a context, head count, layer count or vocabulary no real model has) and weights that
decode to NaN or inf. A context at the limit loads without a table the size of the context
and computes what the same model with a short context computes."""

from __future__ import annotations

import json

import attnscope.models as am
import numpy as np
import pytest
from attnscope.models._llama import MAX_POSITIONS
from fixtures.llama_checkpoints import write_tiny_llama_folder, write_tiny_llama_gguf

pytest.importorskip("gguf", reason="GGUF files need: pip install gguf")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"context_length": 2**31},
            r"llama\.context_length must be <= 16,777,216 \(float32 rotary angles .*\), "
            r"got 2,147,483,648",
        ),
        ({"head_count": 2**31}, r"llama\.attention\.head_count must be <= 2,147,483,647"),
        ({"head_count_kv": 2**32 - 1}, r"llama\.attention\.head_count_kv must be <="),
        ({"embedding_length": 2**31}, r"llama\.embedding_length must be <= 2,147,483,647"),
        ({"feed_forward_length": 2**31}, r"llama\.feed_forward_length must be <="),
        (
            {"block_count": 10**9},
            r"llama\.block_count must be <= 20 \(the file holds 20 tensors\), got 1,000,000,000",
        ),
        ({"vocab_size": 2**31}, r"llama\.vocab_size must be <= 2,147,483,647"),
    ],
)
def test_metadata_out_of_range_is_refused_by_field(tmp_path, overrides, message):
    path = write_tiny_llama_gguf(tmp_path / "huge.gguf", **overrides)
    with pytest.raises(ValueError, match=rf"huge\.gguf: {message}"):
        am.load(path)


def test_the_longest_context_loads_and_computes_what_a_short_one_does(tmp_path):
    short = am.load(write_tiny_llama_gguf(tmp_path / "short.gguf"))
    longest = am.load(write_tiny_llama_gguf(tmp_path / "long.gguf", context_length=MAX_POSITIONS))
    assert longest.context_length == MAX_POSITIONS
    text = "the cat sat on the mat in the sun"
    np.testing.assert_array_equal(longest.encode(text).logits, short.encode(text).logits)
    assert longest.generate(text, 5).text == short.generate(text, 5).text


def _spoil(path, tensor_name: str, values: np.ndarray, at: int = 0) -> None:
    """Overwrite a tensor's bytes in a GGUF file, from its element `at` (F32) or byte `at`."""
    import gguf

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == tensor_name)
    raw = values.tobytes()
    with open(path, "r+b") as file:
        file.seek(tensor.data_offset + at * (4 if values.dtype == np.float32 else 1))
        file.write(raw)


@pytest.mark.parametrize(
    ("tensor", "values", "count"),
    [
        ("blk.1.attn_v.weight", np.array([np.nan], dtype=np.float32), 1),
        ("token_embd.weight", np.array([np.inf, -np.inf, 1.0], dtype=np.float32), 2),
        ("output_norm.weight", np.full(32, np.nan, dtype=np.float32), 32),
    ],
)
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tensor, values, count):
    path = write_tiny_llama_gguf(tmp_path / "nan.gguf")
    _spoil(path, tensor, values, at=5 if values.size < 32 else 0)
    with pytest.raises(ValueError, match=rf"nan\.gguf: tensor '{tensor}' holds {count} non-fin"):
        am.load(path)


def test_a_quantized_block_with_an_infinite_scale_is_refused(tmp_path):
    path = write_tiny_llama_gguf(tmp_path / "q8.gguf", quantization="Q8_0")
    # A Q8_0 block is a float16 scale then 32 int8 values; 0x7C00 is float16 +inf.
    _spoil(path, "blk.0.ffn_up.weight", np.array([0x00, 0x7C], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_up\.weight' holds \d+ non-finite"):
        am.load(path)


def test_a_folder_with_non_finite_weights_or_a_huge_context_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = write_tiny_llama_folder(tmp_path / "nan")
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][3, 4] = np.nan
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' holds 1 "):
        am.load(folder)
    folder = write_tiny_llama_folder(tmp_path / "long")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 2**31
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"max_position_embeddings must be <= 16,777,216"):
        am.load(folder)
