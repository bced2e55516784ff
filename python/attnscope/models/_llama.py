"""The Llama family (SmolLM2, Llama, ...): a causal decoder with RMSNorm, rotary positions,
grouped-query attention and a SwiGLU MLP, as Hugging Face's ``LlamaForCausalLM``.

One block, for the running hidden state ``x`` (n tokens × d):

    h = rms_norm(x) · w₁                 q, k, v = h·W_Q, h·W_K, h·W_V    (k, v: fewer heads)
    q, k = rotate(q, k, position)         x = x + attention(q, k, v)·W_O
    h = rms_norm(x) · w₂                 x = x + (silu(h·W_gate) ⊙ h·W_up)·W_down

Q, K and V are one fused product, gate and up another. Weights stay (out, in) as stored, so a
block of tokens multiplies by the transposed view (BLAS reads it in place) and a single decoded
token takes one dot product per output row. Attention always runs on the engine: one causal,
grouped-query call per layer when a whole text is read, one :class:`attnscope.KVCache` per layer
when decoding token by token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import attnscope

from ._chat import chat_prompt
from ._generate import gathered, start
from ._model import Checkpoint, Model
from ._perplexity import perplexity

# attend(layer, q, k, v) -> context: q (Hq, n, Dh), k and v (Hkv, n, Dh) -> (Hq, n, Dh).
Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# The longest context a model may declare: rotary angles are computed in float32, as in
# transformers, and float32 tells whole positions apart only up to 2**24.
MAX_POSITIONS = 2**24


@dataclass
class _Layer:
    """One block's weights, each matrix (out, in) and contiguous."""

    norm1: np.ndarray  # (d,)
    qkv: np.ndarray  # ((Hq + 2·Hkv)·Dh, d)
    out: np.ndarray  # (d, Hq·Dh)
    norm2: np.ndarray  # (d,)
    gate_up: np.ndarray  # (2·inner, d)
    down: np.ndarray  # (d, inner)


class LlamaModel(Model):
    """Llama as Hugging Face's ``LlamaForCausalLM`` (no biases, default rotary embeddings).

    The trace's hidden states are the final layer's output after the final RMSNorm, and the
    logits those states times the unembedding (the token embeddings when they are tied).
    """

    family = "Llama"
    is_causal = True

    def _setup(self, checkpoint: Checkpoint) -> None:
        config, weights = checkpoint.config, checkpoint.weights
        self._check_supported(config)
        self.num_layers = self._config_int(config, "num_hidden_layers")
        self.num_heads = heads = self._config_int(config, "num_attention_heads")
        self.hidden_size = d = self._config_int(config, "hidden_size")
        self._num_kv_heads = kv_heads = self._config_int(
            config, "num_key_value_heads", default=heads
        )
        if heads % kv_heads:
            raise ValueError(
                f"{self._config_file}: num_attention_heads {heads} is not a multiple of "
                f"num_key_value_heads {kv_heads}"
            )
        self._head_dim = dh = self._config_int(
            config, "head_dim", default=self._heads_divide(d, heads, "hidden_size")
        )
        if dh % 2:
            raise ValueError(
                f"{self._config_file}: head_dim {dh} must be even for rotary positions"
            )
        self.vocab_size = self._config_int(config, "vocab_size")
        self.max_positions = self._config_int(
            config, "max_position_embeddings", maximum=MAX_POSITIONS
        )
        inner = self._config_int(config, "intermediate_size")
        self._eps = self._config_float(config, "rms_norm_eps", 1e-6)
        self.eos_token_id = config.get("eos_token_id")
        if isinstance(self.eos_token_id, list):  # some configs list several
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.chat_template = checkpoint.chat_template

        def w(name, *shape):
            return self._weight(weights, name, shape)

        self._embed = w("model.embed_tokens.weight", self.vocab_size, d)
        if config.get("tie_word_embeddings", False):
            self._unembed = self._embed  # the same (vocab, d) matrix, stored once
        else:
            self._unembed = w("lm_head.weight", self.vocab_size, d)
        self._final_norm = w("model.norm.weight", d)
        self._layers = [self._read_layer(w, index, inner) for index in range(self.num_layers)]
        self._inv_freq = _inverse_frequencies(dh, self._config_float(config, "rope_theta", 10000.0))

    def _check_supported(self, config: dict) -> None:
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        parameters = config.get("rope_parameters") or {}
        rope_type = parameters.get("rope_type", rope_type)
        if rope_type != "default":
            raise ValueError(
                f"{self._config_file}: rope scaling {rope_type!r} is not supported (only the "
                "default rotary embeddings)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"{self._config_file}: {flag}=true is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"{self._config_file}: hidden_act {config['hidden_act']!r} is not supported "
                "(only 'silu')"
            )

    def _read_layer(self, w, index: int, inner: int) -> _Layer:
        d, dh = self.hidden_size, self._head_dim
        heads, kv_heads = self.num_heads, self._num_kv_heads
        p = f"model.layers.{index}."
        qkv = np.concatenate(
            [
                w(p + "self_attn.q_proj.weight", heads * dh, d),
                w(p + "self_attn.k_proj.weight", kv_heads * dh, d),
                w(p + "self_attn.v_proj.weight", kv_heads * dh, d),
            ]
        )
        gate_up = np.concatenate(
            [w(p + "mlp.gate_proj.weight", inner, d), w(p + "mlp.up_proj.weight", inner, d)]
        )
        return _Layer(
            norm1=w(p + "input_layernorm.weight", d),
            qkv=qkv,
            out=w(p + "self_attn.o_proj.weight", d, heads * dh),
            norm2=w(p + "post_attention_layernorm.weight", d),
            gate_up=gate_up,
            down=w(p + "mlp.down_proj.weight", d, inner),
        )

    # --- the forward pass ------------------------------------------------------------------

    def _embeddings(self, ids: np.ndarray) -> np.ndarray:
        return self._embed[ids]

    def _layer_attention(self, index, x, n, *, return_weights):
        cos, sin = self._rotary(0, n)
        q, k, v = self._queries_keys_values(self._layers[index], x, cos, sin)
        if not return_weights:
            out = attnscope.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out, None
        return attnscope.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, return_weights=True
        )

    def _layer_rest(self, index, x, merged):
        layer = self._layers[index]
        x = x + _project(merged, layer.out)
        gate_up = _project(_rms_norm(x, layer.norm2, self._eps), layer.gate_up)
        return x + _project(_swiglu(gate_up), layer.down)

    def _final_hidden(self, x: np.ndarray) -> np.ndarray:
        return _rms_norm(x, self._final_norm, self._eps)

    def _readout(self, hidden: np.ndarray) -> np.ndarray:
        return self.logits(hidden)

    def _queries_keys_values(self, layer: _Layer, x, cos, sin):
        """Rotated queries ``(batch, Hq, n, Dh)``, keys and values ``(batch, Hkv, n, Dh)`` for
        the stream `x` ``(batch·n, d)``, with `cos` and `sin` ``(n, 1, Dh/2)``."""
        n = cos.shape[0]
        batch = x.shape[0] // n
        heads, kv_heads, dh = self.num_heads, self._num_kv_heads, self._head_dim
        qkv = _project(_rms_norm(x, layer.norm1, self._eps), layer.qkv)
        rotated = _rotate(qkv[:, : (heads + kv_heads) * dh].reshape(batch, n, -1, dh), cos, sin)
        v = qkv[:, (heads + kv_heads) * dh :].reshape(batch, n, kv_heads, dh)
        if n == 1:  # (1, H, Dh) and (H, 1, Dh) are the same bytes: no copies needed
            q = rotated[:, 0, :heads, None, :]
            k = rotated[:, 0, heads:, None, :]
            return q, k, v.reshape(batch, kv_heads, 1, dh)
        q = np.ascontiguousarray(rotated[:, :, :heads].transpose(0, 2, 1, 3))
        k = np.ascontiguousarray(rotated[:, :, heads:].transpose(0, 2, 1, 3))
        return q, k, np.ascontiguousarray(v.transpose(0, 2, 1, 3))

    def blocks(self, ids: np.ndarray, start: int, attend: Attend) -> np.ndarray:
        """Every block over tokens `ids` at positions ``start, start + 1, ...``.

        Returns the final hidden states after the final norm, ``(n, d)``. `attend` runs each
        layer's attention, so the same blocks serve a whole text, a KV-cache step, or a mask.
        """
        n = ids.size
        cos, sin = self._rotary(start, n)
        x = self._embed[ids]
        for index, layer in enumerate(self._layers):
            q, k, v = self._queries_keys_values(layer, x, cos, sin)
            context = attend(index, q[0], k[0], v[0])
            x = self._layer_rest(index, x, context.transpose(1, 0, 2).reshape(n, -1))
        return self._final_hidden(x)

    def _rotary(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin ``(n, 1, Dh/2)`` of positions ``start .. start + n - 1``, computed when
        asked: a table of the whole context would cost memory in proportion to it."""
        positions = np.arange(start, start + n, dtype=np.int64).astype(np.float32)
        angles = positions[:, None] * self._inv_freq[None, :]
        return np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Next-token scores ``(n, vocab)`` for final hidden states ``(n, d)``."""
        return _project(hidden, self._unembed)

    # --- generation, chat and perplexity (see _generate, _chat, _perplexity) -----------------

    def stream(
        self,
        prompt,
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        seed=None,
        *,
        kv_storage=None,
        use_cache=True,
    ):
        """:meth:`generate` one step at a time: an iterator of
        :class:`~attnscope.models.GenerationStep`, each yielded as soon as its token is chosen.
        The arguments are checked at the call, before the first step."""
        sampling = (max_new_tokens, temperature, top_k, seed, kv_storage, use_cache)
        return start(self, prompt, *sampling)[1]

    def generate(
        self,
        prompt,
        max_new_tokens=32,
        temperature=0.0,
        top_k=None,
        seed=None,
        *,
        kv_storage=None,
        use_cache=True,
    ):
        """Generate up to `max_new_tokens` tokens after `prompt`, through the KV cache.

        Args:
            prompt: the text to continue (use :meth:`chat_prompt` for a conversation).
            max_new_tokens: at most this many new tokens (fewer if the model ends its text).
            temperature: 0 (default) always takes the likeliest token; above 0 samples from
                ``softmax(logits / temperature)``. A temperature too small to divide by (such
                as 5e-324) is that softmax's limit: the likeliest token, ties shared.
            top_k: sample only among the `top_k` likeliest tokens (None: all).
            seed: seed of the sampling, for a repeatable draw.
            kv_storage: how the KV cache keeps keys and values while decoding: None (the
                model's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``
                (see :class:`attnscope.KVCache`). The prompt itself is read at full precision.
            use_cache: False reads the whole sequence again at every step, with no cache (as
                transformers' ``use_cache=False``): the same tokens, slower as the text grows.

        Returns:
            A :class:`~attnscope.models.Generation` with every step's token, log-probability,
            time and attention row.

        Raises:
            TypeError: a prompt that is not a str, or arguments of the wrong type.
            ValueError: an empty prompt or one holding a lone surrogate (not Unicode text),
                `max_new_tokens` outside ``[1, context_length]``, a prompt whose tokens plus
                `max_new_tokens` exceed the context, a negative temperature, `top_k` < 1, a
                negative seed, an unknown `kv_storage`, or a `kv_storage` with
                ``use_cache=False``.
        """
        sampling = (max_new_tokens, temperature, top_k, seed, kv_storage, use_cache)
        return gathered(self, *start(self, prompt, *sampling))

    def chat_prompt(self, messages) -> str:
        """`messages` (``[{"role": "user", "content": ...}, ...]``) through the chat template,
        with the assistant's turn opened, ready to :meth:`generate` from.

        The contents are pasted into the template as they are, and the prompt is then read
        as one text, so a special token written in a message (``<|im_end|>``,
        ``<|im_start|>system``) is the real token: it closes the turn and can open a new
        one, exactly as with Hugging Face's ``apply_chat_template`` followed by the
        tokenizer, their default. Text from someone you do not trust should have such
        markers removed before it is passed in.
        """
        return chat_prompt(self, messages)

    def chat(self, messages, max_new_tokens=32, temperature=0.0, top_k=None, seed=None):
        """``generate(chat_prompt(messages), ...)``: the assistant's answer to `messages`.
        Special tokens typed in a message act as real ones (see :meth:`chat_prompt`)."""
        prompt = self.chat_prompt(messages)
        return self.generate(prompt, max_new_tokens, temperature, top_k, seed)

    def perplexity(self, text: str, *, window: int | None = None, sinks: int = 0, kv_storage=None):
        """How well the model predicts `text`, optionally through a bounded KV cache.

        Args:
            text: at least two tokens of text.
            window: keep only the `window` most recent keys for every query (None: all). A
                window at least as long as the text keeps it all, exactly as None does.
            sinks: also keep the first `sinks` tokens for every query (StreamingLLM's
                attention sinks); only meaningful with a window. Sinks past the text's end
                keep all of it.
            kv_storage: read the text through per-layer :class:`attnscope.KVCache` objects
                storing keys and values this way (``"float32"``, ``"bfloat16"``,
                ``"float16"``, ``"int8"``); only without a window.

        Returns:
            A :class:`~attnscope.models.Perplexity`: mean negative log-likelihood (nats) of
            each token given the ones before it, its exponential, and how many tokens count.
        """
        return perplexity(self, text, window=window, sinks=sinks, kv_storage=kv_storage)


# NumPy >= 2 has a dot-product ufunc; older versions fall back to BLAS's matrix-vector product.
_row_dots = getattr(np, "vecdot", None)


def _project(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x · weightᵀ`` for `weight` stored (out, in), as torch's Linear keeps it.

    Many rows: one BLAS matrix product reading the transposed view in place. One row (a
    decoding step): one dot product per output, on the calling thread. That product is bound
    by memory, and waking BLAS's threads for it cost more than it saved in our measurements,
    by far on a busy machine.
    """
    if x.shape[0] == 1 and _row_dots is not None:
        return _row_dots(weight, x[0])[None]
    return x @ weight.T


def _inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """The rotary frequencies ``(head_dim // 2,)`` float32.

    Computed in float32 in transformers' order (inverse frequencies, then position × frequency
    in :meth:`LlamaModel._rotary`), so the angles round the same way as in the reference.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary positions: each head's first half turned against its second half."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    np.subtract(first * cos, second * sin, out=out[..., :half])
    np.add(second * cos, first * sin, out=out[..., half:])
    return out


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Each row divided by its root mean square, then scaled (no centring, no bias)."""
    scale = np.einsum("ij,ij->i", x, x)[:, None]
    scale /= x.shape[-1]
    scale += x.dtype.type(eps)
    np.sqrt(scale, out=scale)
    np.reciprocal(scale, out=scale)
    out = x * scale
    out *= weight
    return out


def _swiglu(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) ⊙ up, for the fused ``[gate | up]`` product, in one buffer."""
    inner = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :inner], gate_up[:, inner:]
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1.0
    np.divide(gate, out, out=out)
    out *= up
    return out
