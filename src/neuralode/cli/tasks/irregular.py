"""Shared machinery of the tasks on irregularly sampled series (latent ODE, ODE-RNN).

Data: ``pbcseq`` (embedded), ``physionet DIR`` (raw challenge files, ``"clean"`` pipeline) or
``csv PATH``; split by subject (seeded), standardised with statistics of the training subjects
only, times divided by the largest training time (``time_scale="max"``).

Evaluation, on held-out subjects and in standardised units (mean squared error over the
observed entries of the held-out time points):

* interpolation -- a seeded random 30% of each subject's interior visits are hidden; the model
  sees the rest and predicts the hidden ones;
* extrapolation -- the model sees the first half of each subject's visits and predicts the
  second half.

Training matches both: each sample of a batch is conditioned either on a random subset of its
points or on a random prefix, and the loss scores all its points.
"""

from __future__ import annotations

import abc
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from neuralode.data import (
    collate_series,
    load_csv,
    load_pbcseq,
    load_physionet,
    split_and_normalize,
)

from .. import baselines
from ..errors import CLIError
from ..options import choice, either, fraction, integer, number, text
from ..report import nfe_line, table, verdict
from .base import Task

__all__ = ["IrregularTask"]

INTERP_FRACTION = 0.3
#: Baselines of the held-out evaluation (results key, function), see :mod:`..baselines`.
BASELINES = (
    ("mean", baselines.subject_mean),
    ("locf", baselines.locf),
    ("linear", baselines.linear),
)
EVAL_BATCH = 64


def _or(value, fallback):
    """``value`` unless it is None (an AUROC of 0.0 is a value)."""
    return fallback if value is None else value


class IrregularTask(Task):
    """Base of the latent ODE and ODE-RNN tasks; subclasses add the model-specific parts."""

    datasets = ("pbcseq", "physionet", "csv")
    val_key = "val_mse"
    #: Options every irregular task has (subclasses extend them).
    common_options = dict(
        val_fraction=0.15,
        test_fraction=0.15,
        time_scale="max",
        max_subjects=0,
        classify=True,
        n_samples=16,
        id_col="id",
        time_col="time",
        variable_col="variable",
        value_col="value",
        label_col=None,
        time_unit=None,
        physionet_sets="set-a",
    )
    common_rules = dict(
        val_fraction=fraction(),
        test_fraction=fraction(),
        time_scale=either(choice("max"), number(0)),
        max_subjects=integer(0),
        classify=choice(True, False),
        n_samples=integer(1),
        id_col=text(),
        time_col=text(),
        variable_col=text(),
        value_col=text(),
        label_col=text(optional=True),
        time_unit=text(optional=True),
        physionet_sets=text(),
    )
    #: Options that only mean something for one dataset kind.
    data_options = dict(
        id_col="csv",
        time_col="csv",
        variable_col="csv",
        value_col="csv",
        label_col="csv",
        time_unit="csv",
        physionet_sets="physionet",
    )
    model_label = "model"
    #: Legends of the held-out subjects' figure: the curve and (``None``: no band) the band.
    curve_label = "model prediction"
    band_label: str | None = None

    @classmethod
    def check_options(cls, options, data):
        super().check_options(options, data)
        for key, kind in cls.data_options.items():
            if data != kind and options.get(key) != cls.options[key]:
                raise CLIError(
                    f"--set {key} has no effect with --data {data}; it applies to --data {kind} "
                    "only (pbcseq and physionet have their own columns and label)."
                )

    # -- data -----------------------------------------------------------------------------
    def load_data(self) -> None:
        o = self.opt
        kind, path = self.cfg.data, self.cfg.data_path
        try:
            if kind == "pbcseq":
                ds = load_pbcseq()
            elif kind == "physionet":
                sets = [x.strip() for x in str(o["physionet_sets"]).split(",") if x.strip()]
                ds = load_physionet(path, sets=sets, outcomes=bool(o["classify"]),
                                    preprocessing="clean")  # fmt: skip
            elif kind == "csv":
                ds = load_csv(
                    path,
                    id_col=o["id_col"],
                    time_col=o["time_col"],
                    variable_col=o["variable_col"],
                    value_col=o["value_col"],
                    label_col=o["label_col"],
                    time_unit=o["time_unit"] or "unspecified",
                )
            else:  # guarded by the argument parser
                raise CLIError(f"task {self.name!r} cannot use --data {kind}.")
        except (OSError, ValueError, ImportError) as exc:
            raise CLIError(str(exc)) from None
        ds = ds.subset([i for i, r in enumerate(ds) if len(r) > 0])
        if o["max_subjects"]:
            ds = ds.subset(range(min(o["max_subjects"], len(ds))))
        vf, tf = o["val_fraction"], o["test_fraction"]
        if not (0 < vf < 1 and 0 < tf < 1 and vf + tf < 1):
            raise CLIError("--set val_fraction / test_fraction must be in (0, 1) with sum < 1.")
        ts = o["time_scale"]
        try:
            (train, val, test), self.normalizer = split_and_normalize(
                ds, (1 - vf - tf, vf, tf), seed=self.cfg.seed, method="standard", time_scale=ts
            )
        except ValueError as exc:
            raise CLIError(f"{kind}: {exc}") from None
        for name, part in (("training", train), ("validation", val), ("test", test)):
            if len(part) == 0:
                raise CLIError(
                    f"{kind}: {len(ds)} subjects are too few for a {name} split; "
                    "add subjects or change --set val_fraction / test_fraction."
                )
            # One time point leaves nothing to learn or predict (no course, no held-out point):
            # training would run with val_mse = inf and evaluate nothing.
            if not any(len(r) >= 2 for r in part):
                single = sum(len(r) < 2 for r in ds)
                raise CLIError(
                    f"{kind}: no {name} subject has two or more observation times "
                    f"({single} of {len(ds)} subjects have a single one), so there is nothing "
                    "to learn or predict; give the subjects several observation times, or "
                    "change --set val_fraction / test_fraction."
                )
        self.raw, self.parts = ds, {"train": train, "val": val, "test": test}
        self.channels, self.time_unit = tuple(ds.channels), ds.time_unit
        labels = train.labels
        self.has_labels = bool(o["classify"]) and bool((~torch.isnan(labels)).any())
        if self.has_labels:
            lab = labels[~torch.isnan(labels)]
            if len(torch.unique(lab)) < 2 or not bool(((lab == 0) | (lab == 1)).all()):
                self.has_labels = False  # a head needs 0/1 labels of both classes
        if kind == "csv" and o["label_col"] is not None and o["classify"] and not self.has_labels:
            # Asked for by name: not silently dropped.
            found = sorted({float(x) for x in labels[~torch.isnan(labels)].tolist()})
            shown = ", ".join(f"{x:g}" for x in found[:6]) + (", ..." if len(found) > 6 else "")
            raise CLIError(
                f"--set label_col={o['label_col']}: the classification head needs labels 0 and "
                f"1, both present among the {len(train)} training subjects; got "
                f"{'values ' + shown if found else 'no label'}. Recode the column, or pass "
                "--set classify=false to train without the head."
            )
        self.eval_masks = {s: self._eval_masks(s) for s in ("val", "test")}

    def export(self):
        from ..runs import normalizer_state

        return {
            "channels": list(self.channels),
            "time_unit": self.time_unit,
            "has_labels": bool(self.has_labels),
            "normalizer": normalizer_state(self.normalizer),
        }

    def restore(self, exported):
        from ..runs import normalizer_from_state

        self.channels = tuple(exported["channels"])
        self.time_unit = exported["time_unit"]
        self.has_labels = bool(exported["has_labels"])
        self.normalizer = normalizer_from_state(exported["normalizer"])

    def batch(self, split: str, indices) -> object:
        part = self.parts[split]
        return collate_series([part[int(i)] for i in indices], dtype=self.dtype, device=self.device)

    def _eval_masks(self, split: str) -> dict:
        """Deterministic conditioning / target masks ``(N, T)`` per evaluation setting."""
        part = self.parts[split]
        rng = np.random.default_rng(self.cfg.seed + (1 if split == "val" else 2))
        out = {}
        for setting in ("interpolation", "extrapolation"):
            conds, targets = [], []
            for r in part:
                n = len(r)
                cond = np.ones(n, bool)
                if setting == "interpolation":
                    if n >= 3:
                        hide = rng.random(n - 2) < INTERP_FRACTION
                        if not hide.any():
                            hide[rng.integers(n - 2)] = True
                        cond[1:-1] = ~hide
                elif n >= 2:
                    cond[math.ceil(n / 2) :] = False
                conds.append(cond)
                targets.append(~cond)
            out[setting] = (conds, targets)
        return out

    def epoch_batches(self, generator):
        n = len(self.parts["train"])
        return list(torch.randperm(n, generator=generator).split(self.cfg.batch_size))

    def label_name(self) -> str:
        """How summaries name the label: the dataset's own meaning of it (pbcseq, physionet)
        or, for a CSV, neutrally by its column."""
        if self.cfg.data == "pbcseq":
            return "mortality (death during follow-up)"
        if self.cfg.data == "physionet":
            return "in-hospital mortality"
        col = self.opt["label_col"]
        return f"label {col!r}" if col else "label"

    def eval_generator(self) -> torch.Generator:
        """A fresh generator for the random draws of an evaluation (seeded by the run's seed)."""
        return torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1_000_003)

    def train_cond(self, batch) -> torch.Tensor:
        """Random conditioning points ``(B, T)``: a random prefix or a random subset."""
        B, T = batch.valid.shape
        dev = batch.valid.device
        n = batch.lengths.to(dev)
        prefix = (
            torch.arange(T, device=dev)[None, :]
            < (1 + (torch.rand(B, device=dev) * n).floor().long())[:, None]
        )
        p_drop = 0.5 * torch.rand(B, 1, device=dev)
        subset = torch.rand(B, T, device=dev) >= p_drop
        subset[:, 0] = True
        use_prefix = (torch.rand(B, device=dev) < 0.5)[:, None]
        return torch.where(use_prefix, prefix, subset) & batch.valid

    @staticmethod
    def conditioned(batch, cond: torch.Tensor):
        """``batch`` with only the time points ``cond`` observed (the encoder's input)."""
        m = batch.mask * cond.unsqueeze(-1).to(batch.mask.dtype)
        return replace(batch, mask=m, values=batch.values * m)

    # -- the model-specific part ----------------------------------------------------------
    @abc.abstractmethod
    def model_loss(self, model, batch, cond, epoch, step):
        """``(loss, logs)``: mean over the batch's samples."""

    @abc.abstractmethod
    def predict(self, model, batch, cond, times, n_samples, generator=None):
        """``(mean, std)``, each ``(B, Q, C)``, at the query times ``times (B, Q)``; random
        draws (posterior samples) from ``generator``."""

    def predict_label(self, model, batch):
        """Probabilities ``(B,)`` of the label, or ``None`` without a classification head."""
        return None

    # -- training -------------------------------------------------------------------------
    def train_loss(self, model, indices, epoch, step):
        batch = self.batch("train", indices.tolist())
        return self.model_loss(model, batch, self.train_cond(batch), epoch, step)

    def _mask_tensor(self, rows, batch) -> torch.Tensor:
        out = torch.zeros(batch.valid.shape, dtype=torch.bool, device=batch.valid.device)
        for b, r in enumerate(rows):
            out[b, : len(r)] = torch.as_tensor(r, device=out.device)
        return out

    def _errors(self, model, split: str, n_samples: int, with_baselines: bool) -> dict:
        """Squared-error sums and counts per setting (model and baselines) on ``split``."""
        part = self.parts[split]
        res = {}
        # Posterior samples from a generator of their own, seeded per evaluation: the numbers
        # do not depend on what drew from torch's global generator before (training, an
        # earlier evaluation), so `neuralode evaluate` reproduces those printed after training.
        gen = self.eval_generator()
        for setting, (conds, targets) in self.eval_masks[split].items():
            sums = {"model": 0.0, "mean": 0.0, "locf": 0.0, "linear": 0.0}
            count = 0
            for start in range(0, len(part), EVAL_BATCH):
                idx = list(range(start, min(start + EVAL_BATCH, len(part))))
                batch = self.batch(split, idx)
                cond = self._mask_tensor([conds[i] for i in idx], batch)
                target = self._mask_tensor([targets[i] for i in idx], batch)
                tm = batch.mask * target.unsqueeze(-1).to(batch.mask.dtype)
                if not bool(tm.any()):
                    continue
                mean, _ = self.predict(model, batch, cond, batch.times, n_samples, gen)
                sums["model"] += float(((mean - batch.values) ** 2 * tm).sum())
                count += int(tm.sum())
                if with_baselines:
                    for i in idx:
                        for name, fn in BASELINES:
                            sums[name] += self._baseline_sse(fn, part[i], conds[i], targets[i])
            res[setting] = {k: (v / count if count else None) for k, v in sums.items()}
            res[setting]["n_points"] = count
        return res

    @staticmethod
    def _baseline_sse(fn, record, cond, target) -> float:
        if not target.any():
            return 0.0
        t = record.times.double().numpy()
        y = record.values.double().numpy()
        m = record.mask.double().numpy()
        pred = fn(t[cond], y[cond], m[cond], t[target])
        mt = m[target]
        return float((((pred - y[target]) ** 2) * mt).sum())

    def validate(self, model):
        r = self._errors(model, "val", max(2, self.opt["n_samples"] // 4), with_baselines=False)
        out = {
            "val_mse_interpolation": r["interpolation"]["model"],
            "val_mse_extrapolation": r["extrapolation"]["model"],
        }
        vals = [v for v in out.values() if v is not None]
        out["val_mse"] = float(np.mean(vals)) if vals else math.inf
        if self.has_labels:
            out["val_auroc"] = self._auroc(model, "val")
        return out

    def _auroc(self, model, split: str):
        part = self.parts[split]
        probs = []
        for start in range(0, len(part), EVAL_BATCH):
            batch = self.batch(split, range(start, min(start + EVAL_BATCH, len(part))))
            probs.append(self.predict_label(model, batch).double().cpu())
        return baselines.auroc(part.labels.numpy(), torch.cat(probs).numpy())

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, model):
        with torch.no_grad():
            errors = self._errors(model, "test", self.opt["n_samples"], with_baselines=True)
            res = {
                "task": self.name,
                "data": self.cfg.data,
                "subjects": {k: len(v) for k, v in self.parts.items()},
                "channels": list(self.raw.channels),
                "time_unit": self.raw.time_unit,
                "label": self.label_name(),
                "metric": "MSE of standardised values at held-out time points (test subjects)",
                **errors,
            }
            if self.has_labels:
                res["auroc_model"] = self._auroc(model, "test")
                tr, te = self.parts["train"], self.parts["test"]
                if self.raw.static_names:
                    res["auroc_logistic_static"] = baselines.static_logistic_auroc(
                        torch.stack([r.static for r in tr]).numpy(),
                        tr.labels.numpy(),
                        torch.stack([r.static for r in te]).numpy(),
                        te.labels.numpy(),
                        seed=self.cfg.seed,
                    )
                res["static_names"] = list(self.raw.static_names)
                labels = te.labels.numpy()
                res["test_label_classes"] = len(np.unique(labels[~np.isnan(labels)]))
        return res

    def summary(self, results, metrics):
        r = results
        s = r["subjects"]
        lines = [
            f"{self.model_label} on {r['data']}: {sum(s.values())} subjects ({s['train']} train / "
            f"{s['val']} validation / {s['test']} test, split by subject), "
            f"{len(r['channels'])} channels, "
            + (
                f"time in {r['time_unit']}"
                if r["time_unit"] != "unspecified"
                else "time unit not given (--set time_unit=...)"
            ),
            "Held-out test subjects: MSE of standardised values at hidden time points "
            "(lower is better)",
        ]
        rows = []
        names = {"mean": "subject mean", "locf": "LOCF", "linear": "linear"}
        for setting in ("interpolation", "extrapolation"):
            e = r[setting]
            rows.append([setting, e["model"], *(e.get(k) for k in names), e["n_points"]])
        lines.append(
            table(["setting", self.model_label, *names.values(), "values"], rows, indent="  ")
        )
        lines.append(
            "  (subject mean: mean of the subject's observed values of the channel; LOCF: last "
            "observation carried forward; linear: per-subject linear interpolation, beyond the "
            "last observation its least-squares trend)"
        )
        for setting in ("interpolation", "extrapolation"):
            e = r[setting]
            base = {n: e[k] for k, n in names.items() if e.get(k) is not None}
            lines.append(verdict(e["model"], base, setting))
        label = r.get("label", "label")
        title = label[:1].upper() + label[1:]
        if "auroc_model" in r:
            base = r.get("auroc_logistic_static")
            # An AUROC needs both classes among the test subjects: say so instead of "-".
            classes = r.get("test_label_classes")
            undefined = None
            if classes is not None and classes < 2:
                undefined = "undefined: test split has " + ("one class" if classes else "no labels")
            rows = [[f"{self.model_label} classification head", _or(r["auroc_model"], undefined)]]
            if r.get("static_names"):  # no row for a baseline without covariates
                names = ", ".join(r["static_names"])
                rows.append(
                    [f"logistic regression on baseline covariates ({names})", _or(base, undefined)]
                )
            lines.append(f"{title} AUROC on test subjects (higher is better):")
            lines.append(table(["model", "AUROC"], rows))
            if base is not None and r["auroc_model"] is not None:
                lines.append(
                    verdict(
                        r["auroc_model"],
                        {"the logistic regression": base},
                        label,
                        higher_better=True,
                    )  # fmt: skip
                )
        else:
            lines.append(
                f"{title} AUROC: classification head off (no 0/1 labels, or classify=false)."
            )
        lines.append(nfe_line(metrics))
        return "\n".join(lines)

    # -- plots ----------------------------------------------------------------------------
    def plot(self, model, plot_dir: Path):
        from ..plots import plot_subjects

        part = self.parts["test"]
        order = sorted(range(len(part)), key=lambda i: (-len(part[i]), str(part[i].id)))[:3]
        batch = self.batch("test", order)
        conds, _ = self.eval_masks["test"]["extrapolation"]
        cond = self._mask_tensor([conds[i] for i in order], batch)
        norm = self.normalizer
        # The most often observed channels that are not binary or ordinal (> 5 values), up to 4.
        counts = torch.stack([r.mask.sum(0) for r in part]).sum(0)
        distinct = [
            len(torch.unique(torch.cat([r.values[r.mask[:, c] > 0, c] for r in part])))
            for c in range(part.n_channels)
        ]
        chans = [c for c in torch.argsort(counts, descending=True).tolist() if distinct[c] > 5]
        chans = [(c, self.raw.channels[c]) for c in (chans or list(range(part.n_channels)))[:4]]
        t_last = batch.times.max(dim=1).values
        span = (t_last - batch.times[:, 0]).clamp_min(1e-3)
        Q = 80
        grid = torch.linspace(0, 1, Q, dtype=batch.times.dtype, device=batch.times.device)
        tq = batch.times[:, :1] + grid[None, :] * (span * 1.15)[:, None]
        with torch.no_grad():
            mean, std = self.predict(
                model, batch, cond, tq, self.opt["n_samples"], self.eval_generator()
            )
        scale = norm.scale.to(mean.dtype).to(mean.device)
        phys_mean = norm.inverse_transform(mean)
        phys_std = std * scale
        ts = norm.time_scale
        subjects = []
        for b, i in enumerate(order):
            rec = self.raw[self.raw.ids.index(part[i].id)]  # physical units
            n = len(rec)
            c_mask = cond[b, :n].cpu().numpy()
            obs, tgt = {}, {}
            for c, _ in chans:
                seen = rec.mask[:, c].numpy() > 0
                tt, yy = rec.times.numpy(), rec.values[:, c].numpy()
                obs[c] = (tt[seen & c_mask], yy[seen & c_mask])
                tgt[c] = (tt[seen & ~c_mask], yy[seen & ~c_mask])
            n_cond = int(c_mask.sum())
            subjects.append(
                {
                    "id": rec.id,
                    "t_split": float(rec.times[max(n_cond - 1, 0)]),
                    "obs": obs,
                    "target": tgt,
                    "curve": (
                        tq[b].double().cpu().numpy() * ts,
                        phys_mean[b].double().cpu().numpy(),
                        phys_std[b].double().cpu().numpy(),
                    ),
                }
            )
        band = self.band_label
        title = (
            f"{self.model_label}, held-out test subjects: first half of the observations given "
            "(to the dotted line), second half predicted"
        )
        return [
            plot_subjects(
                plot_dir / "test_subjects.png",
                subjects,
                chans,
                self.raw.time_unit,
                title=title,
                curve_label=self.curve_label,
                band_label=band,
            )
        ]
