"""Continuous normalising flows: neuralode's CNF vs torchdiffeq's ``examples/cnf.py`` formulation,
and RNODE-regularised vs unregularised training.

Part 1 (time per training iteration): one FFJORD training iteration (log-density of a batch by
one solve from t1 = 1 back to t0 = 0, mean NLL, backward, Adam step) of the same vector field
(``MLPVectorField(2, hidden=32, n_layers=3, softplus, time_dependent)``, float32, batch 256 of the
8-Gaussians density, exact trace by 2 vector-Jacobian products; and on 64-D dequantised digits,
hidden 128, batch 128, Hutchinson's trace with one Rademacher draw per solve), dopri5 at
rtol = atol = 1e-5, gradients by autograd through the solver, three ways:

- ``neuralode CNF``: :class:`neuralode.models.CNF` (state ``(z, Delta)``, :func:`neuralode.solve`);
- ``neuralode odeint``: torchdiffeq's formulation (a module returning ``(dz/dt, -trace)`` on the
  tuple state, trace by a loop of ``autograd.grad``) through ``neuralode.odeint``;
- ``torchdiffeq odeint``: the same module through ``torchdiffeq.odeint``.

Each starts from the same weights and sees the same batches; the three are interleaved
iteration by iteration and the median time per iteration over the run is reported with the
mean forward NFE (``--clock cpu``: process CPU time, steadier on a shared machine).

Part 2 (RNODE): ``--iters`` training iterations (Adam, ``--lr`` 1e-2) of the CNF on 8 Gaussians with and without the
regularisers ``{"kinetic": w, "jacobian": w}`` (``--reg-weight``, default 0.01, exact Frobenius
norm); reports the validation NLL (exact trace, 1,000 held-out points) every ``--every``
iterations, the forward NFE per iteration and the wall time.

Run ``python benchmarks/cnf.py`` (``--quick`` for 30 + 60 iterations, ``--tiny`` for a CI
smoke run). ``main(argv)`` returns
``{"speed": rows, "rnode": rows}``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import neuralode
from neuralode.models import CNF, MLPVectorField

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None

TOL = 1e-5


def eight_gaussians(n: int, rng: np.random.Generator) -> torch.Tensor:
    angle = rng.integers(0, 8, n) * (np.pi / 4)
    x = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.25 * rng.standard_normal((n, 2))
    return torch.as_tensor(x / 1.5, dtype=torch.float32)  # about unit scale


def std_normal_logpdf(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))


class TorchdiffeqStyle(nn.Module):
    """torchdiffeq's examples/cnf.py structure: ``forward(t, (z, logp)) -> (dz/dt, -trace)``,
    the trace by one ``autograd.grad`` per dimension, or FFJORD's Hutchinson estimate with the
    noise ``self.e`` fixed for the solve when it is set; counts its evaluations."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.nfe = 0
        self.e = None

    def forward(self, t, states):
        z = states[0]
        self.nfe += 1
        with torch.set_grad_enabled(True):
            z.requires_grad_(True)
            dz = self.field(t, z)
            if self.e is not None:
                v = torch.autograd.grad(dz, z, self.e, create_graph=True)[0]
                return dz, -(v * self.e).sum(1, keepdim=True)
            trace = torch.zeros(z.shape[0], dtype=z.dtype)
            for i in range(z.shape[1]):
                trace = trace + torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i]
        return dz, -trace.view(-1, 1)


def make_field(seed: int, dim: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    hidden = 32 if dim == 2 else 128
    return MLPVectorField(
        dim, hidden=hidden, n_layers=3, activation="softplus", time_dependent=True
    )


def digits(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Dequantised, standardised 8x8 digits (64-D), ``n`` drawn with replacement."""
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float64)
    X = X[rng.integers(0, len(X), n)] + rng.random((n, 64))
    return torch.as_tensor((X - 7.0) / 6.0, dtype=torch.float32)


def _clock(kind: str):
    return time.process_time if kind == "cpu" else time.perf_counter


def speed(iters: int, batch: int, seed: int, clock: str, data: str = "8gaussians") -> list[dict]:
    rng = np.random.default_rng(seed)
    sample = eight_gaussians if data == "8gaussians" else digits
    batches = [sample(batch, rng) for _ in range(iters)]
    dim = batches[0].shape[1]
    hutch = dim > 2  # FFJORD's choice: Hutchinson beyond a few dimensions
    t = torch.tensor([1.0, 0.0])
    now = _clock(clock)
    runs = {}

    def cnf_step(state, x):
        out = state["model"].loss(x)
        out.loss.backward()
        return out.nfe

    def odeint_step(odeint):
        def step(state, x):
            func = state["model"]
            func.nfe = 0
            if hutch:  # one Rademacher draw per solve, as CNF(trace="hutchinson")
                func.e = torch.randint(0, 2, x.shape).to(x.dtype).mul_(2).sub_(1)
            logp = torch.zeros(x.shape[0], 1)
            z_t, logp_t = odeint(func, (x, logp), t, rtol=TOL, atol=TOL, method="dopri5")
            loss = -(std_normal_logpdf(z_t[-1]) - logp_t[-1].view(-1)).mean()
            loss.backward()
            return func.nfe

        return step

    trace = "hutchinson" if hutch else "exact"
    runs["neuralode CNF"] = (
        CNF(make_field(seed, dim), trace=trace, rtol=TOL, atol=TOL),
        cnf_step,
    )
    runs["neuralode odeint"] = (
        TorchdiffeqStyle(make_field(seed, dim)),
        odeint_step(neuralode.odeint),
    )
    if torchdiffeq is not None:
        runs["torchdiffeq odeint"] = (
            TorchdiffeqStyle(make_field(seed, dim)),
            odeint_step(torchdiffeq.odeint),
        )
    state = {}
    for name, (model, step) in runs.items():
        state[name] = {
            "model": model,
            "step": step,
            "opt": torch.optim.Adam(model.parameters(), lr=1e-3),
            "times": [],
            "nfe": [],
        }
    for x in batches:
        for st in state.values():
            st["opt"].zero_grad()
            t0 = now()
            nfe = st["step"](st, x)
            st["opt"].step()
            st["times"].append(now() - t0)
            st["nfe"].append(nfe)
    rows = []
    for name, st in state.items():
        rows.append(
            {
                "lib": name,
                "time_per_iter": statistics.median(st["times"][1:] or st["times"]),
                "nfe_forward": float(np.mean(st["nfe"])),
            }
        )
    return rows


def rnode(iters: int, batch: int, seed: int, weight: float, every: int, clock: str, lr: float):
    rng = np.random.default_rng(seed + 1)
    val = eight_gaussians(1000, rng)
    batches = [eight_gaussians(batch, rng) for _ in range(iters)]
    now = _clock(clock)
    rows = []
    for label, regs in (
        ("unregularised", None),
        ("RNODE", {"kinetic": weight, "jacobian": weight}),
    ):
        model = CNF(make_field(seed), rtol=TOL, atol=TOL, regularizers=regs)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        wall, nfes, curve = 0.0, [], []
        for i, x in enumerate(batches, 1):
            t0 = now()
            opt.zero_grad()
            out = model.loss(x)
            out.loss.backward()
            opt.step()
            wall += now() - t0
            nfes.append(out.nfe)
            if i % every == 0 or i == iters:
                with torch.no_grad():
                    v = -model.log_prob(val).mean().item()
                curve.append((i, v, float(np.mean(nfes[-every:])), wall))
        rows.append({"run": label, "curve": curve, "nfe_mean": float(np.mean(nfes)), "wall": wall})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=1000, help="RNODE training iterations")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the RNODE runs")
    p.add_argument("--speed-iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="CI smoke run: a few iterations, batch 32")
    p.add_argument("--skip-rnode", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.iters, a.speed_iters, a.every = 60, 30, 20
    if a.tiny:
        a.iters, a.speed_iters, a.every, a.batch = 4, 3, 2, 32
    torch.set_num_threads(1)
    print(
        f"# CNF benchmark: torch {torch.__version__}, "
        f"torchdiffeq {getattr(torchdiffeq, '__version__', 'absent')}, "
        f"{platform.processor() or platform.machine()}, 1 thread, clock {a.clock}"
    )
    out = {"speed": [], "rnode": []}
    for data in ("8gaussians", "digits"):
        if data == "digits" and a.skip_digits:
            continue
        batch = a.batch if data == "8gaussians" else a.batch // 2
        rows = speed(a.speed_iters, batch, a.seed, a.clock, data)
        for r in rows:
            r["data"] = data
        out["speed"] += rows
        base = next((r for r in rows if r["lib"] == "torchdiffeq odeint"), None)
        what = "2-D, exact trace" if data == "8gaussians" else "digits 64-D, Hutchinson trace"
        print(f"\n## Time per training iteration ({what}, batch {batch}, dopri5, tol {TOL:g})")
        print("| implementation | time / iter (ms) | forward NFE | vs torchdiffeq |")
        print("|---|---:|---:|---:|")
        for r in rows:
            ratio = base["time_per_iter"] / r["time_per_iter"] if base else float("nan")
            print(
                f"| {r['lib']} | {1e3 * r['time_per_iter']:.1f} | {r['nfe_forward']:.1f} | "
                f"{ratio:.2f}x |"
            )
    if not a.skip_rnode:
        rn = rnode(a.iters, a.batch, a.seed, a.reg_weight, a.every, a.clock, a.lr)
        out["rnode"] = rn
        print(f"\n## RNODE (kinetic = jacobian = {a.reg_weight:g}) vs unregularised, 8 Gaussians")
        print("| run | iteration | val NLL (nats) | forward NFE / iter | time (s) |")
        print("|---|---:|---:|---:|---:|")
        for r in rn:
            for it, v, nfe, wall in r["curve"]:
                print(f"| {r['run']} | {it} | {v:.3f} | {nfe:.1f} | {wall:.1f} |")
        u, g = rn
        print(
            f"\nmean forward NFE per iteration: unregularised {u['nfe_mean']:.1f}, RNODE "
            f"{g['nfe_mean']:.1f} ({u['nfe_mean'] / g['nfe_mean']:.2f}x fewer); training time "
            f"{u['wall']:.1f} s vs {g['wall']:.1f} s"
        )
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
