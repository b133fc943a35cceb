"""ODE-Net on scikit-learn's 8x8 handwritten digits (real scans, shipped with scikit-learn).

References
----------
Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018,
section 3 (ODE-Net). Alpaydin and Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository, 1998 (the data of ``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neuralode.models import ODENetClassifier

from ..errors import CLIError
from ..options import choice, fraction, integer, number
from ..report import nfe_line, table
from .base import Task

__all__ = ["ODENetTask"]


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """Translate each image ``(B, 1, H, W)`` by a random offset in ``[-k, k]^2`` (zero fill):
    data augmentation drawn from torch's global generator."""
    B, _, H, W = x.shape
    padded = F.pad(x, (k, k, k, k))
    dy, dx = (torch.randint(0, 2 * k + 1, (B,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded[b, 0, rows, cols][:, None]


class ODENetTask(Task):
    name = "odenet"
    summary_line = "ODE-Net image classifier on scikit-learn's 8x8 digits"
    datasets = ("digits",)
    defaults = dict(
        epochs=20, batch_size=64, lr=1e-2, method="dopri5", rtol=1e-3, atol=1e-4, step_size=None
    )
    quick = dict(epochs=1, batch_size=64, width=8, max_train=192)
    options = dict(
        width=64,
        field="conv",
        val_fraction=0.1,
        test_fraction=0.2,
        max_train=0,
        lr_decay=0.9,
        shift=0,
    )

    option_rules = dict(
        width=integer(1),
        field=choice("conv", "mlp"),
        val_fraction=fraction(),
        test_fraction=fraction(),
        max_train=integer(0),
        lr_decay=number(0, maximum=1),
        shift=integer(0, 7),  # pixels of an 8x8 image
    )

    def load_data(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if self.opt["field"] not in ("conv", "mlp"):
            raise CLIError(f"--set field must be conv or mlp; got {self.opt['field']!r}.")
        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).reshape(-1, 1, 8, 8)
        seed = self.cfg.seed
        vf, tf = self.opt["val_fraction"], self.opt["test_fraction"]
        if not (0 < vf < 1 and 0 < tf < 1 and vf + tf < 1):
            raise CLIError("--set val_fraction / test_fraction must be in (0, 1), sum < 1.")
        X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=tf, stratify=y, random_state=seed)
        X_tr, X_va, y_tr, y_va = train_test_split(
            X_tr, y_tr, test_size=vf / (1 - tf), stratify=y_tr, random_state=seed
        )
        if self.opt["max_train"]:
            X_tr, y_tr = X_tr[: self.opt["max_train"]], y_tr[: self.opt["max_train"]]
        self.split = {}
        for name, (a, b) in {
            "train": (X_tr, y_tr),
            "val": (X_va, y_va),
            "test": (X_te, y_te),
        }.items():
            self.split[name] = (
                torch.as_tensor(a, dtype=self.dtype, device=self.device),
                torch.as_tensor(b, dtype=torch.long, device=self.device),
            )

    def build_model(self) -> nn.Module:
        return ODENetClassifier(
            (1, 8, 8), 10, width=self.opt["width"], field=self.opt["field"], **self._solver()
        )

    def _solver(self) -> dict:
        kw = self.cfg.solver_kwargs()
        return kw

    def epoch_batches(self, generator):
        n = len(self.split["train"][1])
        return list(torch.randperm(n, generator=generator).split(self.cfg.batch_size))

    def train_loss(self, model, indices, epoch, step):
        X, y = self.split["train"]
        idx = indices.to(self.device)
        x = _shift(X[idx], self.opt["shift"]) if self.opt["shift"] else X[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y[idx])
        acc = (logits.argmax(1) == y[idx]).float().mean()
        return loss, {"train_accuracy": float(acc)}

    def _scores(self, model, split: str, batch: int = 512):
        X, y = self.split[split]
        losses, correct, nfe = 0.0, 0, []
        for i in range(0, len(y), batch):
            logits = model(X[i : i + batch])
            losses += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
            nfe.append(self.nfe(model)[0])
        return losses / len(y), correct / len(y), float(np.mean(nfe))

    def validate(self, model):
        loss, acc, _ = self._scores(model, "val")
        return {"val_loss": loss, "val_accuracy": acc}

    def evaluate(self, model):
        from sklearn.linear_model import LogisticRegression

        with torch.no_grad():
            loss, acc, nfe = self._scores(model, "test")
        X_tr, y_tr = (t.cpu().numpy() for t in self.split["train"])
        X_te, y_te = (t.cpu().numpy() for t in self.split["test"])
        lr = LogisticRegression(max_iter=2000).fit(X_tr.reshape(len(X_tr), -1), y_tr)
        lr_acc = float(lr.score(X_te.reshape(len(X_te), -1), y_te))
        return {
            "task": self.name,
            "n_train": len(y_tr),
            "n_test": len(y_te),
            "test_accuracy": acc,
            "test_loss": loss,
            "test_nfe_forward": nfe,
            "baseline_logistic_regression_accuracy": lr_acc,
        }

    def summary(self, results, metrics):
        r = results
        rows = [
            ["ODE-Net", r["test_accuracy"], r["test_loss"]],
            ["logistic regression (pixels)", r["baseline_logistic_regression_accuracy"], None],
        ]
        verdict = (
            "the ODE-Net beats the logistic regression."
            if r["test_accuracy"] > r["baseline_logistic_regression_accuracy"]
            else "the ODE-Net does NOT beat the logistic regression."
        )
        return "\n".join(
            [
                f"ODE-Net on 8x8 digits: {r['n_train']} training images, {r['n_test']} test "
                "images (held out, stratified)",
                table(["model", "test accuracy", "test loss"], rows),
                f"  {verdict}",
                f"  NFE of the ODE block per test batch: {r['test_nfe_forward']:.0f}",
                nfe_line(metrics),
            ]
        )

    def plot(self, model, plot_dir: Path):
        from ..plots import plot_digits

        X, y = self.split["test"]
        with torch.no_grad():
            pred = model(X[:32]).argmax(1)
        return [plot_digits(plot_dir / "digits.png", X[:32].cpu(), y[:32].cpu(), pred.cpu())]
