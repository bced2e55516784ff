"""The BERT family (all-MiniLM-L6-v2, bert-base, ...): a bidirectional encoder, post-norm blocks."""

from __future__ import annotations

import math

import numpy as np

from ._model import Checkpoint, Model, split_qkv
from ._numerics import activation, feed_forward, layer_norm, linear


class BertModel(Model):
    """BERT as Hugging Face's ``BertModel``: embeddings, then post-norm attention + MLP blocks.

    Every token sees every other token (no mask: one unpadded sequence). No pooler and no
    task head: the trace ends at the final layer's hidden states and ``logits`` is None.
    """

    family = "BERT"
    is_causal = False

    def _setup(self, checkpoint: Checkpoint) -> None:
        config, weights = checkpoint.config, checkpoint.weights
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"only absolute position embeddings are supported, {self._config_file} has "
                f"position_embedding_type={config['position_embedding_type']!r}"
            )
        self.num_layers = self._config_int(config, "num_hidden_layers")
        self.num_heads = self._config_int(config, "num_attention_heads")
        self.hidden_size = d = self._config_int(config, "hidden_size")
        self.vocab_size = self._config_int(config, "vocab_size")
        self.max_positions = self._config_int(config, "max_position_embeddings")
        inner = self._config_int(config, "intermediate_size", default=4 * d)
        token_types = self._config_int(config, "type_vocab_size", default=2)
        self._heads_divide(d, self.num_heads, "hidden_size")
        self._eps = self._config_float(config, "layer_norm_eps", 1e-12)
        self._act = activation(config.get("hidden_act", "gelu"))
        # Checkpoints of BertFor* task models put the encoder under "bert.".
        if not any(key.startswith("embeddings.") for key in weights):
            weights = {k.removeprefix("bert."): v for k, v in weights.items()}

        def w(name, *shape):
            return self._weight(weights, name, shape)

        self._word = w("embeddings.word_embeddings.weight", self.vocab_size, d)
        # Position and token-type embeddings add up the same for every text: one token type (0).
        self._position = (
            w("embeddings.position_embeddings.weight", self.max_positions, d)
            + w("embeddings.token_type_embeddings.weight", token_types, d)[0]
        )
        self._embed_norm = (w("embeddings.LayerNorm.weight", d), w("embeddings.LayerNorm.bias", d))
        self._layers = []
        for index in range(self.num_layers):
            p = f"encoder.layer.{index}."
            # torch's Linear stores (out, in); the chapter's x·W wants (in, out). Q, K and V
            # are fused into one (d, 3d) product.
            parts = ("query", "key", "value")
            qkv = np.concatenate([w(p + f"attention.self.{n}.weight", d, d).T for n in parts], 1)
            qkv_bias = np.concatenate([w(p + f"attention.self.{n}.bias", d) for n in parts])
            self._layers.append(
                {
                    "qkv": np.ascontiguousarray(qkv),
                    "qkv_bias": qkv_bias,
                    "out": np.ascontiguousarray(w(p + "attention.output.dense.weight", d, d).T),
                    "out_bias": w(p + "attention.output.dense.bias", d),
                    "norm1": (
                        w(p + "attention.output.LayerNorm.weight", d),
                        w(p + "attention.output.LayerNorm.bias", d),
                    ),
                    "up": np.ascontiguousarray(w(p + "intermediate.dense.weight", inner, d).T),
                    "up_bias": w(p + "intermediate.dense.bias", inner),
                    "down": np.ascontiguousarray(w(p + "output.dense.weight", d, inner).T),
                    "down_bias": w(p + "output.dense.bias", d),
                    "norm2": (
                        w(p + "output.LayerNorm.weight", d),
                        w(p + "output.LayerNorm.bias", d),
                    ),
                }
            )
        self._scale = 1.0 / math.sqrt(d // self.num_heads)

    def _embeddings(self, ids: np.ndarray) -> np.ndarray:
        return layer_norm(
            self._word[ids] + self._position[: ids.size], *self._embed_norm, self._eps
        )

    def _layer_attention(self, index, x, n, *, return_weights):
        qkv = linear(x, self._layers[index]["qkv"], self._layers[index]["qkv_bias"])
        q, k, v = split_qkv(qkv, self.num_heads, n)
        return self._attend(q, k, v, scale=self._scale, return_weights=return_weights)

    def _layer_rest(self, index, x, merged):
        layer = self._layers[index]
        attended = linear(merged, layer["out"], layer["out_bias"])
        attended += x
        x = layer_norm(attended, *layer["norm1"], self._eps)
        hidden = feed_forward(x, layer, self._act)
        hidden += x
        return layer_norm(hidden, *layer["norm2"], self._eps)
