"""Compiled stepping with per-sample control: ``compile=True`` against the eager drivers.

The problem of ``per_sample.py`` (a batch of MLP fields ``y' = W2 tanh(W1 y + b1) + b2``, d = 2,
hidden 64, every sample over its own span ``[0, T_b]``, ``T_b`` log-uniform in ``[0.1, 5]``, 11
output times each; dopri5 at ``rtol = atol = tol``), solved four ways:

- ``eager per-sample``: ``batch_control="per_sample"`` (the masked per-row driver, with
  compaction of finished samples);
- ``compiled per-sample``: the same with ``compile=True`` (the per-row step compiled, 8 steps
  per call; finished samples take steps of length zero, no compaction);
- ``eager shared`` / ``compiled shared``: one step size for the batch, the 2-D ``t``.

Columns: wall time of a solve (``--clock cpu``: process CPU time; median of the repeats after
the first call, forward under
no_grad, the modes interleaved), the first call's wall time (compilation included;
torch.compile's on-disk cache shortens it in later processes), NFE, the worst error at the output times against
scipy's DOP853 at rtol = atol = 1e-12, the worst difference from the eager solve of the same
control, and the wall-time ratio eager / compiled.

``--training``: a training step instead (forward and backward of a mean-squared loss against
the scipy reference, w.r.t. y0 and the MLP's parameters, func an ``nn.Module``) under
per-sample control with ``gradient="backsolve"`` and ``"checkpoint"``, each eagerly and with
``compile=True`` (Backsolve: the forward and the adjoint solve compiled, the adjoint stopping
at every output, where eagerly ``"auto"`` replays some samples' forward steps; Checkpointed:
the forward compiled, recording its steps, and the eager per-sample replay). Columns as above
(NFE: forward + backward; max diff: of the y0 gradient from the eager one).

Run ``python benchmarks/per_sample_compiled.py`` (``--quick``: one tolerance, 3 repeats;
``--batch N``, ``--dtype float32``). ``main(argv)`` returns the rows (dicts with keys mode, tol,
wall, first, nfe, err, diff).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import per_sample  # noqa: E402

import neuralode  # noqa: E402

MODES = {
    "eager per-sample": dict(batch_control="per_sample", compile=False),
    "compiled per-sample": dict(batch_control="per_sample", compile=True),
    "eager shared": dict(batch_control="shared", compile=False),
    "compiled shared": dict(batch_control="shared", compile=True),
}


def solve(prob, tol, mode):
    return neuralode.solve(
        prob["f"], prob["y0"], prob["t"], rtol=tol, atol=tol, dense_output=False, **MODES[mode]
    )


def measure(prob, tol: float, repeats: int, ref, clock=time.perf_counter) -> list[dict]:
    first, times, sols = {}, {m: [] for m in MODES}, {}
    with torch.no_grad():
        for mode in MODES:  # the first call compiles (wall time: compilation runs in workers)
            start = time.perf_counter()
            sols[mode] = solve(prob, tol, mode)
            first[mode] = time.perf_counter() - start
        for _ in range(repeats):
            for mode in MODES:
                start = clock()
                sols[mode] = solve(prob, tol, mode)
                times[mode].append(clock() - start)
    rows = []
    for mode in MODES:
        sol = sols[mode]
        if sol.stats.get("compiled") is False:
            raise RuntimeError(f"{mode}: the solve ran eagerly (compiled code mismatch)")
        diff = float((sol.ys - sols[mode.replace("compiled", "eager")].ys).abs().max())
        err = float((sol.ys.double() - ref).abs().max()) if ref is not None else math.nan
        rows.append(dict(mode=mode, tol=tol, wall=statistics.median(times[mode]),
                         first=first[mode], nfe=sol.stats["nfe"], err=err, diff=diff))  # fmt: skip
    return rows


TRAINING = {
    f"{engine} per-sample {grad}": dict(batch_control="per_sample", compile=engine == "compiled",
                                        gradient=grad)
    for grad in ("backsolve", "checkpoint")
    for engine in ("eager", "compiled")
}  # fmt: skip


class MLP(torch.nn.Module):
    """The problem's field as a module (its weights are the parameters of the gradient)."""

    def __init__(self, prob):
        super().__init__()
        d, hidden, dtype = prob["d"], prob["hidden"], prob["y0"].dtype
        gen = torch.Generator().manual_seed(1)
        self.l1 = torch.nn.Linear(d, hidden, dtype=dtype)
        self.l2 = torch.nn.Linear(hidden, d, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.7)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


def training_step(model, prob, target, tol, mode):
    y0 = prob["y0"].clone().requires_grad_()
    sol = neuralode.solve(model, y0, prob["t"], rtol=tol, atol=tol, **TRAINING[mode])
    loss = (sol.ys - target).square().mean()
    grads = torch.autograd.grad(loss, [y0, *model.parameters()])
    return sol, grads


def measure_training(prob, tol: float, repeats: int, ref, clock=time.perf_counter) -> list[dict]:
    model = MLP(prob)
    target = (ref if ref is not None else prob["y0"].expand(prob["t"].shape[1], -1, -1)).to(
        prob["y0"].dtype
    )
    first, times, res = {}, {m: [] for m in TRAINING}, {}
    for mode in TRAINING:  # the first call compiles
        start = time.perf_counter()
        res[mode] = training_step(model, prob, target, tol, mode)
        first[mode] = time.perf_counter() - start
    for _ in range(repeats):
        for mode in TRAINING:
            start = clock()
            res[mode] = training_step(model, prob, target, tol, mode)
            times[mode].append(clock() - start)
    rows = []
    for mode in TRAINING:
        sol, grads = res[mode]
        if sol.stats.get("compiled") is False:
            raise RuntimeError(f"{mode}: the solve ran eagerly (compiled code mismatch)")
        eager = res[mode.replace("compiled", "eager")][1]
        diff = float((grads[0] - eager[0]).abs().max())
        nfe = sol.stats["nfe"] + sol.stats.get("nfe_backward", 0)
        rows.append(dict(mode=mode, tol=tol, wall=statistics.median(times[mode]),
                         first=first[mode], nfe=nfe, err=math.nan, diff=diff))  # fmt: skip
    return rows


def print_table(rows, out=sys.stdout) -> None:
    print("| tol | mode | wall | first call | NFE | max error | max diff from eager | "
          "eager / compiled |", file=out)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|", file=out)
    walls = {(r["tol"], r["mode"]): r["wall"] for r in rows}
    for r in rows:
        eager = walls[(r["tol"], r["mode"].replace("compiled", "eager"))]
        ratio = f"{eager / r['wall']:.2f}x" if r["mode"].startswith("compiled") else ""
        print(
            f"| {r['tol']:.0e} | {r['mode']} | {r['wall'] * 1e3:.1f} ms | {r['first']:.1f} s | "
            f"{r['nfe']} | {r['err']:.1e} | {r['diff']:.1e} | {ratio} |",
            file=out,
        )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tolerance, 3 repeats")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--tols", type=float, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--training", action="store_true", help="a training step with Backsolve/Checkpointed"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (steadier on a loaded machine)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    tols = args.tols or ([1e-6] if args.quick else [1e-4, 1e-6])
    repeats = args.repeats or (3 if args.quick else 5)
    prob = per_sample.make_problem(2, 64, args.batch, 0, getattr(torch, args.dtype))
    ref = per_sample.reference(prob)
    what = "training step (backsolve, checkpoint)" if args.training else "solve"
    print(
        f"# compile=True with per-sample control, {what}: MLP d=2, hidden 64, batch {args.batch}, spans "
        f"log-uniform in [0.1, 5], dopri5, {args.dtype}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), {args.clock} "
        f"clock, median of {repeats} interleaved repeats\n"
    )
    rows = []
    for tol in tols:
        rows.extend(
            (measure_training if args.training else measure)(prob, tol, repeats, ref, clock)
        )
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
