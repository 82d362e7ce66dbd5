"""Train an embedding network in plain NumPy with tripmine's triplet loss and gradient.

    pip install 'tripmine[demo]'          # scikit-learn for the digits dataset
    python examples/numpy_trainer.py --steps 300

A one-hidden-layer perceptron maps 8x8 digit images (scikit-learn's
``load_digits``) to 32-d embeddings.  Each step:

1. draw a batch of P classes x K images (``tripmine.sampling.PKSampler``);
2. forward pass: ``e = relu(x W1 + b1) W2 + b2``;
3. ``tripmine.triplet_loss(e, labels, normalize=True)`` mines the batch-hard
   triplets on the L2-normalised embeddings and returns the loss *and* dL/de
   (the gradient already chains through the normalisation);
4. backward pass by hand, then one Adam step.

Retrieval quality (MAP@R of held-out images, each querying the others) is
printed before and after.  ``python -m tripmine demo`` is the full version
(plots, several mining rules, JSON output); this file is the short one to read.
"""

from __future__ import annotations

import argparse

import numpy as np

import tripmine
from tripmine.metrics import mean_average_precision_at_r
from tripmine.sampling import PKSampler


def init_params(n_in: int, n_hidden: int, n_out: int, rng: np.random.Generator) -> dict:
    """He-initialised weights, zero biases (float32)."""
    return {
        "W1": (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2 / n_in)).astype(np.float32),
        "b1": np.zeros(n_hidden, np.float32),
        "W2": (rng.standard_normal((n_hidden, n_out)) * np.sqrt(2 / n_hidden)).astype(np.float32),
        "b2": np.zeros(n_out, np.float32),
    }


def embed(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward pass: the (unnormalised) embeddings and the hidden activations."""
    hidden = np.maximum(x @ params["W1"] + params["b1"], 0)
    return hidden @ params["W2"] + params["b2"], hidden


def backprop(params: dict, x: np.ndarray, hidden: np.ndarray, grad_out: np.ndarray) -> dict:
    """Backward pass: dL/dparams from dL/d(embeddings)."""
    grad_hidden = (grad_out @ params["W2"].T) * (hidden > 0)
    return {"W2": hidden.T @ grad_out, "b2": grad_out.sum(0),
            "W1": x.T @ grad_hidden, "b1": grad_hidden.sum(0)}


def unit_rows(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def train(x: np.ndarray, labels: np.ndarray, *, steps: int = 300, p: int = 10, k: int = 16,
          lr: float = 3e-3, margin: float = 0.5, hidden: int = 256, dim: int = 32,
          seed: int = 0, log_every: int = 50) -> tuple[dict, list[float]]:
    """Train from scratch; returns the parameters and the loss of every step."""
    rng = np.random.default_rng(seed)
    params = init_params(x.shape[1], hidden, dim, rng)
    first = {name: np.zeros_like(v) for name, v in params.items()}  # Adam's moments
    second = {name: np.zeros_like(v) for name, v in params.items()}
    sampler = PKSampler(labels, p, k, seed=seed)
    losses: list[float] = []
    while len(losses) < steps:
        for batch in sampler:  # each pass over the sampler is one epoch
            if len(losses) == steps:
                break
            out, hidden_act = embed(params, x[batch])
            result = tripmine.triplet_loss(out, labels[batch], mining="batch_hard",
                                           margin=margin, normalize=True)
            grads = backprop(params, x[batch], hidden_act, result.grad)
            t = len(losses) + 1
            for name in params:  # Adam, with bias correction
                first[name] = 0.9 * first[name] + 0.1 * grads[name]
                second[name] = 0.999 * second[name] + 0.001 * grads[name] ** 2
                step = lr * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
                params[name] -= step * first[name] / (np.sqrt(second[name]) + 1e-8)
            losses.append(result.loss)
            if log_every and t % log_every == 0:
                print(f"step {t:4d}  loss {np.mean(losses[-log_every:]):.4f}  "
                      f"active triplets {result.fraction_active:.2f}")
    return params, losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    # A batch of 160 embeddings is far too little work to share between threads.
    tripmine.set_num_threads(1)

    from sklearn.datasets import load_digits  # pip install scikit-learn

    images, digits = load_digits(return_X_y=True)
    order = np.random.default_rng(args.seed).permutation(len(digits))
    train_rows, test_rows = order[: len(order) // 2], order[len(order) // 2:]
    mean, scale = images[train_rows].mean(0), np.maximum(images[train_rows].std(0), 1.0)
    x = ((images - mean) / scale).astype(np.float32)

    print(f"MAP@R raw pixels: "
          f"{mean_average_precision_at_r(images[test_rows], digits[test_rows]):.3f}")
    params, _ = train(x[train_rows], digits[train_rows], steps=args.steps, seed=args.seed)
    embeddings = unit_rows(embed(params, x[test_rows])[0])
    score = mean_average_precision_at_r(embeddings, digits[test_rows])
    print(f"MAP@R trained network: {score:.3f}")
    return {"map_at_r": score}


if __name__ == "__main__":
    main()
