"""attnscope.learning's trainer against the same model written in PyTorch, in one process.

Both start from the same weights and see the same batches, with the same Adam, so their losses
follow the same course; their steps alternate, and the median time of a step is reported for
each, with the step at which the NumPy trainer's induction score first passes 0.5.

    python benchmarks/learning_vs_torch.py [--steps 400] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import attnscope
import numpy as np
import torch
from attnscope import learning
from threadpoolctl import threadpool_limits


class TorchModel(torch.nn.Module):
    """The trainer's model in PyTorch: embeddings, pre-LayerNorm attention-only layers."""

    def __init__(self, params: dict[str, np.ndarray], config: learning.TrainConfig) -> None:
        super().__init__()
        self.config = config
        self.weights = torch.nn.ParameterDict(
            {
                name.replace(".", "_"): torch.nn.Parameter(torch.tensor(p))
                for name, p in params.items()
            }
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w, config = self.weights, self.config
        batch, length = tokens.shape
        x = w["token_embedding"][tokens] + w["position_embedding"][:length]
        for layer in range(config.num_layers):
            normed = torch.nn.functional.layer_norm(x, (config.d_model,), eps=1e-5)
            q, k, v = (
                (normed @ w[f"{layer}_w_{m}"])
                .view(batch, length, config.num_heads, config.head_dim)
                .transpose(1, 2)
                for m in "qkv"
            )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=config.attention_scale
            )
            x = x + out.transpose(1, 2).reshape(batch, length, config.d_model) @ w[f"{layer}_w_o"]
        normed = torch.nn.functional.layer_norm(x, (config.d_model,), eps=1e-5)
        return normed @ w["unembedding"]


def torch_step(model, optimizer, batch: learning.Batch) -> float:
    logits = model(torch.from_numpy(batch.tokens))
    counted = torch.from_numpy(batch.counted)
    loss = torch.nn.functional.cross_entropy(
        logits[counted], torch.from_numpy(batch.targets)[counted]
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attnscope.set_num_threads(args.threads)
    config = learning.TrainConfig(steps=args.steps)
    trainer = learning.Trainer(config)
    model = TorchModel(trainer.params, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98))
    data = np.random.default_rng(1)
    ours, theirs, losses = [], [], []
    reached = None
    for step in range(1, args.steps + 1):
        shape = (config.batch_size, config.seq_len, config.vocab_size)
        batch = learning.make_batch(config.task, data, *shape)
        started = time.perf_counter()
        theirs_loss = torch_step(model, optimizer, batch)
        theirs.append(time.perf_counter() - started)
        started = time.perf_counter()
        with threadpool_limits(limits=1, user_api="blas"):
            loss, grads = trainer.loss_and_gradients(batch)
            trainer.apply_gradients(grads)
        ours.append(time.perf_counter() - started)
        losses.append((loss, theirs_loss))
        if reached is None and step % 25 == 0:
            report = trainer.report()
            if report.induction.max() > 0.5:
                reached = (step, report.induction.max(), report.second_copy_loss)
    print(f"threads: {args.threads}; torch {torch.__version__}, NumPy {np.__version__}")
    print(
        f"median step: attnscope.learning {statistics.median(ours) * 1e3:.1f} ms, "
        f"PyTorch {statistics.median(theirs) * 1e3:.1f} ms "
        f"(ratio {statistics.median(ours) / statistics.median(theirs):.2f})"
    )
    for step in (1, 100, 200, args.steps):
        if step <= args.steps:
            print(
                f"loss at step {step}: attnscope.learning {losses[step - 1][0]:.4f}, "
                f"PyTorch {losses[step - 1][1]:.4f}"
            )
    if reached:
        print(
            f"induction score > 0.5 at step {reached[0]} (score {reached[1]:.2f}, "
            f"second-copy loss {reached[2]:.2f})"
        )
    print(f"total step time: attnscope.learning {sum(ours):.2f} s, PyTorch {sum(theirs):.2f} s")


if __name__ == "__main__":
    main()
