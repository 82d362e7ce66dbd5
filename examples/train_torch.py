"""Train a PyTorch embedding with tripmine.torch.TripletLoss on an open-set split of digits.

    pip install 'tripmine[torch,demo]'        # torch, scikit-learn
    python examples/train_torch.py --steps 200

Data: scikit-learn's 8x8 handwritten digits (no download).  Digits 0-4 are the
*seen* classes: half of their images train the model, the other half are
held out.  Digits 5-9 are *unseen*: never trained on, they are the open set.
Model: a small MLP (64-256-64, ReLU); loss: ``tripmine.torch.TripletLoss``
(batch-hard by default, margin 0.2, L2-normalised embeddings) on P x K batches
of 5 digits x 16 images from ``tripmine.sampling.PKSampler``; Adam.
``--memory N`` adds a cross-batch memory of the last N embeddings
(``tripmine.torch.MemoryBank``): each batch is also mined against them.

Recall@1 (``tripmine.metrics.recall_at_k``, each image querying the others of
its group) before and after training, for the held-out images of the seen
digits and for the unseen digits.  Expect the first to rise and the second not
to: five training classes teach features that separate those five, not digits
in general (see the README's "Open set" paragraph).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import tripmine
from tripmine.metrics import recall_at_k
from tripmine.sampling import PKSampler
from tripmine.torch import MemoryBank, TripletLoss

SEEN_DIGITS = (0, 1, 2, 3, 4)


def load_split(seed: int) -> dict:
    """Digits as standardised float32 rows: seen-train, seen-held-out and unseen."""
    from sklearn.datasets import load_digits  # pip install scikit-learn

    images, digits = load_digits(return_X_y=True)
    seen = np.isin(digits, SEEN_DIGITS)
    rows = np.random.default_rng(seed).permutation(np.flatnonzero(seen))
    train, held_out = np.sort(rows[: len(rows) // 2]), np.sort(rows[len(rows) // 2:])
    unseen = np.flatnonzero(~seen)
    mean, scale = images[train].mean(0), np.maximum(images[train].std(0), 1.0)
    x = ((images - mean) / scale).astype(np.float32)
    return {name: (torch.from_numpy(x[part]), digits[part])
            for name, part in (("train", train), ("held_out", held_out), ("unseen", unseen))}


def recall_at_1(model: torch.nn.Module | None, x: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        embeddings = x if model is None else model(x)
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    return float(recall_at_k(embeddings.numpy(), labels, 1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--mining", default="batch_hard",
                        choices=["batch_hard", "batch_all", "semi_hard", "distance_weighted"],
                        help="mining rule (default batch_hard)")
    parser.add_argument("--margin", type=float, default=0.2, help="triplet margin (default 0.2)")
    parser.add_argument("--memory", type=int, default=0,
                        help="cross-batch memory size in embeddings (default 0: none)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    # Batches of 80 small embeddings are too little work to share between threads.
    torch.set_num_threads(1)
    tripmine.set_num_threads(1)

    data = load_split(args.seed)
    x_train, y_train = data["train"]
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 64))
    groups = (("held_out", "seen digits, held-out images"), ("unseen", "unseen digits (5-9)"))
    scores = {"raw pixels": {g: recall_at_1(None, *data[g]) for g, _ in groups},
              "untrained network": {g: recall_at_1(model, *data[g]) for g, _ in groups}}

    memory = MemoryBank(args.memory, 64) if args.memory else None
    criterion = TripletLoss(mining=args.mining, margin=args.margin, normalize=True,
                            seed=args.seed, memory=memory)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = PKSampler(y_train, p=len(SEEN_DIGITS), k=16, seed=args.seed)
    labels = torch.from_numpy(y_train)
    step = 0
    while step < args.steps:
        for batch in sampler:
            if step == args.steps:
                break
            rows = torch.from_numpy(batch)
            loss = criterion(model(x_train[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step:4d}  loss {loss.item():.4f}  "
                      f"active triplets {criterion.fraction_active:.2f}")
    scores["trained network"] = {g: recall_at_1(model, *data[g]) for g, _ in groups}

    print(f"\nRecall@1           {groups[0][1]:>30}  {groups[1][1]:>20}")
    for name, values in scores.items():
        print(f"{name:18} {values['held_out']:30.4f}  {values['unseen']:20.4f}")
    seconds = time.perf_counter() - start
    print(f"done in {seconds:.1f} s ({args.steps} steps, {args.mining}"
          f"{f', memory {args.memory}' if args.memory else ''})")
    return {"recall_at_1": scores, "seconds": seconds, "final_loss": loss.item()}


if __name__ == "__main__":
    main()
