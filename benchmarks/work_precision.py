"""Work-precision comparison of neuralode against torchdiffeq, torchode and scipy.

The same problems are solved by every library with the same method (same Butcher tableau where
the libraries share one) at a ladder of tolerances (``atol = rtol``). For each
(problem, method, tolerance, library) the table gives:

- ``NFE``: calls of the vector field (counted by one wrapper around it, the same for every
  library; a torchode call evaluates the whole batch, as the others do);
- ``max err``: the largest absolute error over all output times and components, against a
  scipy ``DOP853`` reference at ``rtol = atol = 1e-13`` in float64;
- ``time``: the median wall time of a few repeats after one warm-up solve, under
  ``torch.no_grad()`` (forward solves only) and with ``torch.set_num_threads(--threads)``
  (default 1: the comparison is of the solvers' overheads and arithmetic, not of BLAS
  threading);
- ``us/NFE``: time per evaluation of the vector field, the fair measure on the chaotic Lorenz
  problem, where errors at t = 10 are O(1) at every practical tolerance; ``ovh/NFE`` subtracts
  the cost of one call of the vector field itself (measured alone, torch or NumPy), leaving the
  solver's own overhead per evaluation (stage combinations, error norm, step control, Python);
- ``/neuralode``: the time relative to neuralode's for the same method and tolerance
  (scipy's ``RK45`` is compared with ``dopri5``, ``DOP853`` with ``dopri8``).

A second table interpolates (log-log) each library's time at equal error, for the non-chaotic
problems. Differences between the libraries that matter for reading the numbers:

- torchode controls the step size of every batch element separately (its error norm is per
  sample); neuralode and torchdiffeq take one step size for the whole batch (RMS norm over it).
  On the 256-sample MLP problems torchode therefore does more work at a given tolerance and
  reaches a smaller error: compare at equal error, not at equal tolerance.
- torchdiffeq's ``dopri8`` is Prince & Dormand's RK8(7)13M; neuralode's is Hairer's DOP853
  (the same method as scipy's ``DOP853``). torchdiffeq has no ``tsit5``; torchode has no
  ``bosh3`` or ``dopri8``: those cells are ``n/a``.
- scipy runs on NumPy versions of the vector fields (its natural use), and only on the small
  problems (Lorenz, Arenstorf, the d = 2 MLP).

Run ``python benchmarks/work_precision.py`` (about 4 minutes on 2 cores), ``--quick`` for a
one-minute subset, ``--tiny`` for a CI smoke run (two tolerances per method, one repeat: not a
measurement), ``--problems arenstorf lorenz`` to choose problems, ``--tols 1e-3 1e-6`` to choose
the tolerances, ``--dtype float32`` for single precision (tolerances below ~1e-6 are then
meaningless).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None
from scipy.integrate import solve_ivp

# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """A vector field in torch (``f(t, y)``, ``y: (B, d)``) and NumPy (flat state), an initial
    state, output times and a float64 reference solution at them."""

    name: str
    description: str
    f_torch: Callable
    f_numpy: Callable
    y0: np.ndarray  # (B, d), float64
    t: np.ndarray  # (T,)
    chaotic: bool = False
    small: bool = False  # scipy is run on small problems only
    reference: np.ndarray | None = field(default=None, repr=False)  # (T, B, d)
    f_cost: dict = field(default_factory=dict)  # seconds per call: {"torch": ..., "numpy": ...}

    def compute_reference(self) -> None:
        shape = self.y0.shape
        sol = solve_ivp(
            self.f_numpy,
            (self.t[0], self.t[-1]),
            self.y0.reshape(-1),
            method="DOP853",
            t_eval=self.t,
            rtol=1e-13,
            atol=1e-13,
        )
        if not sol.success:  # pragma: no cover
            raise RuntimeError(f"reference solve failed for {self.name}: {sol.message}")
        self.reference = sol.y.T.reshape(len(self.t), *shape)

    def measure_f_cost(self, dtype: torch.dtype, clock) -> None:
        """Seconds per call of the vector field alone (best of 7 batches of 50 calls: the least
        disturbed by other processes)."""
        y_t = torch.tensor(self.y0, dtype=dtype)
        t_t = torch.tensor(0.5, dtype=torch.float64)
        y_n, t_n = self.y0.reshape(-1).copy(), 0.5
        for key, call in (
            ("torch", lambda: self.f_torch(t_t, y_t)),
            ("numpy", lambda: self.f_numpy(t_n, y_n)),
        ):
            with torch.no_grad():
                for _ in range(20):
                    call()
                per = []
                for _ in range(7):
                    start = clock()
                    for _ in range(50):
                        call()
                    per.append((clock() - start) / 50)
            self.f_cost[key] = min(per)


def _mlp(d: int, hidden: int, batch: int, seed: int, dtype: torch.dtype) -> Problem:
    """y' = W2 tanh(W1 y + b1) + b2 with seeded Gaussian weights.

    W1 ~ N(0, 2.25/d), W2 ~ N(0, 2.25/hidden): the Jacobian has norm ~2-3, so over t in [0, 1]
    the flow bends and stretches the batch (non-trivial, non-stiff dynamics).
    """
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, d, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(d)
    b1 = torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.5
    w2 = torch.randn(d, hidden, generator=gen, dtype=torch.float64) * 1.5 / math.sqrt(hidden)
    b2 = torch.randn(d, generator=gen, dtype=torch.float64) * 0.5
    y0 = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    w1n, b1n, w2n, b2n = (x.numpy() for x in (w1, b1, w2, b2))
    w1t, b1t, w2t, b2t = (x.to(dtype) for x in (w1, b1, w2, b2))

    def f_torch(t, y):
        return torch.addmm(b2t, torch.tanh(torch.addmm(b1t, y, w1t.T)), w2t.T)

    def f_numpy(t, y):
        y = y.reshape(batch, d)
        return (np.tanh(y @ w1n.T + b1n) @ w2n.T + b2n).reshape(-1)

    return Problem(
        name=f"mlp_d{d}",
        description=f"MLP field d={d}, hidden={hidden}, batch={batch}, t in [0, 1]",
        f_torch=f_torch,
        f_numpy=f_numpy,
        y0=y0.numpy(),
        t=np.linspace(0.0, 1.0, 11),
        small=d <= 2,
    )


def _lorenz() -> Problem:
    sigma, rho, beta = 10.0, 28.0, 8.0 / 3.0

    def f_torch(t, u):
        x, y, z = u[..., 0], u[..., 1], u[..., 2]
        return torch.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], dim=-1)

    def f_numpy(t, u):
        x, y, z = u
        return np.array([sigma * (y - x), x * (rho - z) - y, x * y - beta * z])

    return Problem(
        name="lorenz",
        description="Lorenz (10, 28, 8/3) from (1, 1, 1), t in [0, 10] (chaotic: see us/NFE)",
        f_torch=f_torch,
        f_numpy=f_numpy,
        y0=np.array([[1.0, 1.0, 1.0]]),
        t=np.linspace(0.0, 10.0, 21),
        chaotic=True,
        small=True,
    )


ARENSTORF_T = 17.0652165601579625588917206249
ARENSTORF_Y0 = (0.994, 0.0, 0.0, -2.00158510637908252240537862224)


def _arenstorf() -> Problem:
    """The restricted three-body problem's periodic Arenstorf orbit (Hairer, Norsett & Wanner,
    Solving ODEs I, sec. II.0), over one period."""
    mu = 0.012277471
    mup = 1.0 - mu

    def f_torch(t, u):
        y1, y2, v1, v2 = u[..., 0], u[..., 1], u[..., 2], u[..., 3]
        d1 = ((y1 + mu) ** 2 + y2**2) ** 1.5
        d2 = ((y1 - mup) ** 2 + y2**2) ** 1.5
        a1 = y1 + 2 * v2 - mup * (y1 + mu) / d1 - mu * (y1 - mup) / d2
        a2 = y2 - 2 * v1 - mup * y2 / d1 - mu * y2 / d2
        return torch.stack([v1, v2, a1, a2], dim=-1)

    def f_numpy(t, u):
        y1, y2, v1, v2 = u
        d1 = ((y1 + mu) ** 2 + y2**2) ** 1.5
        d2 = ((y1 - mup) ** 2 + y2**2) ** 1.5
        a1 = y1 + 2 * v2 - mup * (y1 + mu) / d1 - mu * (y1 - mup) / d2
        a2 = y2 - 2 * v1 - mup * y2 / d1 - mu * y2 / d2
        return np.array([v1, v2, a1, a2])

    return Problem(
        name="arenstorf",
        description="Arenstorf orbit, one period T = 17.0652..., mu = 0.012277471",
        f_torch=f_torch,
        f_numpy=f_numpy,
        y0=np.array([ARENSTORF_Y0]),
        t=np.linspace(0.0, ARENSTORF_T, 21),
        small=True,
    )


def make_problems(dtype: torch.dtype) -> dict[str, Callable[[], Problem]]:
    return {
        "mlp_d2": lambda: _mlp(2, 64, 256, seed=0, dtype=dtype),
        "mlp_d64": lambda: _mlp(64, 128, 256, seed=1, dtype=dtype),
        "lorenz": _lorenz,
        "arenstorf": _arenstorf,
    }


# --------------------------------------------------------------------------- libraries
class Counter:
    """Counts calls of the vector field (the same wrapper for every library)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


def run_neuralode(prob, method, tol, y0, t):
    f = Counter(prob.f_torch)
    sol = neuralode.solve(f, y0, t, solver=method, rtol=tol, atol=tol, dense_output=False)
    return sol.ys, f.n


def run_neuralode_compiled(prob, method, tol, y0, t):
    # solve(compile=True): compiled chunks of 8 steps. The NFE is the solver's own count (a
    # Python counter inside compiled code would not run per call).
    sol = neuralode.solve(prob.f_torch, y0, t, solver=method, rtol=tol, atol=tol, compile=True)
    return sol.ys, sol.stats["nfe"]


def run_torchdiffeq(prob, method, tol, y0, t):
    f = Counter(prob.f_torch)
    ys = torchdiffeq.odeint(f, y0, t, method=method, rtol=tol, atol=tol)
    return ys, f.n


_TORCHODE_STEP = {"dopri5": "Dopri5", "tsit5": "Tsit5"}


def run_torchode(prob, method, tol, y0, t):
    f = Counter(prob.f_torch)
    term = torchode.ODETerm(f)
    step = getattr(torchode, _TORCHODE_STEP[method])(term=term)
    ctrl = torchode.IntegralController(atol=tol, rtol=tol, term=term)
    solver = torchode.AutoDiffAdjoint(step, ctrl)
    t_eval = t.to(y0.dtype).unsqueeze(0).expand(y0.shape[0], -1)
    sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval))
    if not bool((sol.status == 0).all()):
        raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")
    return sol.ys.transpose(0, 1), f.n  # (B, T, d) -> (T, B, d)


_SCIPY_METHOD = {"dopri5": "RK45", "dopri8": "DOP853"}


def run_scipy(prob, method, tol, y0, t):
    calls = [0]

    def f(s, y):
        calls[0] += 1
        return prob.f_numpy(s, y)

    tt = t.numpy()
    sol = solve_ivp(
        f,
        (tt[0], tt[-1]),
        prob.y0.reshape(-1),
        method=_SCIPY_METHOD[method],
        t_eval=tt,
        rtol=tol,
        atol=tol,
    )
    if not sol.success:
        raise RuntimeError(sol.message)
    return torch.from_numpy(sol.y.T.reshape(len(tt), *prob.y0.shape)), calls[0]


LIBRARIES = {
    "neuralode": (run_neuralode, {"dopri5", "tsit5", "bosh3", "dopri8"}),
    "neuralode compiled": (run_neuralode_compiled, {"dopri5", "dopri8"}),
    "torchdiffeq": (run_torchdiffeq, {"dopri5", "bosh3", "dopri8"}),
    "torchode": (run_torchode, {"dopri5", "tsit5"}),
    "scipy": (run_scipy, {"dopri5", "dopri8"}),
}
LIB_LABEL = {"scipy": {"dopri5": "scipy RK45", "dopri8": "scipy DOP853"}}

# Tolerance ladders per method: low orders stop before their step counts explode.
FULL_TOLS = {
    "dopri5": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
    "tsit5": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
    "bosh3": [1e-3, 1e-4, 1e-5, 1e-6, 1e-7],
    "dopri8": [1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10],
}
QUICK_TOLS = {
    "dopri5": [1e-3, 1e-6, 1e-8],
    "tsit5": [1e-3, 1e-6, 1e-8],
    "bosh3": [1e-3, 1e-5],
    "dopri8": [1e-6, 1e-9],
}
TINY_TOLS = {  # --tiny: a CI smoke run of the code path, not a measurement
    "dopri5": [1e-3, 1e-5],
    "tsit5": [1e-3, 1e-5],
    "bosh3": [1e-3, 1e-4],
    "dopri8": [1e-5, 1e-7],
}


# --------------------------------------------------------------------------- measurement
@dataclass
class Row:
    problem: str
    method: str
    tol: float
    library: str
    nfe: int | None = None
    err: float | None = None
    time: float | None = None  # seconds, median
    note: str = ""


# solve(compile=True) on the tiny systems, where per-operation dispatch dominates (each
# (problem, method) compiles once, ~35 s on 2 cores; off under --tiny unless --compiled).
COMPILED_PROBLEMS = ("lorenz", "arenstorf")
COMPILED = {"on": True}


def _available(lib: str, method: str, prob: Problem) -> str | None:
    """None if the library runs this method on this problem, else why not."""
    runner, methods = LIBRARIES[lib]
    if method not in methods:
        return "n/a"
    if lib == "torchdiffeq" and torchdiffeq is None:
        return "not installed"
    if lib == "torchode" and torchode is None:
        return "not installed"
    if lib == "scipy" and not prob.small:
        return "(large problem)"
    if lib == "neuralode compiled" and (not COMPILED["on"] or prob.name not in COMPILED_PROBLEMS):
        return "(large problem)"  # compiled stepping is measured on the tiny systems only
    return None


def measure(
    prob: Problem, method: str, tol: float, lib: str, dtype, repeats: int, budget: float, clock
) -> Row:
    row = Row(prob.name, method, tol, lib)
    runner = LIBRARIES[lib][0]
    y0 = torch.tensor(prob.y0, dtype=dtype)
    t = torch.tensor(prob.t, dtype=torch.float64 if lib != "torchode" else dtype)
    try:
        with torch.no_grad():
            ys, nfe = runner(prob, method, tol, y0, t)  # warm-up, also gives NFE and error
            times = []
            for _ in range(repeats):
                start = clock()
                runner(prob, method, tol, y0, t)
                times.append(clock() - start)
                if sum(times) > budget:  # a slow configuration: fewer repeats
                    break
    except Exception as e:  # a failed solve is a result too
        row.note = f"failed: {type(e).__name__}: {str(e)[:60]}"
        return row
    row.nfe = nfe
    row.err = float(np.abs(ys.double().numpy() - prob.reference).max())
    row.time = statistics.median(times)
    return row


# --------------------------------------------------------------------------- reporting
def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3g}" if s < 10 else f"{s * 1e3:.0f}"


def print_table(rows: list[Row], prob: Problem, out=sys.stdout) -> None:
    print(f"\n### {prob.name}: {prob.description}\n", file=out)
    if prob.f_cost:
        print(
            f"One call of the vector field alone: torch {prob.f_cost['torch'] * 1e6:.0f} us, "
            f"NumPy {prob.f_cost['numpy'] * 1e6:.0f} us.\n",
            file=out,
        )
    print(
        "| method | tol | library | NFE | max err | time (ms) | us/NFE | ovh/NFE | /neuralode |",
        file=out,
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|", file=out)
    base = {(r.method, r.tol): r.time for r in rows if r.library == "neuralode" and r.time}
    for r in rows:
        label = LIB_LABEL.get(r.library, {}).get(r.method, r.library)
        if r.time is None:
            print(f"| {r.method} | {r.tol:.0e} | {label} | {r.note} | | | | | |", file=out)
            continue
        b = base.get((r.method, r.tol))
        ratio = f"{r.time / b:.2f}" if b else "-"
        f_cost = prob.f_cost.get("numpy" if r.library == "scipy" else "torch", 0.0)
        per = r.time / r.nfe
        print(
            f"| {r.method} | {r.tol:.0e} | {label} | {r.nfe} | {r.err:.1e} | "
            f"{_fmt_time(r.time)} | {per * 1e6:.0f} | {(per - f_cost) * 1e6:.0f} | {ratio} |",
            file=out,
        )


def _time_at_error(points: list[tuple[float, float]], target: float) -> float | None:
    """Log-log interpolation of time at error ``target`` from (err, time) points."""
    pts = sorted((e, s) for e, s in points if e > 0 and s > 0)
    for (e0, s0), (e1, s1) in zip(pts, pts[1:]):
        if e0 <= target <= e1 and e1 > e0:
            w = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0)))
    return None


def print_equal_error(rows: list[Row], probs: list[Problem], out=sys.stdout) -> None:
    print("\n### Time at equal error (log-log interpolation; ms, and / neuralode)\n", file=out)
    if all(prob.chaotic for prob in probs):
        print("(none: errors of a chaotic problem are not comparable; see us/NFE)", file=out)
        return
    print("| problem | method | target err | library | time (ms) | /neuralode |", file=out)
    print("|---|---|---|---|---:|---:|", file=out)
    for prob in probs:
        if prob.chaotic:
            continue
        for method in FULL_TOLS:
            sub = [r for r in rows if r.problem == prob.name and r.method == method and r.time]
            for target in (1e-3, 1e-5, 1e-7):
                times = {}
                for lib in LIBRARIES:
                    pts = [(r.err, r.time) for r in sub if r.library == lib]
                    s = _time_at_error(pts, target)
                    if s is not None:
                        times[lib] = s
                if "neuralode" not in times or len(times) < 2:
                    continue
                for lib, s in times.items():
                    label = LIB_LABEL.get(lib, {}).get(method, lib)
                    print(
                        f"| {prob.name} | {method} | {target:.0e} | {label} | {_fmt_time(s)} | "
                        f"{s / times['neuralode']:.2f} |",
                        file=out,
                    )


def print_summary(rows: list[Row], out=sys.stdout) -> None:
    """Geometric mean over tolerances of time / neuralode time, per problem and library."""
    print("\n### Geometric-mean time ratio vs neuralode (same method and tolerance)\n", file=out)
    libs = [lib for lib in LIBRARIES if lib != "neuralode"]
    print("| problem | method | " + " | ".join(libs) + " |", file=out)
    print("|---|---|" + "---:|" * len(libs), file=out)
    base = {(r.problem, r.method, r.tol): r.time for r in rows if r.library == "neuralode"}
    for prob in dict.fromkeys(r.problem for r in rows):
        for method in FULL_TOLS:
            if not any(r.problem == prob and r.method == method and r.time for r in rows):
                continue  # not run
            cells = []
            for lib in libs:
                ratios = [
                    r.time / base[(r.problem, r.method, r.tol)]
                    for r in rows
                    if r.problem == prob
                    and r.method == method
                    and r.library == lib
                    and r.time
                    and base.get((r.problem, r.method, r.tol))
                ]
                cells.append(
                    f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}" if ratios else "n/a"
                )
            print(f"| {prob} | {method} | " + " | ".join(cells) + " |", file=out)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tolerances and repeats")
    parser.add_argument(
        "--tiny", action="store_true", help="CI smoke run: two tolerances per method, 1 repeat"
    )
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=["mlp_d2", "mlp_d64", "lorenz", "arenstorf"],
        default=["mlp_d2", "mlp_d64", "lorenz", "arenstorf"],
    )
    parser.add_argument("--methods", nargs="+", choices=list(FULL_TOLS), default=list(FULL_TOLS))
    parser.add_argument(
        "--tols", type=float, nargs="+", default=None, help="tolerances (default: per method)"
    )
    parser.add_argument(
        "--compiled",
        choices=["on", "off"],
        default=None,
        help="also run neuralode.solve(..., compile=True) on lorenz/arenstorf with dopri5/dopri8 "
        "(default: on, off under --tiny)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 7, within --budget)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed repeats per configuration before stopping early (default 1.0)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (perf_counter, default) or this process's CPU time (process_time: "
        "steadier on a shared, loaded machine; equal to wall time with --threads 1 on an idle one)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dtype = getattr(torch, args.dtype)
    tols = TINY_TOLS if args.tiny else QUICK_TOLS if args.quick else FULL_TOLS
    if args.tols:
        tols = {method: sorted(args.tols, reverse=True) for method in FULL_TOLS}
    fast = args.quick or args.tiny
    COMPILED["on"] = (args.compiled or ("off" if args.tiny else "on")) == "on"
    repeats = args.repeats or (1 if fast else 7)
    budget = args.budget or (0.1 if args.tiny else 0.3 if args.quick else 1.0)
    factories = make_problems(dtype)

    print(
        f"# Work-precision: neuralode {neuralode.__version__}, torchdiffeq "
        f"{getattr(torchdiffeq, '__version__', 'missing')}, torchode "
        f"{getattr(torchode, '__version__', 'missing')}, torch {torch.__version__}; "
        f"dtype {args.dtype}, threads {args.threads}, {args.clock} clock, atol = rtol, median "
        f"of up to {repeats} after a warm-up"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    probs = []
    for name in args.problems:
        prob = factories[name]()
        prob.compute_reference()
        prob.measure_f_cost(dtype, clock)
        for lib in LIBRARIES:  # warm every library up on this problem (allocator, caches)
            if _available(lib, "dopri5", prob) is None:
                measure(prob, "dopri5", 1e-3, lib, dtype, 1, 0.0, clock)
        probs.append(prob)
        prob_rows = []
        for method in args.methods:
            for tol in tols[method]:
                for lib in LIBRARIES:
                    why = _available(lib, method, prob)
                    if why == "n/a" or why == "(large problem)":
                        if lib == "torchdiffeq" and why == "n/a":
                            prob_rows.append(Row(prob.name, method, tol, lib, note="n/a"))
                        continue
                    if why is not None:
                        prob_rows.append(Row(prob.name, method, tol, lib, note=why))
                        continue
                    prob_rows.append(measure(prob, method, tol, lib, dtype, repeats, budget, clock))
        print_table(prob_rows, prob)
        sys.stdout.flush()
        rows.extend(prob_rows)
    print_equal_error(rows, probs)
    print_summary(rows)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
