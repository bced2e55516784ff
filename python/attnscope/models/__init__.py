"""Real trained transformers whose attention runs on attnscope's engine.

    import attnscope.models as am
    model = am.load("all-MiniLM-L6-v2")
    trace = model.encode("The doctor fired the nurse because she was tired")
    trace.attentions.shape            # (layers, heads, n, n)
    am.head_stats(trace.attentions, tokens=trace.tokens)

    llm = am.load("SmolLM2-135M-Instruct")     # a causal LLM, from its GGUF file
    llm.generate("The doctor fired the nurse because", max_new_tokens=20).text
    llm.encode("The doctor fired the nurse because she", ablate=[(13, 8)])  # one head removed
    am.head_effects(llm, "The doctor fired the nurse because she")  # each head's effect

Weights come from safetensors or GGUF files, tokens from the `tokenizers` library, and
everything around attention (embeddings, norms, MLPs) is NumPy: no torch or transformers at
run time. Generation decodes through one :class:`attnscope.KVCache` per layer.
"""

from __future__ import annotations

from ._generate import Generation, GenerationStep
from ._loader import load
from ._model import Model, Trace
from ._perplexity import Perplexity
from ._sources import KNOWN_MODELS, ModelUnavailableError
from .interventions import attention_rollout, head_effects, patching_effects
from .stats import (
    DELIMITERS,
    LABELS,
    STATISTICS,
    head_stats,
    induction_scores,
    rank_heads,
    repeated_random_ids,
)

__all__ = [
    "DELIMITERS",
    "KNOWN_MODELS",
    "LABELS",
    "STATISTICS",
    "Generation",
    "GenerationStep",
    "Model",
    "ModelUnavailableError",
    "Perplexity",
    "Trace",
    "attention_rollout",
    "head_effects",
    "head_stats",
    "induction_scores",
    "load",
    "patching_effects",
    "rank_heads",
    "repeated_random_ids",
]
