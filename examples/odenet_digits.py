"""Train an ODE-Net (Chen et al. 2018, section 3) on scikit-learn's 8x8 digits.

Usage: ``python examples/odenet_digits.py [--epochs 20] [--width 64]``. Needs scikit-learn.
With the defaults it reaches about 99% test accuracy in 20 epochs (about 4 s of one CPU core per
epoch); the printed NFE is the number of vector field evaluations per forward and backward pass.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from neuralode.models import ODENetClassifier


def load_digits_tensors(seed: int = 0):
    """Digits scaled to [0, 1] as ``(N, 1, 8, 8)`` float32, stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    idx_tr, idx_te = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gradient", default="direct", help="direct, backsolve or checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    X_tr, y_tr, X_te, y_te = load_digits_tensors(args.seed)
    model = ODENetClassifier((1, 8, 8), 10, args.width, gradient=args.gradient)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    start = time.perf_counter()
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(X_tr))
        for i in range(0, len(X_tr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        nfe_f, nfe_b = model.nfe_forward, model.nfe_backward
        model.eval()
        with torch.no_grad():
            acc = float((model(X_te).argmax(1) == y_te).float().mean())
        print(
            f"epoch {epoch:3d}  loss {loss.item():.4f}  test accuracy {acc:.4f}  "
            f"NFE forward {nfe_f} backward {nfe_b}  {time.perf_counter() - start:.1f}s"
        )
    return acc


if __name__ == "__main__":
    main()
