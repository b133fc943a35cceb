"""Training-step and sampling-loop benchmarks of issue #12, side by side with the peers.

- **Training step** of a spiral-style neural ODE: 2-D state, MLP 2-50-2 (tanh) applied to
  ``y**3``, batch 16, 10 output times, dopri5 at rtol = atol = 1e-6, float32; one step is the
  forward solve plus the backward pass of an MSE loss. Rows: ``neuralode.odeint`` and
  ``odeint_adjoint`` against torchdiffeq's, and ``neuralode.solve(..., compile=True)`` with
  Direct gradients (autograd through the compiled chunks; against torchdiffeq's ``odeint``) and
  with ``gradient="backsolve"`` (forward and adjoint solve compiled; against torchdiffeq's
  ``odeint_adjoint``); their compilation time, over the first two calls, reported separately.
- **Fixed-step sampling loop** (flow matching): Euler, 50 steps, batch 256, a time-conditioned
  MLP (d = 2, hidden 64, SiLU), under ``no_grad``: ``neuralode.odeint(method="euler")`` and
  torchdiffeq's against a hand-written ``for`` loop; with compilation on, also
  ``neuralode.solve(..., solver="euler", compile=True)`` and, for a fair comparison, the
  hand-written loop compiled by ``torch.compile`` (compilation times in the notes).

Times are medians of interleaved repeats after a warm-up (``--clock cpu``: process CPU time,
steadier on a loaded machine). Ratios are ``peer time / neuralode time`` (above 1: neuralode is
faster) and ``neuralode / hand-written loop`` for the sampling loop. ``main(argv)`` returns the
rows (dicts with keys ``name, ms, ratio, note``); ``--tiny`` is a CI smoke run (no numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None


class Spiral(torch.nn.Module):
    """The vector field of the classic spiral example: an MLP on ``y**3``."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2)
        )
        for p in self.net.parameters():
            with torch.no_grad():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))

    def forward(self, t, y):
        return self.net(y**3)


class TimeMLP(torch.nn.Module):
    """A time-conditioned MLP (flow-matching velocity field): ``[y, t] -> 64 -> 64 -> d``."""

    def __init__(self, d=2, hidden=64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(), torch.nn.Linear(hidden, d),
        )  # fmt: skip

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(y.shape[0], 1).to(y.dtype)], 1))


def spiral_data(batch=16, n_t=10):
    """Initial states and targets along the true spiral ``y' = y**3 A``."""
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    t = torch.linspace(0.0, 1.0, n_t)
    g = torch.Generator().manual_seed(1)
    y0 = 0.5 + 1.5 * torch.rand(batch, 2, generator=g)
    with torch.no_grad():
        ys = neuralode.odeint(lambda t, y: (y**3) @ A, y0, t, rtol=1e-7, atol=1e-9)
    return y0, t, ys


def _median_interleaved(fns: dict, repeats: int, clock) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = clock()
            fn()
            times[k].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def training_rows(repeats: int, clock, compiled: bool) -> list[dict]:
    func = Spiral()
    y0, t, target = spiral_data()
    tol = dict(rtol=1e-6, atol=1e-6)

    def step(odeint):
        def run():
            func.zero_grad()
            ys = odeint(func, y0, t, method="dopri5", **tol)
            ((ys - target) ** 2).mean().backward()

        return run

    fns = {"neuralode odeint": step(neuralode.odeint),
           "neuralode odeint_adjoint": step(neuralode.odeint_adjoint)}  # fmt: skip
    if torchdiffeq is not None:
        fns["torchdiffeq odeint"] = step(torchdiffeq.odeint)
        fns["torchdiffeq odeint_adjoint"] = step(torchdiffeq.odeint_adjoint)
    compile_s = {}
    if compiled:

        def step_compiled(gradient):
            def run():
                func.zero_grad()
                sol = neuralode.solve(func, y0, t, compile=True, dense_output=False,
                                      gradient=gradient, **tol)  # fmt: skip
                ((sol.ys - target) ** 2).mean().backward()

            return run

        for name, gradient in [("neuralode compile=True", "direct"),
                               ("neuralode compile=True adjoint", "backsolve")]:  # fmt: skip
            run = step_compiled(gradient)
            # The first call compiles 8 steps per call (forward and backward); the second,
            # knowing the step count, the shorter chunk that covers it
            # (neuralode._compiled_lengths), with f(t0, y0) and the initial step size in it
            # (neuralode._compiled_start; Direct gradients).
            start = time.perf_counter()
            run()
            run()
            compile_s[name] = time.perf_counter() - start
            fns[name] = run
    med = _median_interleaved(fns, repeats, clock)
    rows = []
    for name, s in med.items():
        peer = None
        if name.startswith("neuralode") and torchdiffeq is not None:
            peer = med["torchdiffeq odeint_adjoint" if "adjoint" in name else "torchdiffeq odeint"]
        note = (
            f"first two calls with compilation {compile_s[name]:.0f} s" if name in compile_s else ""
        )
        rows.append(dict(name=f"training step: {name}", ms=1e3 * s,
                         ratio=None if peer is None else peer / s, note=note))  # fmt: skip
    return rows


def sampling_rows(repeats: int, clock, compiled: bool = False) -> list[dict]:
    func = TimeMLP()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(256, 2, generator=g)
    n = 50
    t = torch.tensor([0.0, 1.0])

    def hand():
        x, dt = x0, 1.0 / n
        for k in range(n):
            x = x + dt * func(torch.tensor(k * dt), x)
        return x

    fns = {
        "hand-written loop": hand,
        "neuralode odeint euler": lambda: neuralode.odeint(
            func, x0, t, method="euler", options=dict(step_size=1.0 / n)
        ),
    }
    if torchdiffeq is not None:
        fns["torchdiffeq odeint euler"] = lambda: torchdiffeq.odeint(
            func, x0, t, method="euler", options=dict(step_size=1.0 / n)
        )
    compile_s = {}
    if compiled:
        hand_compiled = torch.compile(hand, fullgraph=True, dynamic=False)
        fns["hand-written loop, torch.compile"] = hand_compiled
        fns["neuralode solve euler compile=True"] = lambda: neuralode.solve(
            func, x0, t, solver="euler", dt=1.0 / n, compile=True, dense_output=False
        ).ys[-1]
        with torch.no_grad():
            for name in ("hand-written loop, torch.compile", "neuralode solve euler compile=True"):
                start = time.perf_counter()
                fns[name]()
                compile_s[name] = time.perf_counter() - start
    with torch.no_grad():
        med = _median_interleaved(fns, repeats, clock)
    base = med["hand-written loop"]
    rows = []
    for k, s in med.items():
        note = "time / hand-written loop"
        if k in compile_s:
            note += f"; first call with compilation {compile_s[k]:.0f} s"
        rows.append(dict(name=f"euler sampling: {k}", ms=1e3 * s, ratio=s / base, note=note))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CI smoke run (one repeat)")
    parser.add_argument("--compiled", choices=["on", "off"], default="on")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    repeats = args.repeats or (1 if args.tiny else 15)
    rows = training_rows(repeats, clock, args.compiled == "on" and not args.tiny)
    rows += sampling_rows(repeats, clock, args.compiled == "on" and not args.tiny)
    print_rows(rows)
    return rows


def print_rows(rows: list[dict]) -> None:
    """The rows as a markdown table (workload, ms, ratio, note)."""
    print("| workload | ms | ratio | note |\n|---|---:|---:|---|")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['name']} | {r['ms']:.2f} | {ratio} | {r['note']} |")


if __name__ == "__main__":
    main()
