"""How far the eager engine is from its floor (issue #12: training step, forward overhead).

- **Training step** of the spiral neural ODE of ``training.py`` (MLP 2-50-2 tanh on ``y**3``,
  batch 16, 10 outputs, dopri5 rtol = atol = 1e-6, float32, forward + backward of an MSE
  loss): ``neuralode.odeint`` and ``torchdiffeq.odeint`` against a *hand-written* dopri5 loop
  that takes exactly neuralode's accepted steps (read from its dense output) with the least
  bookkeeping eager PyTorch allows: stages as one ``add``/``stack`` + ``addmv`` each, the
  error norm and its host read per step without a graph, outputs interpolated with the
  method's own continuous extension; no input validation, no initial step selection (its one
  evaluation is still made), no controller. ``torchdiffeq / hand-written`` is the most the
  engine's ``odeint`` could reach against torchdiffeq with this formulation of a step.
- **Forward overhead** ``time / (NFE x t_f)`` of ``neuralode.solve`` at tolerance 1e-6 on the
  batch-256 MLPs of ``work_precision.py`` (as ``run_all.py`` computes it: the median solve time
  under ``no_grad`` over NFE times the best-of-7 time of one call of the vector field alone).

Times are medians of interleaved repeats after a warm-up. ``main(argv)`` returns the rows
(dicts ``name, ms, ratio, note``); ``--tiny`` is a CI smoke run (no numbers).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import neuralode
from neuralode.solvers import get_tableau

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None

import training
import work_precision as wp


def hand_written(func, y0, t, steps):
    """dopri5 over the accepted ``steps`` [(t, t_new), ...], minimal eager bookkeeping."""
    tab = get_tableau("dopri5")
    T = tab.tensors(y0.dtype, y0.device)
    rows = [T["a"][i, :i] for i in range(7)]
    single = [[(j, w) for j, w in enumerate(r) if w != 0.0] for r in tab.a]
    b_err, c, out_t = T["b_err"][0], tab.c, t.tolist()
    n = y0.numel()
    y = y0.reshape(-1)
    f = lambda s, x: func(torch.scalar_tensor(s), x.view(y0.shape)).reshape(-1)  # noqa: E731
    k1 = f(out_t[0], y)
    with torch.no_grad():  # the initial step selection's evaluation (part of the NFE)
        f(out_t[0], y + 1e-3 * k1)
    outs = [y0.unsqueeze(0)]
    for t_a, t_b in steps:
        h = t_b - t_a
        ks = [k1]
        for i in range(1, 7):
            if len(single[i]) == 1:
                j, w = single[i][0]
                yi = torch.add(y, ks[j], alpha=h * w)
            else:
                yi = torch.addmv(y, torch.stack(ks, 1), rows[i], alpha=h)
            ks.append(f(t_b if c[i] == 1.0 else t_a + c[i] * h, yi))
        K = torch.stack(ks)
        KT = K.detach().T
        err = torch.addmv(KT[:, 0], KT, b_err, beta=0, alpha=h)
        scale = torch.maximum(y.detach().abs(), yi.detach().abs()).mul_(1e-6).add_(1e-6)
        float(torch.linalg.vector_norm(err.div_(scale))) / n**0.5  # the step's host read
        theta = [(s - t_a) / h for s in out_t if t_a < s <= t_b]
        if theta:
            W = tab.interpolant_weights(torch.tensor(theta, dtype=torch.float64), y0.dtype)
            vals = torch.addmm(y.unsqueeze(0), W, K, alpha=h)
            outs.append(vals.view(len(theta), *y0.shape))
        y, k1 = yi, ks[-1]
    return torch.cat(outs)


def training_floor_rows(repeats: int, clock) -> list[dict]:
    func = training.Spiral()
    y0, t, target = training.spiral_data()
    tol = dict(rtol=1e-6, atol=1e-6)
    steps = neuralode.solve(func, y0, t, **tol).step_times
    steps = list(zip(steps[:-1], steps[1:]))
    with torch.no_grad():
        ref = neuralode.odeint(func, y0, t, method="dopri5", **tol)
        gap = float((hand_written(func, y0, t, steps) - ref).abs().max())

    def step(solve):
        def run():
            func.zero_grad()
            ((solve() - target) ** 2).mean().backward()

        return run

    fns = {
        "neuralode odeint": step(lambda: neuralode.odeint(func, y0, t, method="dopri5", **tol)),
        "hand-written dopri5 loop": step(lambda: hand_written(func, y0, t, steps)),
    }
    if torchdiffeq is not None:
        fns["torchdiffeq odeint"] = step(
            lambda: torchdiffeq.odeint(func, y0, t, method="dopri5", **tol)
        )
    med = training._median_interleaved(fns, repeats, clock)
    peer = med.get("torchdiffeq odeint")
    note = f"{len(steps)} steps; hand-written vs neuralode values within {gap:.0e}"
    return [
        dict(name=f"training step: {k}", ms=1e3 * s, ratio=None if peer is None else peer / s,
             note=note if k.startswith("hand") else "")
        for k, s in med.items()
    ]  # fmt: skip


def overhead_rows(repeats: int, clock, problems, dtypes) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name in problems:
            prob = wp.make_problems(dtype)[name]()
            prob.measure_f_cost(dtype, clock)
            t_f = prob.f_cost["torch"]
            y0 = torch.tensor(prob.y0, dtype=dtype)
            t = torch.tensor(prob.t, dtype=torch.float64)
            with torch.no_grad():
                _, nfe = wp.run_neuralode(prob, "dopri5", 1e-6, y0, t)
                fn = functools.partial(wp.run_neuralode, prob, "dopri5", 1e-6, y0, t)
                s = training._median_interleaved({"solve": fn}, repeats, clock)["solve"]
            rows.append(dict(name=f"overhead: {name} {dtype_name}", ms=1e3 * s,
                             ratio=s / (nfe * t_f), note=f"NFE {nfe}, t_f {t_f * 1e6:.0f} us"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CI smoke run (one repeat)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    repeats = args.repeats or (1 if args.tiny else 40)
    rows = training_floor_rows(repeats, clock)
    problems = ["mlp_d2"] if args.tiny else ["mlp_d2", "mlp_d64"]
    dtypes = ["float32"] if args.tiny else ["float64", "float32"]
    rows += overhead_rows(1 if args.tiny else max(repeats // 2, 5), clock, problems, dtypes)
    training.print_rows(rows)
    return rows


if __name__ == "__main__":
    main()
