"""Work-precision of gradients (forward + backward): neuralode against torchdiffeq and torchode.

A neural ODE ``y' = W2 tanh(W1 y + b1) + b2`` (an ``nn.Module`` whose weights are
``nn.Parameter``) is solved from a batch of initial states ``y0`` (``requires_grad``) over
``t in [0, 1]`` with ``--outputs`` evenly spaced output times, by dopri5 with
``rtol = atol = tol`` on a ladder of tolerances, and differentiated through the loss
``L = sum_j (y(t_j) * w_j).sum()`` with a fixed random weight tensor ``w``. The configurations,
in two families that are compared member by member:

- backprop (autograd through the solver): ``neuralode Direct`` (``neuralode.odeint``, the
  torchdiffeq-compatible face), ``neuralode Checkpointed`` (``neuralode.solve(...,
  gradient=Checkpointed())``: the same gradient as Direct, states stored at steps and each step
  replayed in the backward pass), ``neuralode Reversible`` (``gradient=Reversible()``: the exact
  gradient of McCallum & Foster's reversible version of dopri5, which is a different solve with
  the same tolerance, at constant autograd memory), ``torchdiffeq odeint`` and ``torchode``
  (``AutoDiffAdjoint(Dopri5, IntegralController)``);
- adjoint (a backward solve of the adjoint system): ``neuralode Backsolve``
  (``neuralode.odeint_adjoint``), ``torchdiffeq odeint_adjoint`` (default adjoint options: the
  backward tolerances are the forward ones and the parameter adjoint is in the error norm) and
  ``torchode backsolve`` (``BacksolveAdjoint``) where it runs.

For each (problem, configuration, tolerance) the first table gives:

- ``NFE fwd`` / ``NFE bwd``: calls of the vector field during the forward call and during
  ``L.backward()`` (one counting wrapper module for every library). Backprop through the solver
  calls no vector field in the backward pass (autograd replays the recorded graph), Checkpointed
  recomputes the steps, the adjoint methods integrate the augmented system backward;
- ``grad err``: the worst of the relative 2-norm errors of the gradient w.r.t. the parameters
  (all concatenated into one vector) and w.r.t. ``y0``, against neuralode's Direct gradient of a
  float64 dopri8 solve at ``rtol = atol = 1e-12`` (checked once against Checkpointed at the same
  tolerance; the agreement is printed). Direct's gradient is the exact gradient of the discrete
  solve, so its error is the solve's discretisation error carried into the gradient; the
  adjoint methods add the error of the backward solve (continuous adjoint of a discrete
  forward solution);
- ``time ms``: the median of ``--repeats`` timings of (zero the gradients, forward, loss,
  backward) after one warm-up, with ``torch.set_num_threads(--threads)`` (default 1) and the
  ``--clock`` (``wall``, or ``cpu`` for process CPU time: steadier on a loaded machine). Every
  configuration is first run once per problem at the loosest tolerance; one whose warm-up
  takes longer than ``--budget`` seconds is timed by that run alone, and timed repeats stop
  once they add up to ``--budget``;
- ``/ neuralode``: time relative to the neuralode member of the same family at the same
  tolerance (Direct for the backprop family, Backsolve for the adjoint family).

The second table interpolates (log-log) each configuration's time at equal gradient error
(``1e-3``, ``1e-5``, ``1e-7`` where the ladder brackets them); ``peer / neuralode`` above 1 means
neuralode is faster. The summary gives, per problem, the geometric mean over those targets of
torchdiffeq odeint / neuralode Direct (the project's target: at least 2x), torchdiffeq
odeint_adjoint / neuralode Backsolve (at least 3x) and torchode / neuralode Direct.

Caveats: torchode's ``BacksolveAdjoint`` integrates a per-sample copy of every parameter's
adjoint (its augmented state is ``B x P``) and evaluates the field per sample under ``vmap``; on
``mlp_d64`` (``256 x 16576``) that takes 15-40 s per gradient, so it is skipped there unless
``--large-torchode-backsolve``. torchdiffeq's adjoint restarts its backward solve at every
output time and takes the max of per-tensor RMS norms of the augmented state, so at loose
tolerances it does more backward steps than the tolerance asks. neuralode's Backsolve does not
restart: it adds the contribution of outputs inside a forward step through that step's own
dense output, so its gradient error follows Direct's, while torchdiffeq's adjoint is 2-7x more
accurate at the same tolerance on these problems. torchode controls each batch element's step
separately (per-sample error norm), so at a given tolerance it takes more steps than the
shared-step libraries. In every case: compare at equal error. With ``--dtype float32`` gradient
errors stop falling near 1e-6 (the reference stays float64).

Run ``python benchmarks/gradients.py`` (full ladder 1e-3..1e-9, a few minutes on 2 cores),
``--quick`` (three tolerances, one repeat, ~15 s) or ``--tiny`` (a CI smoke run: mlp_d2,
batch 16, four output times, tolerances 1e-3 and 1e-5, a few seconds). ``main(argv)`` returns
the rows and ``summary(rows)`` the equal-error ratios per problem, for other scripts.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from work_precision import _fmt_time, _time_at_error  # the sibling script (same folder)

import neuralode

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None

FULL_TOLS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
QUICK_TOLS = [1e-3, 1e-6, 1e-9]
TINY_TOLS = [1e-3, 1e-5]
TARGETS = (1e-3, 1e-5, 1e-7)
REF_TOL = 1e-12
# torchode's BacksolveAdjoint integrates a per-sample copy of every parameter's adjoint (state
# B x P): above this many numbers it is skipped unless --large-torchode-backsolve.
LARGE = 1_000_000


# --------------------------------------------------------------------------- problems
class MLPField(nn.Module):
    """``y' = W2 tanh(W1 y + b1) + b2`` with seeded Gaussian weights, as ``_mlp`` in
    work_precision.py (the same draws in the same order: the same field for the same seed).

    W1 ~ N(0, 2.25/d), W2 ~ N(0, 2.25/hidden), biases N(0, 0.25): the Jacobian has norm ~2-3,
    so over t in [0, 1] the flow bends and stretches the batch (non-trivial, non-stiff).
    ``F.linear`` accepts a single state ``(d,)`` as well as a batch ``(B, d)`` (torchode's
    backsolve evaluates the field per sample under ``vmap``).
    """

    def __init__(self, d: int, hidden: int, gen: torch.Generator):
        super().__init__()
        f64 = torch.float64
        self.w1 = nn.Parameter(torch.randn(hidden, d, generator=gen, dtype=f64) * 1.5 / d**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=gen, dtype=f64) * 0.5)
        self.w2 = nn.Parameter(torch.randn(d, hidden, generator=gen, dtype=f64) * 1.5 / hidden**0.5)
        self.b2 = nn.Parameter(torch.randn(d, generator=gen, dtype=f64) * 0.5)

    def forward(self, t, y):
        return F.linear(torch.tanh(F.linear(y, self.w1, self.b1)), self.w2, self.b2)


class Counted(nn.Module):
    """Counts calls of the wrapped field; a module, so its parameters are found by every
    library's adjoint (``tuple(func.parameters())``)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f
        self.n = 0

    def forward(self, t, y):
        self.n += 1
        return self.f(t, y)


@dataclass
class Problem:
    name: str
    description: str
    field: MLPField  # float64 master copy (the reference is computed with it)
    y0: torch.Tensor  # (B, d), float64
    t: torch.Tensor  # (T,), float64
    w: torch.Tensor  # (T, B, d), float64: loss weights
    ref_params: torch.Tensor | None = None  # concatenated parameter gradient, float64
    ref_y0: torch.Tensor | None = None
    ref_note: str = ""


def make_problem(name: str, batch: int, n_out: int) -> Problem:
    d, hidden, seed = {"mlp_d2": (2, 64, 0), "mlp_d64": (64, 128, 1)}[name]
    gen = torch.Generator().manual_seed(seed)
    field = MLPField(d, hidden, gen)
    y0 = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    w = torch.randn(n_out, batch, d, generator=gen, dtype=torch.float64)
    return Problem(
        name=name,
        description=f"MLP field d={d}, hidden={hidden}, batch={batch}, {n_out} outputs in [0, 1]",
        field=field,
        y0=y0,
        t=torch.linspace(0.0, 1.0, n_out, dtype=torch.float64),
        w=w,
    )


def _flat_grads(field: nn.Module, y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gp = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
        for p in field.parameters()
    ]
    gy = y0.grad if y0.grad is not None else torch.zeros_like(y0)
    return torch.cat(gp), gy.double()


def _rel(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))


def compute_reference(prob: Problem) -> None:
    """Direct gradient of a float64 dopri8 solve at rtol = atol = 1e-12, checked against
    Checkpointed's at the same tolerance."""
    grads = {}
    for label, gradient in (
        ("Direct", neuralode.Direct()),
        ("Checkpointed", neuralode.Checkpointed()),
    ):
        prob.field.zero_grad(set_to_none=True)
        y0 = prob.y0.clone().requires_grad_(True)
        sol = neuralode.solve(
            prob.field, y0, prob.t, solver="dopri8", rtol=REF_TOL, atol=REF_TOL, gradient=gradient
        )
        (sol.ys * prob.w).sum().backward()
        grads[label] = _flat_grads(prob.field, y0)
    prob.field.zero_grad(set_to_none=True)
    prob.ref_params, prob.ref_y0 = grads["Direct"]
    cp, cy = grads["Checkpointed"]
    prob.ref_note = (
        f"Reference: neuralode dopri8 Direct at rtol = atol = {REF_TOL:.0e}, float64; "
        f"Checkpointed at the same tolerance differs by {_rel(cp, prob.ref_params):.1e} "
        f"(parameters) and {_rel(cy, prob.ref_y0):.1e} (y0), relative."
    )


# --------------------------------------------------------------------------- configurations
def run_direct(func, y0, t, tol):
    return neuralode.odeint(func, y0, t, rtol=tol, atol=tol, method="dopri5")


def run_checkpointed(func, y0, t, tol):
    return neuralode.solve(
        func, y0, t, solver="dopri5", rtol=tol, atol=tol, gradient=neuralode.Checkpointed()
    ).ys


def run_reversible(func, y0, t, tol):
    return neuralode.solve(
        func, y0, t, solver="dopri5", rtol=tol, atol=tol, gradient=neuralode.Reversible()
    ).ys


def run_backsolve(func, y0, t, tol):
    return neuralode.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method="dopri5")


def run_torchdiffeq(func, y0, t, tol):
    return torchdiffeq.odeint(func, y0, t, rtol=tol, atol=tol, method="dopri5")


def run_torchdiffeq_adjoint(func, y0, t, tol):
    return torchdiffeq.odeint_adjoint(func, y0, t, rtol=tol, atol=tol, method="dopri5")


def _torchode_solve(func, y0, t, tol, backsolve: bool):
    term = torchode.ODETerm(func)
    step = torchode.Dopri5(term=term)
    ctrl = torchode.IntegralController(atol=tol, rtol=tol, term=term)
    if backsolve:
        solver = torchode.BacksolveAdjoint(term, step, ctrl)
    else:
        solver = torchode.AutoDiffAdjoint(step, ctrl)
    t_eval = t.to(y0.dtype).unsqueeze(0).expand(y0.shape[0], -1)
    sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval))
    if not bool((sol.status == 0).all()):
        raise RuntimeError(f"torchode status {sol.status.unique().tolist()}")
    return sol.ys.transpose(0, 1)  # (B, T, d) -> (T, B, d)


def run_torchode(func, y0, t, tol):
    return _torchode_solve(func, y0, t, tol, backsolve=False)


def run_torchode_backsolve(func, y0, t, tol):
    return _torchode_solve(func, y0, t, tol, backsolve=True)


@dataclass(frozen=True)
class Config:
    name: str
    family: str  # "backprop" or "adjoint"
    library: str
    run: Callable


CONFIGS = [
    Config("neuralode Direct", "backprop", "neuralode", run_direct),
    Config("neuralode Checkpointed", "backprop", "neuralode", run_checkpointed),
    Config("neuralode Reversible", "backprop", "neuralode", run_reversible),
    Config("torchdiffeq odeint", "backprop", "torchdiffeq", run_torchdiffeq),
    Config("torchode", "backprop", "torchode", run_torchode),
    Config("neuralode Backsolve", "adjoint", "neuralode", run_backsolve),
    Config("torchdiffeq odeint_adjoint", "adjoint", "torchdiffeq", run_torchdiffeq_adjoint),
    Config("torchode backsolve", "adjoint", "torchode", run_torchode_backsolve),
]
BASE = {"backprop": "neuralode Direct", "adjoint": "neuralode Backsolve"}
# (key of summary(), peer, neuralode member, the project's target ratio)
PAIRS = [
    ("direct_vs_torchdiffeq", "torchdiffeq odeint", "neuralode Direct", 2.0),
    ("backsolve_vs_torchdiffeq_adjoint", "torchdiffeq odeint_adjoint", "neuralode Backsolve", 3.0),
    ("direct_vs_torchode", "torchode", "neuralode Direct", None),
]


def _installed(cfg: Config) -> bool:
    return {"torchdiffeq": torchdiffeq, "torchode": torchode}.get(
        cfg.library, neuralode
    ) is not None


# --------------------------------------------------------------------------- measurement
@dataclass
class Row:
    problem: str
    family: str
    config: str
    tol: float
    nfe_fwd: int | None = None
    nfe_bwd: int | None = None
    err: float | None = None
    time: float | None = None  # seconds, median
    note: str = ""


class Setup:
    """One problem's field, state, times and loss weights in the benchmark's dtype."""

    def __init__(self, prob: Problem, dtype: torch.dtype):
        self.field = copy.deepcopy(prob.field).to(dtype)
        self.func = Counted(self.field)
        self.y0 = prob.y0.to(dtype).clone().requires_grad_(True)
        self.t = prob.t  # float64; torchode casts to y0's dtype
        self.w = prob.w.to(dtype)

    def once(self, cfg: Config, tol: float, clock) -> tuple[float, int, int]:
        """(time, NFE forward, NFE backward) of zero-grad + forward + loss + backward."""
        start = clock()
        self.field.zero_grad(set_to_none=True)
        self.y0.grad = None
        self.func.n = 0
        ys = cfg.run(self.func, self.y0, self.t, tol)
        n_fwd = self.func.n
        (ys * self.w).sum().backward()
        elapsed = clock() - start
        return elapsed, n_fwd, self.func.n - n_fwd


def measure(
    prob: Problem, setup: Setup, cfg: Config, tol: float, repeats: int, budget: float, clock
) -> Row:
    row = Row(prob.name, cfg.family, cfg.name, tol)
    try:
        first, n_fwd, n_bwd = setup.once(cfg, tol, clock)  # warm-up; gives NFE and gradient
        gp, gy = _flat_grads(setup.field, setup.y0)
        if repeats and first > budget:
            # A slow configuration (the per-problem warm-up came before): the warm-up is timed.
            times = [first]
        else:
            times = []
            for _ in range(repeats):
                times.append(setup.once(cfg, tol, clock)[0])
                if sum(times) > budget:  # a slow configuration: fewer repeats
                    break
    except Exception as e:  # a failed solve is a result too
        row.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
        return row
    row.nfe_fwd, row.nfe_bwd = n_fwd, n_bwd
    row.err = max(_rel(gp, prob.ref_params), _rel(gy, prob.ref_y0))
    row.time = statistics.median(times) if times else None
    return row


# --------------------------------------------------------------------------- reporting
def print_table(rows: list[Row], prob: Problem, out=sys.stdout) -> None:
    print(f"\n### {prob.name}: {prob.description}\n", file=out)
    print(prob.ref_note + "\n", file=out)
    print(
        "| problem | family | library/method | tol | NFE fwd | NFE bwd | grad err | time ms "
        "| / neuralode |",
        file=out,
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|", file=out)
    base = {(r.config, r.tol): r.time for r in rows if r.time}
    for family in BASE:
        for r in (r for r in rows if r.family == family):
            head = f"| {r.problem} | {r.family} | {r.config} | {r.tol:.0e} |"
            if r.time is None:
                print(f"{head} {r.note} | | | | |", file=out)
                continue
            b = base.get((BASE[r.family], r.tol))
            ratio = f"{r.time / b:.2f}" if b else "-"
            print(
                f"{head} {r.nfe_fwd} | {r.nfe_bwd} | {r.err:.1e} | {_fmt_time(r.time)} | {ratio} |",
                file=out,
            )


def equal_error_times(rows: list[Row]) -> dict[tuple[str, str, float], float]:
    """{(problem, config, target): interpolated time} where the ladder brackets the target."""
    out = {}
    for prob in dict.fromkeys(r.problem for r in rows):
        for cfg in CONFIGS:
            pts = [
                (r.err, r.time)
                for r in rows
                if r.problem == prob and r.config == cfg.name and r.time and r.err is not None
            ]
            for target in TARGETS:
                s = _time_at_error(pts, target)
                if s is not None:
                    out[(prob, cfg.name, target)] = s
    return out


def print_equal_error(rows: list[Row], out=sys.stdout) -> None:
    print(
        "\n### Time at equal gradient error (log-log interpolation; peer / neuralode > 1: "
        "neuralode faster)\n",
        file=out,
    )
    print("| problem | family | target | library | time ms | peer / neuralode |", file=out)
    print("|---|---|---|---|---:|---:|", file=out)
    times = equal_error_times(rows)
    for prob in dict.fromkeys(r.problem for r in rows):
        for family, base in BASE.items():
            for target in TARGETS:
                b = times.get((prob, base, target))
                if b is None:
                    continue
                for cfg in (c for c in CONFIGS if c.family == family):
                    s = times.get((prob, cfg.name, target))
                    if s is None:
                        continue
                    print(
                        f"| {prob} | {family} | {target:.0e} | {cfg.name} | {_fmt_time(s)} | "
                        f"{s / b:.2f} |",
                        file=out,
                    )


def _pair_ratios(rows: list[Row]) -> dict[tuple[str, str], list[float]]:
    """{(problem, summary key): [peer / neuralode time at each bracketed target]}."""
    times = equal_error_times(rows)
    out: dict[tuple[str, str], list[float]] = {}
    for prob in dict.fromkeys(r.problem for r in rows):
        for key, peer, ours, _ in PAIRS:
            out[(prob, key)] = [
                times[(prob, peer, tg)] / times[(prob, ours, tg)]
                for tg in TARGETS
                if (prob, peer, tg) in times and (prob, ours, tg) in times
            ]
    return out


def summary(rows: list[Row]) -> list[dict]:
    """Per problem, the geometric mean over the bracketed target errors of the peer's time over
    neuralode's at equal gradient error (None where no target is bracketed by both)."""
    ratios = _pair_ratios(rows)
    result = []
    for prob in dict.fromkeys(r.problem for r in rows):
        entry: dict = {"problem": prob}
        for key, *_ in PAIRS:
            rs = ratios[(prob, key)]
            entry[key] = math.exp(sum(map(math.log, rs)) / len(rs)) if rs else None
        result.append(entry)
    return result


def print_summary(rows: list[Row], out=sys.stdout) -> None:
    print(
        "\n### Summary: geometric mean over target errors of peer / neuralode time at equal "
        "gradient error\n",
        file=out,
    )
    heads = [
        f"{peer} / {ours}" + (f" (target >= {tg:g}x)" if tg else "") for _, peer, ours, tg in PAIRS
    ]
    print("| problem | " + " | ".join(heads) + " |", file=out)
    print("|---|" + "---:|" * len(PAIRS), file=out)
    ratios = _pair_ratios(rows)
    for entry in summary(rows):
        cells = []
        for key, *_ in PAIRS:
            v, n = entry[key], len(ratios[(entry["problem"], key)])
            cells.append("n/a" if v is None else f"{v:.2f} ({n} target{'s' if n > 1 else ''})")
        print(f"| {entry['problem']} | " + " | ".join(cells) + " |", file=out)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 tolerances, 1 repeat (< 1 min)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="CI smoke run: mlp_d2, batch 16, 4 outputs, tolerances 1e-3 and 1e-5, 1 repeat",
    )
    parser.add_argument(
        "--problems", nargs="+", choices=["mlp_d2", "mlp_d64"], default=["mlp_d2", "mlp_d64"]
    )
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--outputs", type=int, default=None, help="output times (default 10)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (perf_counter, default) or this process's CPU time (process_time: "
        "steadier on a shared, loaded machine)",
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
    parser.add_argument(
        "--large-torchode-backsolve",
        dest="large",
        action="store_true",
        help="run torchode's BacksolveAdjoint on mlp_d64 too (15-40 s per gradient on one core: "
        "its adjoint state holds every parameter's adjoint per sample)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        tols, problems, batch, n_out = TINY_TOLS, ["mlp_d2"], args.batch or 16, args.outputs or 4
    else:
        tols = QUICK_TOLS if args.quick else FULL_TOLS
        problems, batch, n_out = args.problems, args.batch or 256, args.outputs or 10
    fast = args.quick or args.tiny
    repeats = args.repeats or (1 if fast else 7)
    budget = args.budget if args.budget is not None else (0.3 if fast else 1.0)

    print(
        f"# Gradient work-precision (dopri5, forward + backward): neuralode "
        f"{neuralode.__version__}, torchdiffeq {getattr(torchdiffeq, '__version__', 'missing')}, "
        f"torchode {getattr(torchode, '__version__', 'missing')}, torch {torch.__version__}; "
        f"dtype {args.dtype}, threads {args.threads}, {args.clock} clock, atol = rtol, median of "
        f"up to {repeats} after a warm-up"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    for name in problems:
        prob = make_problem(name, batch, n_out)
        compute_reference(prob)
        setup = Setup(prob, dtype)
        n_params = sum(p.numel() for p in prob.field.parameters())
        skip: dict[str, str] = {}  # configuration -> why it is not run on this problem
        for cfg in CONFIGS:
            if not _installed(cfg):
                skip[cfg.name] = "not installed"
            elif cfg.name == "torchode backsolve" and batch * n_params > LARGE and not args.large:
                skip[cfg.name] = (
                    f"skipped: B x P = {batch} x {n_params} (--large-torchode-backsolve)"
                )
        for cfg in CONFIGS:  # warm every configuration up on this problem (allocator, caches)
            if cfg.name not in skip:
                row = measure(prob, setup, cfg, tols[0], 0, 0.0, clock)
                if row.note:  # fails at the loosest tolerance: not run further
                    skip[cfg.name] = row.note
        prob_rows = []
        for tol in tols:
            for cfg in CONFIGS:
                if cfg.name in skip:
                    prob_rows.append(Row(prob.name, cfg.family, cfg.name, tol, note=skip[cfg.name]))
                else:
                    prob_rows.append(measure(prob, setup, cfg, tol, repeats, budget, clock))
        print_table(prob_rows, prob)
        sys.stdout.flush()
        rows.extend(prob_rows)
    print_equal_error(rows)
    print_summary(rows)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
