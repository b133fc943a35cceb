"""Work-precision on stiff problems: neuralode's implicit solvers against scipy and torchdiffeq.

Problems (Hairer & Wanner II's stiff test set):

- ``robertson``: Robertson's chemical kinetics to t = 1e5 (atol 1e-12 on the tiny species y2,
  ``atol_scale`` times the tolerance ladder on the others);
- ``vdp``: Van der Pol with mu = 1000 on [0, 2000] (two relaxation jumps);
- ``hires``: HIRES (Schäfer 1975) on [0, 321.8122];
- ``heat800``, ``heat3200``: the 1-D heat equation on 800 points (the size at which
  torchdiffeq's implicit methods take ~14 s for two steps) and on 3200, two fixed steps: dense
  factorisations against matrix-free (Krylov) linear algebra, whose cost grows linearly.

Solvers: neuralode's adaptive ``kvaerno5``, ``rodas4``, ``trbdf2`` (``neuralode.solve`` on the
torch vector field) and its fixed-step ``radauIIA5``/``sdirk2``; scipy's ``BDF``, ``Radau``,
``LSODA`` (``solve_ivp`` on a NumPy version of the same vector field, Jacobians by scipy's own
finite differences, as in typical use); torchdiffeq's fixed-step implicit methods when the
installed torchdiffeq has them (0.2.5, the pinned version, does not: those rows say ``n/a``).

Per row: ``NFE`` (calls of the vector field, counted by one wrapper for every library -- for
scipy this includes its finite-difference Jacobian columns), ``jac`` (Jacobian evaluations:
neuralode's from autograd, scipy's njev), ``steps``, ``err`` (the largest relative error
``|y - y_ref| / (|y_ref| + atol)`` at the output times against scipy's Radau at rtol = 1e-11
with exact Jacobians), ``time`` (median wall time of the repeats after a warm-up, one thread)
and ``/best`` (time relative to the fastest solver of the problem and tolerance).

Run ``python benchmarks/stiff.py`` (about 2 minutes on 2 cores) or ``--quick`` (Robertson,
HIRES and the heat equation at two tolerances, about 30 s).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import neuralode
from neuralode.solvers import get_tableau

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
from scipy.integrate import solve_ivp

F64 = torch.float64


# --------------------------------------------------------------------------- problems
def _robertson(y):
    y1, y2, y3 = y[0], y[1], y[2]
    r1, r2, r3 = 0.04 * y1, 1e4 * y2 * y3, 3e7 * y2 * y2
    return [-r1 + r2, r1 - r2 - r3, r3]


def _robertson_jac(t, y):
    _, y2, y3 = y
    return [[-0.04, 1e4 * y3, 1e4 * y2], [0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2], [0, 6e7 * y2, 0]]


MU = 1000.0


def _vdp(y):
    return [y[1], MU * (1 - y[0] * y[0]) * y[1] - y[0]]


def _vdp_jac(t, y):
    return [[0.0, 1.0], [-2 * MU * y[0] * y[1] - 1, MU * (1 - y[0] ** 2)]]


def _hires(y):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = 280.0 * y6 * y8
    return [
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        r - 1.81 * y7,
        -r + 1.81 * y7,
    ]


def _hires_jac(t, y):
    J = np.zeros((8, 8))
    y6, y8 = y[5], y[7]
    J[0, :3] = [-1.71, 0.43, 8.32]
    J[1, :2] = [1.71, -8.75]
    J[2, 2:5] = [-10.03, 0.43, 0.035]
    J[3, 1:4] = [8.32, 1.71, -1.12]
    J[4, 4:7] = [-1.745, 0.43, 0.43]
    J[5, 3:8] = [0.69, 1.71, -0.43 - 280 * y8, 0.69, -280 * y6]
    J[6, 5:8] = [280 * y8, -1.81, 280 * y6]
    J[7, 5:8] = [-280 * y8, 1.81, -280 * y6]
    return J


@dataclass
class Problem:
    name: str
    rhs: Callable  # list-of-components form, shared by torch and NumPy
    jac: Callable  # exact Jacobian (NumPy) for the reference only
    y0: list
    t: list  # output times, t[0] the initial time
    atol: Callable  # tolerance -> atol per component
    ref: np.ndarray | None = None

    def torch_f(self, counter):
        def f(t, y):
            counter[0] += 1
            return torch.stack(self.rhs(y))

        return f

    def numpy_f(self, counter):
        def f(t, y):
            counter[0] += 1
            return np.asarray(self.rhs(y))

        return f


PROBLEMS = {
    "robertson": Problem(
        "robertson",
        _robertson,
        _robertson_jac,
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 1e2, 1e4, 1e5],
        lambda tol: [tol * 1e-2, 1e-12, tol * 1e-2],
    ),
    "vdp": Problem(
        "vdp",
        _vdp,
        _vdp_jac,
        [2.0, 0.0],
        [0.0, 500.0, 1000.0, 2000.0],
        lambda tol: [tol * 1e-2] * 2,
    ),
    "hires": Problem(
        "hires",
        _hires,
        _hires_jac,
        [1.0, 0, 0, 0, 0, 0, 0, 0.0057],
        [0.0, 321.8122],
        lambda tol: [tol * 1e-3] * 8,
    ),
}


def reference(p: Problem) -> np.ndarray:
    if p.ref is None:
        sol = solve_ivp(
            lambda t, y: np.asarray(p.rhs(y)),
            (p.t[0], p.t[-1]),
            p.y0,
            method="Radau",
            rtol=1e-11,
            atol=np.asarray(p.atol(1e-11)),
            jac=p.jac,
            t_eval=p.t,
        )
        assert sol.success, sol.message
        p.ref = sol.y.T
    return p.ref


# --------------------------------------------------------------------------- runs
@dataclass
class Row:
    problem: str
    library: str
    method: str
    setting: str
    nfe: int | None = None
    jac: int | None = None
    steps: int | None = None
    err: float | None = None
    time: float | None = None
    note: str = ""


def _timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _rel_err(y, p, tol):
    ref = reference(p)
    atol = np.asarray(p.atol(tol))
    return float(np.max(np.abs(y - ref) / (np.abs(ref) + atol)))


def run_neuralode(p: Problem, method: str, tol: float, repeats: int) -> Row:
    counter = [0]
    f = p.torch_f(counter)

    def solve():
        counter[0] = 0
        with torch.no_grad():
            return neuralode.solve(
                f,
                torch.tensor(p.y0, dtype=F64),
                torch.tensor(p.t, dtype=F64),
                solver=method,
                rtol=tol,
                atol=torch.tensor(p.atol(tol), dtype=F64),
                max_steps=200_000,
            )

    sol, t = _timed(solve, repeats)
    return Row(
        p.name,
        "neuralode",
        method,
        f"rtol={tol:.0e}",
        nfe=counter[0],
        jac=sol.stats.get("n_jac"),
        steps=sol.stats["n_steps"],
        err=_rel_err(sol.ys.numpy(), p, tol),
        time=t,
    )


def run_scipy(p: Problem, method: str, tol: float, repeats: int) -> Row:
    counter = [0]
    f = p.numpy_f(counter)

    def solve():
        counter[0] = 0
        return solve_ivp(
            f,
            (p.t[0], p.t[-1]),
            p.y0,
            method=method,
            rtol=tol,
            atol=np.asarray(p.atol(tol)),
            t_eval=p.t,
        )

    sol, t = _timed(solve, repeats)
    if not sol.success:
        return Row(p.name, "scipy", method, f"rtol={tol:.0e}", note=sol.message)
    return Row(
        p.name,
        "scipy",
        method,
        f"rtol={tol:.0e}",
        nfe=counter[0],
        jac=getattr(sol, "njev", None),
        err=_rel_err(sol.y.T, p, tol),
        time=t,
    )


def run_fixed(p: Problem, library: str, method: str, n: int, repeats: int) -> Row:
    """A fixed-step implicit method with ``n`` equal steps (neuralode or torchdiffeq)."""
    counter = [0]
    f = p.torch_f(counter)
    t = torch.tensor(p.t, dtype=F64)
    h = (p.t[-1] - p.t[0]) / n
    if library == "torchdiffeq":
        solvers = getattr(getattr(torchdiffeq, "_impl", None), "odeint", None)
        if solvers is None or method not in getattr(solvers, "SOLVERS", {}):
            version = getattr(torchdiffeq, "__version__", "?")
            return Row(p.name, library, method, f"n={n}", note=f"n/a in torchdiffeq {version}")

        def solve():
            counter[0] = 0
            with torch.no_grad():
                return torchdiffeq.odeint(
                    f, torch.tensor(p.y0, dtype=F64), t, method=method, options={"step_size": h}
                )

        ys, el = _timed(solve, repeats)
        return Row(
            p.name,
            library,
            method,
            f"n={n}",
            nfe=counter[0],
            err=_rel_err(ys.numpy(), p, 1e-6),
            time=el,
        )

    def solve():
        counter[0] = 0
        with torch.no_grad():
            return neuralode.solve(f, torch.tensor(p.y0, dtype=F64), t, solver=method, dt=h)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # substep notices in the initial transient
        sol, el = _timed(solve, repeats)
    return Row(
        p.name,
        library,
        method,
        f"n={n}",
        nfe=counter[0],
        jac=sol.stats.get("n_jac"),
        steps=sol.stats["n_steps"],
        err=_rel_err(sol.ys.numpy(), p, 1e-6),
        time=el,
        note=f"{sol.stats['n_substeps']} substeps" if sol.stats.get("n_substeps") else "",
    )


# --------------------------------------------------------------------------- heat equation
def heat_rows(repeats: int, n: int = 800) -> list[Row]:
    d = 1e-3
    dx = 1.0 / (n + 1)
    name = f"heat{n}"

    def f(t, u):
        up = torch.nn.functional.pad(u, (1, 1))
        return d * (up[2:] - 2 * up[1:-1] + up[:-2]) / dx**2

    u0 = torch.sin(np.pi * torch.arange(1, n + 1, dtype=F64) * dx)
    lam = d * (2 - 2 * np.cos(np.pi * dx)) / dx**2
    t = torch.tensor([0.0, 0.2], dtype=F64)
    exact = np.exp(-lam * 0.2) * u0.numpy()
    rows = []
    for method in ("implicit_euler", "radauIIA5", "kvaerno5"):
        for ls in ("dense", "krylov"):
            m = get_tableau(method).with_options(linear_solver=ls)

            def solve(m=m):
                with torch.no_grad():
                    return neuralode.solve(f, u0, t, solver=m, dt=0.1)

            sol, el = _timed(solve, repeats)
            err = float(np.max(np.abs(sol.ys[-1].numpy() - exact)))
            rows.append(
                Row(
                    name,
                    "neuralode",
                    f"{method} ({ls})",
                    "2 steps",
                    nfe=sol.stats["nfe"],
                    jac=sol.stats["n_jac"],
                    steps=2,
                    err=err,
                    time=el,
                    note=f"{sol.stats.get('n_jvp', 0)} JVPs" if ls == "krylov" else "",
                )
            )
        rows.append(run_fixed_heat_torchdiffeq(name, method, f, u0, t))
    return rows


def run_fixed_heat_torchdiffeq(name, method, f, u0, t) -> Row:
    solvers = getattr(getattr(torchdiffeq, "_impl", None), "odeint", None)
    if torchdiffeq is None or solvers is None or method not in getattr(solvers, "SOLVERS", {}):
        version = getattr(torchdiffeq, "__version__", "not installed")
        return Row(name, "torchdiffeq", method, "2 steps", note=f"n/a in torchdiffeq {version}")
    start = time.perf_counter()
    with torch.no_grad():
        torchdiffeq.odeint(f, u0, t, method=method, options={"step_size": 0.1})
    return Row(name, "torchdiffeq", method, "2 steps", time=time.perf_counter() - start)


# --------------------------------------------------------------------------- report
def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def print_table(rows: list[Row]) -> None:
    best: dict[tuple, float] = {}
    for r in rows:
        if r.time is not None:
            key = (r.problem, r.setting)
            best[key] = min(best.get(key, np.inf), r.time)
    print(
        "| problem | library | method | setting | NFE | jac | steps | err | time (s) | /best | note |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        rel = r.time / best[(r.problem, r.setting)] if r.time is not None else None
        print(
            f"| {r.problem} | {r.library} | {r.method} | {r.setting} | {_fmt(r.nfe, 'd')} | "
            f"{_fmt(r.jac, 'd')} | {_fmt(r.steps, 'd')} | {_fmt(r.err, '.1e')} | "
            f"{_fmt(r.time, '.3f')} | {_fmt(rel, '.2f')} | {r.note} |"
        )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer problems and tolerances")
    parser.add_argument("--problems", nargs="*", choices=[*PROBLEMS, "heat800", "heat3200"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    problems = args.problems or (
        ["robertson", "hires", "heat800"] if quick else [*PROBLEMS, "heat800", "heat3200"]
    )
    tols = [1e-4, 1e-7] if quick else [1e-4, 1e-6, 1e-8]
    repeats = args.repeats or (1 if quick else 3)
    rows: list[Row] = []
    for name in problems:
        if name.startswith("heat"):
            rows += heat_rows(repeats, int(name[4:]))
            continue
        p = PROBLEMS[name]
        reference(p)
        for tol in tols:
            for method in ("kvaerno5", "rodas4", "trbdf2"):
                if method == "trbdf2" and tol < 1e-6 and name != "robertson":
                    continue  # second order: too many steps to be interesting
                rows.append(run_neuralode(p, method, tol, repeats))
            for method in ("BDF", "Radau", "LSODA"):
                rows.append(run_scipy(p, method, tol, repeats))
        if name == "hires":
            for n in [200] if quick else [200, 800]:
                for method in ("radauIIA5", "sdirk2"):
                    rows.append(run_fixed(p, "neuralode", method, n, repeats))
                    rows.append(run_fixed(p, "torchdiffeq", method, n, repeats))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
