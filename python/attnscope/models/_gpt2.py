"""The GPT-2 family (gpt2, distilgpt2, ...): a causal decoder with pre-norm blocks."""

from __future__ import annotations

import math

import numpy as np

from ._model import Checkpoint, Model, split_qkv
from ._numerics import activation, feed_forward, layer_norm, linear


class GPT2Model(Model):
    """GPT-2 as Hugging Face's ``GPT2LMHeadModel``: token i attends to tokens 0..i only.

    The trace's hidden states are the final layer's output after the last layer norm
    (``ln_f``), and the logits are those hidden states times the (tied) token embeddings.
    """

    family = "GPT-2"
    is_causal = True

    def _setup(self, checkpoint: Checkpoint) -> None:
        config, weights = checkpoint.config, checkpoint.weights
        self.num_layers = self._config_int(config, "n_layer", "num_hidden_layers")
        self.num_heads = self._config_int(config, "n_head", "num_attention_heads")
        self.hidden_size = d = self._config_int(config, "n_embd", "hidden_size")
        self.vocab_size = self._config_int(config, "vocab_size")
        self.max_positions = self._config_int(config, "n_positions", "max_position_embeddings")
        inner = self._config_int(config, "n_inner", default=4 * d)
        self._heads_divide(d, self.num_heads, "n_embd")
        self._eps = self._config_float(config, "layer_norm_epsilon", 1e-5)
        self._act = activation(config.get("activation_function", "gelu_new"))
        # save_pretrained of GPT2LMHeadModel writes "transformer.h.0..."; the hub files "h.0...".
        weights = {k.removeprefix("transformer."): v for k, v in weights.items()}

        def w(name, *shape):
            return self._weight(weights, name, shape)

        self._token = w("wte.weight", self.vocab_size, d)
        self._position = w("wpe.weight", self.max_positions, d)
        tied = config.get("tie_word_embeddings", True)
        # The unembedding is a transposed view (d, vocab): logits = hidden · W_U, no second copy.
        self._unembed = (self._token if tied else w("lm_head.weight", self.vocab_size, d)).T
        self._final_norm = (w("ln_f.weight", d), w("ln_f.bias", d))
        self._layers = []
        for index in range(self.num_layers):
            p = f"h.{index}."
            # GPT-2's Conv1D already stores (in, out): x · W as in the chapter.
            self._layers.append(
                {
                    "norm1": (w(p + "ln_1.weight", d), w(p + "ln_1.bias", d)),
                    "qkv": w(p + "attn.c_attn.weight", d, 3 * d),
                    "qkv_bias": w(p + "attn.c_attn.bias", 3 * d),
                    "out": w(p + "attn.c_proj.weight", d, d),
                    "out_bias": w(p + "attn.c_proj.bias", d),
                    "norm2": (w(p + "ln_2.weight", d), w(p + "ln_2.bias", d)),
                    "up": w(p + "mlp.c_fc.weight", d, inner),
                    "up_bias": w(p + "mlp.c_fc.bias", inner),
                    "down": w(p + "mlp.c_proj.weight", inner, d),
                    "down_bias": w(p + "mlp.c_proj.bias", d),
                }
            )
        head_dim = self.hidden_size // self.num_heads
        base = 1.0 / math.sqrt(head_dim) if config.get("scale_attn_weights", True) else 1.0
        by_layer = config.get("scale_attn_by_inverse_layer_idx", False)
        self._scales = [
            base / (index + 1) if by_layer else base for index in range(self.num_layers)
        ]

    def _embeddings(self, ids: np.ndarray) -> np.ndarray:
        return self._token[ids] + self._position[: ids.size]

    def _layer_attention(self, index, x, n, *, return_weights):
        layer = self._layers[index]
        normed = layer_norm(x, *layer["norm1"], self._eps)
        qkv = linear(normed, layer["qkv"], layer["qkv_bias"])
        q, k, v = split_qkv(qkv, self.num_heads, n)
        return self._attend(q, k, v, scale=self._scales[index], return_weights=return_weights)

    def _layer_rest(self, index, x, merged):
        layer = self._layers[index]
        attended = linear(merged, layer["out"], layer["out_bias"])
        attended += x
        hidden = feed_forward(layer_norm(attended, *layer["norm2"], self._eps), layer, self._act)
        hidden += attended
        return hidden

    def _final_hidden(self, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, *self._final_norm, self._eps)

    def _readout(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self._unembed
