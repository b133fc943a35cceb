"""Backsolve's backward cost against the number of output times: per-sample vs shared control.

The backsolve adjoint's backward solve must let the adjoint jump at every output time. Under
both ``batch_control`` settings it runs as one continuous solve per sample (per-sample: on the
per-sample driver) that lands on its stops without restarting step-size control, and with many
outputs (``outputs="auto"`` picks it when the outputs inside forward steps outnumber the
steps, per sample 2.5 times the steps holding them) it stops only at the forward steps holding outputs and replays them: its cost should
not grow with ``len(t)``.

Workloads (float64, dopri5 at rtol = 1e-6, atol = 1e-9, the loss a fixed random weighting of
all outputs):

- ``oscillator``: ``y' = [[0, w], [-w, -c]] y`` with parameters ``w = 1, c = 0.1``, batch 2,
  ``t`` in [0, 10];
- ``mlp``: the MLP field of ``per_sample.py`` (d = 2, hidden 64), batch 32, every sample over
  its own span ``[0, T_b]`` (2-D ``t``, ``T_b`` log-uniform in [0.1, 5]).

Columns: backward NFE (calls of the vector field in the backward pass, replays included; per-
sample and shared count calls alike, one call evaluating all rows passed), the share of them
spent replaying forward steps, the backward mode chosen, the wall time of forward + backward
(median of the repeats, after a warm-up; ``--clock cpu`` for process CPU time), and the
relative error of the gradients (parameters and ``y0``) against Direct at rtol = atol = 1e-12.

Run ``python benchmarks/backsolve_outputs.py`` (``--tiny``: a CI smoke run, two sizes, one
repeat). ``main(argv)`` returns the rows (dicts with keys problem, control, n_t, nfe_backward,
replay_share, mode, wall, err).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import neuralode

D = torch.float64


class Oscillator(torch.nn.Module):
    """A damped linear oscillator with trainable frequency and damping."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=D))

    def forward(self, t, y):
        return torch.stack([self.w * y[:, 1], -self.w * y[:, 0] - self.c * y[:, 1]], 1)


class MLP(torch.nn.Module):
    """``W2 tanh(W1 y + b1) + b2`` (d = 2, hidden 64), seeded as in ``per_sample.py``."""

    def __init__(self, d=2, hidden=64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(d, hidden, dtype=D)
        self.l2 = torch.nn.Linear(hidden, d, dtype=D)
        with torch.no_grad():
            self.l1.weight.copy_(torch.randn(hidden, d, generator=gen, dtype=D) * 1.5 / d**0.5)
            self.l1.bias.copy_(torch.randn(hidden, generator=gen, dtype=D) * 0.5)
            self.l2.weight.copy_(torch.randn(d, hidden, generator=gen, dtype=D) * 1.5 / hidden**0.5)
            self.l2.bias.copy_(torch.randn(d, generator=gen, dtype=D) * 0.5)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def problem(name: str, n_t: int):
    """``(module, y0, t)`` of a workload with ``n_t`` output times per sample."""
    gen = torch.Generator().manual_seed(1)
    if name == "oscillator":
        y0 = torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=D)
        return Oscillator(), y0, torch.linspace(0.0, 10.0, n_t, dtype=D)
    B = 32
    y0 = torch.randn(B, 2, generator=gen, dtype=D)
    u = torch.rand(B, generator=gen, dtype=D)
    span = torch.exp(math.log(0.1) + u * (math.log(5.0) - math.log(0.1)))
    return MLP(), y0, span[:, None] * torch.linspace(0.0, 1.0, n_t, dtype=D)[None]


def gradients(name: str, n_t: int, control: str, gradient, tol: dict):
    """Forward and backward once: the gradients (flat) and the solution's stats."""
    f, y0, t = problem(name, n_t)
    y0 = y0.clone().requires_grad_()
    w = torch.randn(n_t, *y0.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    sol = neuralode.solve(f, y0, t, gradient=gradient, batch_control=control, **tol)
    (sol.ys * w).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in f.parameters()] + [y0.grad.reshape(-1)])
    return grads, sol.stats


def measure(name: str, n_t: int, control: str, repeats: int, clock) -> dict:
    tol = dict(rtol=1e-6, atol=1e-9)
    ref, _ = gradients(name, n_t, control, "direct", dict(rtol=1e-12, atol=1e-12))
    got, stats = gradients(name, n_t, control, "backsolve", tol)  # (also the warm-up)
    times = []
    for _ in range(repeats):
        start = clock()
        gradients(name, n_t, control, "backsolve", tol)
        times.append(clock() - start)
    nfe = stats["nfe_backward"]
    return dict(
        problem=name, control=control, n_t=n_t, nfe_backward=nfe,
        replay_share=stats.get("nfe_backward_replay", 0) / max(nfe, 1),
        mode=stats.get("backsolve_outputs"), wall=statistics.median(times),
        err=float((got - ref).norm() / ref.norm()),
    )  # fmt: skip


def print_table(rows, out=sys.stdout) -> None:
    print("| problem | control | len(t) | backward NFE | replay share | mode | wall (fwd+bwd) "
          "| rel. error |", file=out)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        print(
            f"| {r['problem']} | {r['control']} | {r['n_t']} | {r['nfe_backward']} | "
            f"{100 * r['replay_share']:.0f}% | {r['mode']} | {r['wall'] * 1e3:.1f} ms | "
            f"{r['err']:.1e} |",
            file=out,
        )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CI smoke run: 2 sizes, 1 repeat")
    parser.add_argument("--problems", nargs="+", default=["oscillator", "mlp"],
                        choices=["oscillator", "mlp"])  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 10, 100, 400])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, repeats = ([2, 20], 1) if args.tiny else (args.sizes, args.repeats)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = [
        measure(name, n_t, control, repeats, clock)
        for name in args.problems
        for n_t in sizes
        for control in ("per_sample", "shared")
    ]
    print(f"torch {torch.__version__}, {args.threads} thread(s), clock {args.clock}\n")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
