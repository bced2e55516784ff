"""Tiny transformers trained from scratch in NumPy, with attnscope's exact attention forward and
backward, so that previous-token and induction heads can be watched emerging from training.

Everything but attention (embeddings, projections, LayerNorm, the optional MLP, the loss and Adam)
is vectorised NumPy; attention runs in the engine (``scaled_dot_product_attention(...,
return_lse=True)`` forward, ``scaled_dot_product_attention_backward`` backward).

Example::

    from attnscope import learning

    for report in learning.training(learning.TrainConfig()):
        print(report.step, report.loss, report.induction.max())
"""

from .config import TrainConfig
from .tasks import AGREEMENT_WORDS, TASKS, Batch, make_batch, repeated_sequences, token_names
from .trainer import Report, Trainer, head_scores, held_out_data, train, training

__all__ = [
    "AGREEMENT_WORDS",
    "TASKS",
    "Batch",
    "Report",
    "TrainConfig",
    "Trainer",
    "head_scores",
    "held_out_data",
    "make_batch",
    "repeated_sequences",
    "token_names",
    "train",
    "training",
]
