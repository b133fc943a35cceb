"""Per-sample step control: neuralode per-sample vs neuralode shared-step vs torchode.

A batch of 256 samples of the MLP vector field ``y' = W2 tanh(W1 y + b1) + b2`` (d = 2, hidden
64; ``--d 64`` for d = 64, hidden 128), every sample over its own time span ``[0, T_b]`` with
``T_b`` log-uniform in ``[0.1, 5]`` (11 output times per sample), so samples need very different
numbers of steps. Compared, with dopri5 at ``rtol = atol = tol``:

- ``neuralode per-sample``: ``neuralode.solve(..., batch_control="per_sample")``, every sample
  its own steps; finished samples are dropped from the working set.
- ``neuralode shared``: ``neuralode.solve(...)`` with the 2-D ``t``: one step size for the batch
  (RMS error norm over all of it), integrated up to the longest span.
- ``torchode``: ``AutoDiffAdjoint(Dopri5, IntegralController)``, per-sample steps, every sample
  evaluated until the last one finishes.

Columns: wall time (median of the repeats after a warm-up, the libraries interleaved, forward
solves under no_grad; ``--clock cpu`` for process CPU time on a loaded machine), NFE
(calls of the vector field), sample-evaluations (rows passed to the vector field, summed over
calls), the share of them spent on samples that had already finished (neuralode per-sample:
counted exactly; shared and torchode: per-sample step attempts after the sample's final time,
over all step attempts), and the worst error at the output times against scipy's DOP853 at
rtol = atol = 1e-12.

Run ``python benchmarks/per_sample.py`` (add ``--quick`` for one tolerance and one repeat,
``--tiny`` for a CI smoke run: batch 32, tolerance 1e-4, one repeat). ``main(argv)`` returns the
rows (dicts with keys lib, tol, wall, nfe, rows, waste, err).
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

import neuralode

try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None
try:
    from scipy.integrate import solve_ivp
except ImportError:  # pragma: no cover
    solve_ivp = None


def make_problem(d: int, hidden: int, batch: int, seed: int, dtype: torch.dtype, n_out: int = 11):
    """Seeded MLP field (Jacobian norm ~2-3, as in work_precision.py) and per-sample spans."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w1 = torch.randn(hidden, d, generator=gen, dtype=f64) * 1.5 / math.sqrt(d)
    b1 = torch.randn(hidden, generator=gen, dtype=f64) * 0.5
    w2 = torch.randn(d, hidden, generator=gen, dtype=f64) * 1.5 / math.sqrt(hidden)
    b2 = torch.randn(d, generator=gen, dtype=f64) * 0.5
    y0 = torch.randn(batch, d, generator=gen, dtype=f64)
    u = torch.rand(batch, generator=gen, dtype=f64)
    span = torch.exp(math.log(0.1) + u * (math.log(5.0) - math.log(0.1)))
    t = span[:, None] * torch.linspace(0.0, 1.0, n_out, dtype=f64)[None]
    w1t, b1t, w2t, b2t = (x.to(dtype) for x in (w1, b1, w2, b2))

    def f(t, y):
        return torch.addmm(b2t, torch.tanh(torch.addmm(b1t, y, w1t.T)), w2t.T)

    def f_numpy(t, y):
        y = y.reshape(batch, d)
        return (np.tanh(y @ w1.numpy().T + b1.numpy()) @ w2.numpy().T + b2.numpy()).reshape(-1)

    return dict(f=f, f_numpy=f_numpy, y0=y0.to(dtype), t=t, span=span, d=d, hidden=hidden)


def reference(prob) -> torch.Tensor | None:
    """(T, B, d) at every sample's output times: scipy DOP853, rtol = atol = 1e-12."""
    if solve_ivp is None:
        return None
    y0, t = prob["y0"].double().numpy(), prob["t"]
    B, d = y0.shape
    sol = solve_ivp(
        prob["f_numpy"], (0.0, float(t.max())), y0.reshape(-1), "DOP853", rtol=1e-12, atol=1e-12,
        dense_output=True,
    )  # fmt: skip
    ys = sol.sol(t.reshape(-1).numpy()).T.reshape(B, t.shape[1], B, d)
    return torch.from_numpy(ys[np.arange(B), :, np.arange(B)]).transpose(0, 1)  # (T, B, d)


class Counter:
    """Counts calls of the vector field and the rows passed to it."""

    def __init__(self, f):
        self.f, self.n, self.rows = f, 0, 0

    def __call__(self, t, y):
        self.n += 1
        self.rows += y.shape[0]
        return self.f(t, y)


def run_per_sample(prob, tol):
    f = Counter(prob["f"])
    sol = neuralode.solve(
        f, prob["y0"], prob["t"], rtol=tol, atol=tol, batch_control="per_sample",
        dense_output=False,
    )  # fmt: skip
    return sol.ys, f.n, f.rows, lambda: sol.stats["wasted_share"]


def run_shared(prob, tol):
    f = Counter(prob["f"])
    sol = neuralode.solve(f, prob["y0"], prob["t"], rtol=tol, atol=tol, dense_output=False)

    def waste():  # step attempts after each sample's end, from a rerun that keeps the steps
        steps = neuralode.solve(prob["f"], prob["y0"], prob["t"], rtol=tol, atol=tol).step_times
        starts = torch.tensor(steps[:-1], dtype=torch.float64)
        after = (starts[None, :] >= prob["span"][:, None]).sum()
        return float(after) / (len(starts) * prob["span"].numel())

    return sol.ys, f.n, f.rows, waste


def run_torchode(prob, tol):
    f = Counter(prob["f"])
    term = torchode.ODETerm(f)
    step = torchode.Dopri5(term=term)
    ctrl = torchode.IntegralController(atol=tol, rtol=tol, term=term)
    solver = torchode.AutoDiffAdjoint(step, ctrl)
    t_eval = prob["t"].to(prob["y0"].dtype)
    sol = solver.solve(torchode.InitialValueProblem(y0=prob["y0"], t_eval=t_eval))
    if not bool((sol.status == 0).all()):
        raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")

    def waste():  # every sample is evaluated until the slowest one is done
        n = sol.stats["n_steps"].double()
        return float(1.0 - n.sum() / (n.numel() * n.max()))

    return sol.ys.transpose(0, 1), f.n, f.rows, waste


LIBRARIES = {
    "neuralode per-sample": run_per_sample,
    "neuralode shared": run_shared,
    "torchode": run_torchode,
}


def measure(prob, tol: float, repeats: int, ref, clock) -> list[dict]:
    """All libraries at one tolerance; the repeats are interleaved (one run of each library in
    turn) so that a change in machine load affects them alike."""
    libs = [lib for lib in LIBRARIES if not (lib == "torchode" and torchode is None)]
    times = {lib: [] for lib in libs}
    out = {}
    with torch.no_grad():
        for lib in libs:
            LIBRARIES[lib](prob, tol)  # warm-up
        for _ in range(repeats):
            for lib in libs:
                start = clock()
                out[lib] = LIBRARIES[lib](prob, tol)
                times[lib].append(clock() - start)
    rows = []
    for lib in libs:
        ys, nfe, n_rows, waste = out[lib]
        err = float((ys.double() - ref).abs().max()) if ref is not None else math.nan
        rows.append(dict(lib=lib, tol=tol, wall=statistics.median(times[lib]), nfe=nfe,
                         rows=n_rows, waste=waste(), err=err))  # fmt: skip
    return rows


def print_table(rows, out=sys.stdout) -> None:
    print(
        "| tol | library | wall | NFE | sample-evals | finished-sample share | max error | wall / per-sample |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|", file=out)  # fmt: skip
    base = {r["tol"]: r["wall"] for r in rows if r["lib"] == "neuralode per-sample"}
    for r in rows:
        ratio = r["wall"] / base[r["tol"]] if r["tol"] in base else math.nan
        print(
            f"| {r['tol']:.0e} | {r['lib']} | {r['wall'] * 1e3:.1f} ms | {r['nfe']} | "
            f"{r['rows']} | {100 * r['waste']:.1f}% | {r['err']:.1e} | {ratio:.2f} |",
            file=out,
        )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tolerance, one repeat")
    parser.add_argument(
        "--tiny", action="store_true", help="CI smoke run: batch 32, tolerance 1e-4, one repeat"
    )
    parser.add_argument("--d", type=int, choices=[2, 64], default=2, help="state dimension")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--tols", type=float, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (perf_counter) or this process's CPU time (process_time: steadier on a "
        "loaded machine; equal to wall time with --threads 1 on an idle one)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 32 if args.tiny else 256
    tols = args.tols or ([1e-4] if args.tiny else [1e-6] if args.quick else [1e-4, 1e-6, 1e-8])
    repeats = args.repeats or (1 if args.quick or args.tiny else 5)
    hidden = 64 if args.d == 2 else 128
    prob = make_problem(args.d, hidden, args.batch, 0, getattr(torch, args.dtype))
    ref = reference(prob)
    print(
        f"# Per-sample step control: MLP d={args.d}, hidden {hidden}, batch {args.batch}, spans "
        f"log-uniform in [0.1, 5], dopri5, {args.dtype}; neuralode {neuralode.__version__}, "
        f"torchode {getattr(torchode, '__version__', 'missing')}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {args.clock} "
        f"clock, median of {repeats} interleaved repeats\n"
    )
    rows = []
    for tol in tols:
        rows.extend(measure(prob, tol, repeats, ref, clock))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
