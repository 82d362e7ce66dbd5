"""Use tripmine's loss and gradient inside PyTorch autograd (CPU tensors).

    pip install tripmine torch scikit-learn
    python examples/torch_autograd.py --steps 300

``TripmineTripletLoss`` is a ``torch.autograd.Function``: its forward pass hands
the embeddings to :func:`tripmine.triplet_loss`, which mines the triplets and
returns the loss together with dL/d(embeddings); the backward pass only scales
that saved gradient by the incoming one.  No N x N x N tensor is ever built,
and any torch model in front of it trains as usual.

The tensors are shared with NumPy without a copy (``Tensor.numpy()``), so keep
them on the CPU; a GPU tensor would have to be copied to the host and back.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import tripmine
from tripmine.metrics import mean_average_precision_at_r
from tripmine.sampling import PKSampler


class TripmineTripletLoss(torch.autograd.Function):
    """Triplet loss of a batch of embeddings; the gradient comes from tripmine."""

    @staticmethod
    def forward(ctx, embeddings: torch.Tensor, labels: torch.Tensor, mining: str,
                margin: float, normalize: bool, seed: int | None) -> torch.Tensor:
        if embeddings.device.type != "cpu":
            raise ValueError("this example handles CPU tensors; call .cpu() first")
        result = tripmine.triplet_loss(embeddings.detach().numpy(), labels.numpy(),
                                       mining=mining, margin=margin, normalize=normalize,
                                       seed=seed, grad=embeddings.requires_grad)
        if result.grad is not None:
            ctx.save_for_backward(torch.from_numpy(result.grad))
        ctx.fraction_active = result.fraction_active
        return embeddings.new_tensor(result.loss)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # One gradient per forward() argument: only the embeddings get one.
        return grad_loss * grad, None, None, None, None, None


def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, mining: str = "batch_hard",
                 margin: float = 0.2, normalize: bool = True,
                 seed: int | None = None) -> torch.Tensor:
    """``tripmine.triplet_loss`` as a differentiable torch function (a 0-d tensor)."""
    return TripmineTripletLoss.apply(embeddings, labels, mining, margin, normalize, seed)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    # Batches of 160 small embeddings are far too little work to share between threads.
    tripmine.set_num_threads(1)
    torch.set_num_threads(1)

    from sklearn.datasets import load_digits  # pip install scikit-learn

    images, digits = load_digits(return_X_y=True)
    order = np.random.default_rng(args.seed).permutation(len(digits))
    train_rows, test_rows = order[: len(order) // 2], order[len(order) // 2:]
    mean, scale = images[train_rows].mean(0), np.maximum(images[train_rows].std(0), 1.0)
    x = torch.from_numpy(((images - mean) / scale).astype(np.float32))
    labels = torch.from_numpy(digits)

    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = PKSampler(digits[train_rows], p=10, k=16, seed=args.seed)
    step = 0
    while step < args.steps:
        for batch in sampler:
            if step == args.steps:
                break
            rows = torch.from_numpy(train_rows[batch])
            loss = triplet_loss(model(x[rows]), labels[rows], margin=0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step:4d}  loss {loss.item():.4f}")

    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(model(x[test_rows]), dim=1).numpy()
    score = mean_average_precision_at_r(embeddings, digits[test_rows])
    print(f"MAP@R of the held-out images: {score:.3f}")
    return {"map_at_r": score}


if __name__ == "__main__":
    main()
