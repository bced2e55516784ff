"""Llama-family models from a GGUF file (llama.cpp's format): config, weights and tokenizer.

The `gguf` package reads the file and dequantizes its tensors (Q4_1, Q8_0, ...) to float32.
Everything is renamed to the Hugging Face Llama layout, so one forward pass serves GGUF files
and safetensors folders alike. Two conversions made by llama.cpp are undone here:

- Q and K projections: llama.cpp's converter interleaves the two halves of every head's rows
  (it rotates adjacent pairs, Hugging Face rotates the first half against the second);
  :func:`unpermute_rows` puts them back, as transformers does when it loads a GGUF.
- The tokenizer: the vocabulary and merges become a byte-level BPE of the `tokenizers` library,
  with the pre-tokenizer that ``tokenizer.ggml.pre`` names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .._checks import file_positive_number, file_whole_number
from ._llama import MAX_POSITIONS
from ._model import Checkpoint

# Supported architectures (``general.architecture``): the Llama block and its relatives that
# share its tensors and hyper-parameters.
ARCHITECTURES = ("llama",)
# llama.cpp's pre-tokenizers whose rule is "each digit alone, then GPT-2's split", as its
# llama-vocab.cpp gives them; "gpt2"-like ones use GPT-2's split alone.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})
_GPT2_SPLIT = frozenset({"gpt2", "default", "mpt", "olmo", "jais"})
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
# Sizes and counts past this are no real model's: they are refused at load, by field name.
_LARGEST_SIZE = 2**31 - 1

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path: Path, name: str) -> Checkpoint:
    """A checkpoint (Hugging Face names, float32 tensors read on demand) from a GGUF file.

    Raises:
        ValueError: a file that is not GGUF or is damaged, an unsupported architecture,
            tokenizer or quantization, or a metadata field that is missing or out of range;
            the message names the file and the field or tensor.
    """
    reader = _open(path)
    fields = _Fields(reader, path)
    architecture = fields.string("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{path}: general.architecture is {architecture!r}; attnscope reads "
            f"{', '.join(repr(a) for a in ARCHITECTURES)} GGUF files"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = _config(fields, architecture, tensors)
    weights = GgufTensors(path, tensors, config)
    return Checkpoint(
        name=name,
        path=path,
        config=config,
        weights=weights,
        tokenizer=_tokenizer(fields, config["vocab_size"]),
        config_file=path,
        weights_file=path,
        chat_template=fields.optional("tokenizer.chat_template"),
        tensor_names=weights.file_names,
    )


def _open(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install gguf "
            "(or pip install 'attnscope[models]')"
        ) from error

    class PlainArrayReader(GGUFReader):
        """GGUFReader over a plain ndarray view of the file's memory map.

        The reader slices its buffer once per string, and a ``numpy.memmap`` pays a
        bookkeeping cost on every slice: for a 49k-token vocabulary that is seconds instead
        of a fraction of one. The view reads the same mapped bytes.
        """

        @property
        def data(self):
            return self._buffer

        @data.setter
        def data(self, value):
            self._buffer = np.asarray(value)

    try:
        return PlainArrayReader(path)
    except Exception as error:  # noqa: BLE001 - gguf raises bare ValueError/IndexError/KeyError
        raise ValueError(f"{path} is not a readable GGUF file ({error})") from None


class _Fields:
    """Typed access to a GGUF file's metadata, with errors that name the file and the key."""

    def __init__(self, reader, path: Path):
        self._reader = reader
        self._path = path

    def optional(self, key: str):
        field = self._reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except Exception as error:  # noqa: BLE001 - a damaged field may fail in many ways
            raise ValueError(
                f"{self._path}: metadata field {key} is unreadable ({error})"
            ) from None

    def required(self, key: str):
        value = self.optional(key)
        if value is None:
            raise ValueError(f"{self._path} has no metadata field {key}")
        return value

    def string(self, key: str) -> str:
        value = self.required(key)
        if not isinstance(value, str):
            raise ValueError(f"{self._path}: {key} must be a string, got {value!r}")
        return value

    def integer(
        self,
        key: str,
        *,
        default: int | None = None,
        minimum: int = 1,
        maximum: int = _LARGEST_SIZE,
        why: str = "",
    ) -> int:
        """Field `key` as an int from `minimum` to `maximum` (`why` says where the maximum
        comes from)."""
        value = self.optional(key)
        if value is None:
            if default is None:
                raise ValueError(f"{self._path} has no metadata field {key}")
            return default
        return file_whole_number(value, f"{self._path}: {key}", low=minimum, high=maximum, why=why)

    def number(self, key: str, *, default: float | None = None) -> float:
        value = self.optional(key)
        if value is None:
            if default is None:
                raise ValueError(f"{self._path} has no metadata field {key}")
            return default
        return file_positive_number(value, f"{self._path}: {key}")

    def strings(self, key: str) -> list[str]:
        value = self.required(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"{self._path}: {key} must be a list of strings")
        return value


def _config(fields: _Fields, arch: str, tensors: dict) -> dict:
    """The Hugging Face Llama config the metadata describes."""
    path = fields._path
    heads = fields.integer(f"{arch}.attention.head_count")
    hidden = fields.integer(f"{arch}.embedding_length")
    if hidden % heads:
        raise ValueError(
            f"{path}: {arch}.embedding_length {hidden} is not a multiple of "
            f"{arch}.attention.head_count {heads}"
        )
    kv_heads = fields.integer(f"{arch}.attention.head_count_kv", default=heads)
    if heads % kv_heads:
        raise ValueError(
            f"{path}: {arch}.attention.head_count {heads} is not a multiple of "
            f"{arch}.attention.head_count_kv {kv_heads}"
        )
    head_dim = hidden // heads
    rope_dims = fields.integer(f"{arch}.rope.dimension_count", default=head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"{path}: {arch}.rope.dimension_count is {rope_dims}, but only rotary embeddings "
            f"over the whole head ({head_dim}) are supported"
        )
    scaling = fields.optional(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: scaled rotary embeddings ({scaling!r}) are not supported")
    tokens = fields.optional("tokenizer.ggml.tokens")
    vocab_default = len(tokens) if isinstance(tokens, list) and tokens else None
    config = {
        "model_type": "llama",
        "num_hidden_layers": fields.integer(
            f"{arch}.block_count",
            maximum=max(1, len(tensors)),
            why=f" (the file holds {len(tensors):,} tensors)",
        ),
        "hidden_size": hidden,
        "intermediate_size": fields.integer(f"{arch}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": fields.integer(
            f"{arch}.context_length",
            maximum=MAX_POSITIONS,
            why=" (float32 rotary angles tell positions apart only up to 2**24)",
        ),
        "rms_norm_eps": fields.number(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": fields.number(f"{arch}.rope.freq_base", default=10000.0),
        "vocab_size": fields.integer(f"{arch}.vocab_size", default=vocab_default),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = fields.optional(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = fields.integer(f"tokenizer.ggml.{key}", minimum=0)
            if config[key] >= config["vocab_size"]:
                raise ValueError(
                    f"{path}: tokenizer.ggml.{key} {config[key]} is outside the vocabulary "
                    f"of {config['vocab_size']} tokens"
                )
    return config


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (pair, 2) back to (2, half).

    llama.cpp rotates adjacent row pairs of each head, Hugging Face the first half against
    the second; its converter therefore reorders each head's rows, and this reverses that.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GgufTensors(Mapping):
    """A GGUF file's tensors under Hugging Face names, dequantized to float32 when read.

    Reading one tensor at a time keeps the peak memory of loading near the final model's:
    the family copies each into its own layout and drops it.
    """

    def __init__(self, path: Path, tensors: dict, config: dict):
        self._path = path
        self._tensors = tensors
        self._config = config
        # Hugging Face name -> name in the file, for loading and for error messages.
        self.file_names = {hf: gguf for gguf, hf in _GLOBAL_TENSORS.items()}
        for layer in range(config["num_hidden_layers"]):
            for short, long in _LAYER_TENSORS.items():
                hf_name = f"model.layers.{layer}.{long}.weight"
                self.file_names[hf_name] = f"blk.{layer}.{short}.weight"
        self._names = [hf for hf, gguf in self.file_names.items() if gguf in tensors]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        file_name = self.file_names.get(name)
        if file_name is None or file_name not in self._tensors:
            raise KeyError(name)
        tensor = self._tensors[file_name]
        from gguf.quants import dequantize

        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{self._path}: tensor {file_name!r} is stored as {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantize"
            ) from None
        except Exception as error:  # noqa: BLE001 - a truncated tensor fails inside gguf
            raise ValueError(
                f"{self._path}: tensor {file_name!r} is unreadable ({error})"
            ) from None
        # A float32 tensor comes back as a view of the mapped file: copy it, so the model
        # does not keep the file mapped.
        array = np.array(array, dtype=np.float32)
        if file_name.endswith(("attn_q.weight", "attn_k.weight")) and array.ndim == 2:
            kind = "num_attention_heads" if "attn_q" in file_name else "num_key_value_heads"
            heads = self._config[kind]
            if array.shape[0] % (2 * heads) == 0:
                array = unpermute_rows(array, heads)
        return array


def _tokenizer(fields: _Fields, vocab_size: int):
    """Byte-level BPE from the GGUF vocabulary and merges, as ``tokenizer.ggml.pre`` splits."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = fields._path
    kind = fields.optional("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') "
            "tokenizers are supported"
        )
    tokens = fields.strings("tokenizer.ggml.tokens")
    merges = fields.strings("tokenizer.ggml.merges")
    if len(tokens) != vocab_size:
        raise ValueError(
            f"{path}: tokenizer.ggml.tokens has {len(tokens)} entries but the vocabulary "
            f"size is {vocab_size}"
        )
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"{path}: tokenizer.ggml.merges holds an entry that is not 'a b'")
    pre = fields.optional("tokenizer.ggml.pre") or "default"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        splitter = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_SPLIT:
        splitter = byte_level
    else:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not a supported pre-tokenizer")
    try:
        tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs))
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own Exception type
        raise ValueError(f"{path}: the vocabulary and merges do not form a BPE ({error})") from None
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.ByteLevel()
    kinds = fields.optional("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(kinds) != len(tokens):
        raise ValueError(
            f"{path}: tokenizer.ggml.token_type has {len(kinds)} entries for {len(tokens)} tokens"
        )
    # Control tokens (<|im_start|>, ...) are matched whole in the text and are special;
    # user-defined ones are matched whole but decoded like text.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _TOKEN_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _TOKEN_USER_DEFINED
        ]
    )
    return tokenizer
