"""Real trained transformers whose attention runs on attnscope's engine.

    import attnscope.models as am
    model = am.load("all-MiniLM-L6-v2")
    trace = model.encode("The doctor fired the nurse because she was tired")
    trace.attentions.shape            # (layers, heads, n, n)
    am.head_stats(trace.attentions, tokens=trace.tokens)

Weights come from safetensors, tokens from the `tokenizers` library, and everything around
attention (embeddings, layer norms, MLPs) is NumPy: no torch or transformers at run time.
"""

from __future__ import annotations

from ._model import Model, Trace, load
from ._sources import KNOWN_MODELS, ModelUnavailableError
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
    "Model",
    "ModelUnavailableError",
    "Trace",
    "head_stats",
    "induction_scores",
    "load",
    "rank_heads",
    "repeated_random_ids",
]
