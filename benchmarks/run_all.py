"""One command for the whole comparison of issue #6: runs the benchmarks and checks the targets.

``python benchmarks/run_all.py`` runs, one after the other (each prints its own report):

- ``work_precision.py`` with dopri5 on mlp_d2, mlp_d64, lorenz and arenstorf in float64, with
  dopri5 on the two MLP problems in float32 (tolerances 1e-3..1e-6: below that float32 errors
  stop falling) and with dopri8 on lorenz and arenstorf (against scipy's DOP853);
- ``gradients.py`` (gradient work-precision, float64, both MLP problems);
- ``per_sample.py`` with d = 2 and d = 64;
- a small ``torch.compile`` measurement: a batch-256 mlp_d64 float32 dopri5 solve at
  rtol = atol = 1e-6 (``neuralode.odeint`` under ``no_grad``) with the vector field compiled by
  ``torch.compile(f, fullgraph=True)`` against the eager field, median of interleaved repeats
  after a warm-up;

then prints one markdown table, "Targets of issue #6", that compares what was measured with the
targets below (``TARGETS``). Every number in it is computed from the rows the scripts' ``main``
functions return (no solve is repeated):

- forward and gradient ratios are ``peer time / neuralode time`` at equal (worst-case) error: the
  log-log interpolation of each library's work-precision points at the errors 1e-3, 1e-5 and
  1e-7, geometric mean over the targets both ladders bracket (where none is bracketed, at the
  geometric middle of the error range both cover, and the cell says so);
- overhead is ``time / (NFE x t_f)`` of neuralode's dopri5 solve at tolerance 1e-6 (the nearest
  tolerance run if there is none), with the range over the tolerance ladder; ``t_f`` is the time
  of one call of the vector field alone, measured here after each work-precision run in the way
  work_precision.py measures it (best of 7 batches of 50 calls);
- on Lorenz (chaotic: errors at t = 10 are O(1)) scipy's time over neuralode's at matching NFE
  (scipy's time interpolated log-log at neuralode's NFE: equal to the ratio of times per
  evaluation); on Arenstorf at equal error. Above 1: neuralode is no slower;
- per-sample control: the largest share of sample-evaluations spent on samples that had already
  finished, over the tolerances run.
- issue #12 (``training.py``): the training step of a spiral neural ODE (``odeint``,
  ``odeint_adjoint``, ``compile=True`` and ``compile=True`` with the backsolve adjoint against
  torchdiffeq: torchdiffeq time / neuralode time) and the fixed-step Euler sampling loop, eager
  and ``compile=True`` (neuralode time / a hand-written loop).

A header describes the machine (CPU, cores, load, library versions, threads, dtypes, date).
``--tiny`` runs every script in its ``--tiny`` mode (seconds; the compile measurement only with
``--compile``): it exists so that CI runs this code path, and its numbers are not measurements.
``--out FILE`` also writes the header and the table to FILE as markdown. ``main(argv)`` returns
the table's rows as dicts (keys ``key, target, workload, measured, goal, met, cell``).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the sibling scripts, when imported from elsewhere (tests)
    sys.path.insert(0, HERE)

import gradients  # noqa: E402
import per_sample  # noqa: E402
import training  # noqa: E402
import work_precision as wp  # noqa: E402

import neuralode  # noqa: E402


# --------------------------------------------------------------------------- targets (data)
@dataclass(frozen=True)
class Target:
    name: str  # the table's "target" column
    goal: float | None  # None: reported, no target value
    sense: str  # ">=" (a ratio, higher is better) or "<=" (lower is better)
    unit: str = "x"


TARGETS = {
    "forward_torchdiffeq": Target("forward solve vs torchdiffeq 0.2.5 (equal error)", 3.0, ">="),
    "forward_torchode": Target("forward solve vs torchode 1.0.1 (equal error)", 2.0, ">="),
    "overhead": Target("overhead: wall / (NFE x t_f)", 1.5, "<=", ""),
    "backsolve": Target("gradients: Backsolve vs torchdiffeq odeint_adjoint", 3.0, ">="),
    "direct": Target("gradients: Direct vs torchdiffeq odeint", 2.0, ">="),
    "lorenz": Target("tiny system Lorenz: scipy / neuralode per NFE", 1.0, ">="),
    "arenstorf": Target("tiny system Arenstorf: scipy / neuralode (equal error)", 1.0, ">="),
    "per_sample": Target("per-sample control: evaluations on finished samples", 0.10, "<=", "%"),
    "compile_field": Target("torch.compile of the vector field: gain", None, ">="),
    "compile_step": Target("torch.compile of the step: gain", None, ">="),
    # issue #12: the training step and the sampling loop (benchmarks/training.py)
    "train_direct": Target("training step: odeint vs torchdiffeq odeint", 3.0, ">="),
    "train_adjoint": Target("training step: odeint_adjoint vs torchdiffeq's", 3.0, ">="),
    "train_compiled": Target("training step: compile=True vs torchdiffeq odeint", 10.0, ">="),
    "train_compiled_adjoint": Target(
        "training step: compile=True backsolve vs torchdiffeq odeint_adjoint", 10.0, ">="
    ),
    "euler_loop": Target("Euler sampling loop: time / hand-written loop", 1.10, "<=", ""),
    # (faster than the loop: below 1; the table compares with <=)
    "euler_compiled": Target(
        "Euler sampling, compile=True: time / hand-written loop", 1.0, "<=", ""
    ),
}
FORWARD_WORKLOADS = ("mlp_d2", "mlp_d64")
FORWARD_TARGETS = (1e-3, 1e-5, 1e-7)  # as work_precision.print_equal_error
OVERHEAD_TOL = 1e-6
FLOAT32_TOLS = ["1e-3", "1e-4", "1e-5", "1e-6"]
SCIPY_LABEL = {"dopri5": "RK45", "dopri8": "DOP853"}
COMPILE_TOL = 1e-6


def target_row(key: str, workload: str, measured: float | None, cell: str) -> dict:
    """One row of the final table; ``met`` is yes/no against the target, n/a without one."""
    tg = TARGETS[key]
    if tg.goal is None:
        goal, met = "report", "n/a"
    else:
        goal = f"{tg.sense} {_fmt_value(tg.goal, tg.unit)}"
        if measured is None or not math.isfinite(measured):
            met = "n/a"
        else:
            ok = measured >= tg.goal if tg.sense == ">=" else measured <= tg.goal
            met = "yes" if ok else "no"
    return dict(
        key=key, target=tg.name, workload=workload, measured=measured, goal=goal, met=met, cell=cell
    )


def _fmt_value(v: float, unit: str) -> str:
    if unit == "%":
        return f"{100 * v:.1f}%"
    return f"{v:.2f}{unit}" if v < 100 else f"{v:.0f}{unit}"


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


# --------------------------------------------------------------------------- equal-error ratios
def ratio_at_equal_error(
    peer: list[tuple[float, float]], ours: list[tuple[float, float]], targets=FORWARD_TARGETS
) -> tuple[float | None, str]:
    """Geometric mean over the bracketed ``targets`` of peer time / our time at equal error,
    from (error, time) points (``work_precision._time_at_error``); where no target is bracketed
    by both, at the geometric middle of the error range both ladders cover."""
    ratios = []
    for target in targets:
        a, b = wp._time_at_error(peer, target), wp._time_at_error(ours, target)
        if a is not None and b is not None:
            ratios.append(a / b)
    if ratios:
        n = len(ratios)
        return _geomean(ratios), f"{n} error target{'s' if n > 1 else ''}"
    pe = [e for e, s in peer if e > 0 and s > 0]
    oe = [e for e, s in ours if e > 0 and s > 0]
    if len(pe) < 2 or len(oe) < 2:
        return None, "too few points"
    lo, hi = max(min(pe), min(oe)), min(max(pe), max(oe))
    if lo > hi:
        return None, "error ranges do not overlap"
    target = math.sqrt(lo * hi)
    a, b = wp._time_at_error(peer, target), wp._time_at_error(ours, target)
    if a is None or b is None:
        return None, "error ranges do not overlap"
    bracket = "/".join(f"{t:.0e}" for t in targets)
    return a / b, f"at error {target:.1e}: none of {bracket} bracketed"


def ratio_at_matching_nfe(peer_rows: list, our_rows: list) -> tuple[float | None, str]:
    """Peer time / our time at our NFE (peer's time interpolated log-log in NFE), geometric mean
    over our points inside the peer's NFE range; else the ratio of times per NFE at the same
    tolerance."""
    peer = [(float(r.nfe), r.time) for r in peer_rows]
    ratios = []
    for r in our_rows:
        s = wp._time_at_error(peer, float(r.nfe))
        if s is not None:
            ratios.append(s / r.time)
    if ratios:
        n = len(ratios)
        return _geomean(ratios), f"{n} matched NFE{'s' if n > 1 else ''}"
    by_tol = {r.tol: r for r in peer_rows}
    per = [
        (by_tol[r.tol].time / by_tol[r.tol].nfe) / (r.time / r.nfe)
        for r in our_rows
        if r.tol in by_tol
    ]
    return _geomean(per), "per NFE at equal tolerance (no NFE overlap)"


def _wp_points(rows: list, problem: str, method: str, library: str) -> list[tuple[float, float]]:
    return [
        (r.err, r.time)
        for r in rows
        if r.problem == problem and r.method == method and r.library == library and r.time
    ]


def _wp_rows(rows: list, problem: str, method: str, library: str) -> list:
    return [
        r
        for r in rows
        if r.problem == problem and r.method == method and r.library == library and r.time
    ]


def _ratio_cell(value: float | None, note: str) -> str:
    return f"n/a ({note})" if value is None else f"{value:.2f}x ({note})"


# --------------------------------------------------------------------------- target rows
def forward_rows(wp_runs: dict[str, list], installed: dict[str, bool]) -> list[dict]:
    out = []
    for key, peer in (("forward_torchdiffeq", "torchdiffeq"), ("forward_torchode", "torchode")):
        for dtype in ("float64", "float32"):
            rows = wp_runs.get(f"dopri5 {dtype}", [])
            for prob in FORWARD_WORKLOADS:
                workload = f"{prob}, {dtype}, dopri5"
                if not installed[peer]:
                    out.append(target_row(key, workload, None, f"n/a ({peer} not installed)"))
                    continue
                value, note = ratio_at_equal_error(
                    _wp_points(rows, prob, "dopri5", peer),
                    _wp_points(rows, prob, "dopri5", "neuralode"),
                )
                out.append(target_row(key, workload, value, _ratio_cell(value, note)))
    return out


def overhead_rows(wp_runs: dict[str, list], f_costs: dict[tuple[str, str], float]) -> list[dict]:
    out = []
    for dtype in ("float64", "float32"):
        rows = wp_runs.get(f"dopri5 {dtype}", [])
        for prob in FORWARD_WORKLOADS:
            workload = f"{prob}, {dtype}, dopri5"
            ours = _wp_rows(rows, prob, "dopri5", "neuralode")
            t_f = f_costs.get((prob, dtype))
            if not ours or not t_f:
                out.append(target_row("overhead", workload, None, "n/a (no neuralode rows)"))
                continue
            ratio = {r.tol: r.time / (r.nfe * t_f) for r in ours}
            tol = min(ratio, key=lambda x: abs(math.log(x / OVERHEAD_TOL)))
            cell = (
                f"{ratio[tol]:.2f} at tol {tol:.0e} (ladder {min(ratio.values()):.2f}-"
                f"{max(ratio.values()):.2f}; t_f {t_f * 1e6:.0f} us)"
            )
            out.append(target_row("overhead", workload, ratio[tol], cell))
    return out


def gradient_rows(rows: list, installed: dict[str, bool]) -> list[dict]:
    out = []
    pairs = (
        ("backsolve", "torchdiffeq odeint_adjoint", "neuralode Backsolve"),
        ("direct", "torchdiffeq odeint", "neuralode Direct"),
    )
    problems = list(dict.fromkeys(r.problem for r in rows))
    for key, peer, ours in pairs:
        for prob in problems:
            workload = f"{prob}, float64, dopri5"
            if not installed["torchdiffeq"]:
                out.append(target_row(key, workload, None, "n/a (torchdiffeq not installed)"))
                continue

            def pts(config, prob=prob):
                return [
                    (r.err, r.time)
                    for r in rows
                    if r.problem == prob and r.config == config and r.time and r.err is not None
                ]

            value, note = ratio_at_equal_error(pts(peer), pts(ours), gradients.TARGETS)
            out.append(target_row(key, workload, value, _ratio_cell(value, note)))
    return out


def tiny_system_rows(wp_runs: dict[str, list]) -> list[dict]:
    """scipy / neuralode on the tiny systems: neuralode's compiled stepping (solve(...,
    compile=True), made for them) where it ran, with the eager engine's ratio beside it."""
    out = []
    for method, run in (("dopri5", "dopri5 float64"), ("dopri8", "dopri8 float64")):
        rows = wp_runs.get(run, [])
        label = f"{method} vs scipy {SCIPY_LABEL[method]}"
        for prob in ("lorenz", "arenstorf"):
            cells = {}
            for lib in ("neuralode compiled", "neuralode"):
                if prob == "lorenz":
                    scipy_rows = _wp_rows(rows, prob, method, "scipy")
                    our_rows = _wp_rows(rows, prob, method, lib)
                    if scipy_rows and our_rows:
                        cells[lib] = ratio_at_matching_nfe(scipy_rows, our_rows)
                else:
                    value, note = ratio_at_equal_error(
                        _wp_points(rows, prob, method, "scipy"), _wp_points(rows, prob, method, lib)
                    )
                    if value is not None:
                        cells[lib] = (value, note)
            if not cells:
                out.append(target_row(prob, f"{prob}, {label}", None, "n/a (no rows)"))
                continue
            best = "neuralode compiled" if "neuralode compiled" in cells else "neuralode"
            value, note = cells[best]
            cell = _ratio_cell(value, f"{best}; {note}")
            if best != "neuralode" and "neuralode" in cells:
                cell += f"; eager engine {cells['neuralode'][0]:.2f}x"
            out.append(target_row(prob, f"{prob}, {label}", value, cell))
    return out


def per_sample_rows(runs: dict[int, list[dict]]) -> list[dict]:
    out = []
    for d, rows in runs.items():
        ours = [r for r in rows if r["lib"] == "neuralode per-sample"]
        workload = f"per_sample.py d={d}, dopri5"
        if not ours:
            out.append(target_row("per_sample", workload, None, "n/a (no rows)"))
            continue
        worst = max(ours, key=lambda r: r["waste"])
        cell = (
            f"{100 * worst['waste']:.1f}% (worst of tol "
            + ", ".join(f"{r['tol']:.0e}" for r in ours)
            + "; peers: "
            + ", ".join(
                f"{r['lib']} {100 * r['waste']:.0f}%"
                for r in rows
                if r["lib"] != "neuralode per-sample" and r["tol"] == worst["tol"]
            )
            + ")"
        )
        out.append(target_row("per_sample", workload, worst["waste"], cell))
    return out


# --------------------------------------------------------------------------- torch.compile
def measure_compile(clock: Callable[[], float], repeats: int = 5) -> tuple[float | None, str]:
    """Eager time / compiled time of a batch-256 mlp_d64 float32 dopri5 solve (the vector field
    compiled with ``torch.compile(f, fullgraph=True)``); the error text if compiling fails."""
    prob = wp.make_problems(torch.float32)["mlp_d64"]()
    y0 = torch.tensor(prob.y0, dtype=torch.float32)
    t = torch.tensor(prob.t, dtype=torch.float64)

    def solve(f) -> float:
        start = clock()
        with torch.no_grad():
            neuralode.odeint(f, y0, t, rtol=COMPILE_TOL, atol=COMPILE_TOL, method="dopri5")
        return clock() - start

    start = time.perf_counter()
    try:
        compiled = torch.compile(prob.f_torch, fullgraph=True)
        solve(compiled)  # compiles
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        text = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return None, "compile failed: " + text.replace("|", "\\|")
    compile_s = time.perf_counter() - start
    solve(prob.f_torch)  # warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):  # interleaved: a change of machine load affects both alike
        times["eager"].append(solve(prob.f_torch))
        times["compiled"].append(solve(compiled))
    eager, comp = (statistics.median(times[k]) for k in ("eager", "compiled"))
    gain = eager / comp
    return gain, (
        f"{gain:.2f}x (eager {eager * 1e3:.1f} ms, compiled {comp * 1e3:.1f} ms; "
        f"first call with compilation {compile_s:.1f} s)"
    )


def compile_rows(args, clock, wp_runs: dict[str, list]) -> list[dict]:
    workload = f"mlp_d64, float32, batch 256, dopri5, tol {COMPILE_TOL:.0e}"
    if args.tiny and not args.compile:
        rows = [target_row("compile_field", workload, None, "skipped (--tiny; add --compile)")]
    else:
        gain, cell = measure_compile(clock)
        rows = [target_row("compile_field", workload, gain, cell)]
    # The compiled step (solve(..., compile=True)): eager / compiled time per NFE on Lorenz,
    # from the work-precision rows (geometric mean over the tolerances both ran).
    rows_wp = wp_runs.get("dopri5 float64", [])
    eager = {r.tol: r.time / r.nfe for r in _wp_rows(rows_wp, "lorenz", "dopri5", "neuralode")}
    comp = {
        r.tol: r.time / r.nfe for r in _wp_rows(rows_wp, "lorenz", "dopri5", "neuralode compiled")
    }
    common = sorted(set(eager) & set(comp))
    step_workload = "lorenz, float64, dopri5, solve(..., compile=True)"
    if common:
        gain = math.exp(statistics.fmean(math.log(eager[x] / comp[x]) for x in common))
        cell = (
            f"{gain:.2f}x per NFE ({len(common)} tolerances; compiled "
            f"{statistics.fmean(comp[x] for x in common) * 1e6:.1f} us/NFE, eager "
            f"{statistics.fmean(eager[x] for x in common) * 1e6:.1f} us/NFE)"
        )
        rows.append(target_row("compile_step", step_workload, gain, cell))
    else:
        why = "skipped (--tiny; add --compile)" if args.tiny else "n/a (no compiled rows)"
        rows.append(target_row("compile_step", step_workload, None, why))
    return rows


def training_target_rows(rows: list[dict]) -> list[dict]:
    """The issue-#12 rows from benchmarks/training.py's rows."""
    by = {r["name"]: r for r in rows}
    spec = [
        ("train_direct", "training step: neuralode odeint", "spiral, batch 16, dopri5 1e-6, fp32"),
        ("train_adjoint", "training step: neuralode odeint_adjoint", "spiral, adjoint"),
        ("train_compiled", "training step: neuralode compile=True", "spiral, compile=True"),
        (
            "train_compiled_adjoint",
            "training step: neuralode compile=True adjoint",
            "spiral, compile=True, gradient='backsolve'",
        ),
        ("euler_loop", "euler sampling: neuralode odeint euler", "Euler 50 steps, batch 256"),
        (
            "euler_compiled",
            "euler sampling: neuralode solve euler compile=True",
            "Euler 50 steps, batch 256, compile=True",
        ),
    ]
    out = []
    for key, name, workload in spec:
        r = by.get(name)
        if r is None:
            out.append(target_row(key, workload, None, "not run"))
            continue
        cell = f"{r['ratio']:.2f}x ({r['ms']:.1f} ms{'; ' + r['note'] if r['note'] else ''})"
        out.append(target_row(key, workload, r["ratio"], cell))
    return out


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(module) -> str:
    return getattr(module, "__version__", "missing") if module is not None else "missing"


def machine_header(args, dtypes: list[str]) -> list[str]:
    """Markdown lines describing the machine and the software."""
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        load = "unknown"
    import scipy

    versions = (
        f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"torchdiffeq {_version(wp.torchdiffeq)}, torchode {_version(wp.torchode)}, "
        f"neuralode {neuralode.__version__}, Python {platform.python_version()}"
    )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "--tiny (a smoke run, not a measurement)" if args.tiny else "full"
    return [
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} "
        f"{platform.machine()}; load average (1, 5, 15 min) at start: {load}",
        f"- Software: {versions}",
        f"- Settings: {args.threads} torch thread(s), {args.clock} clock, dtypes "
        f"{', '.join(dtypes)}; run mode {mode}; date {now}",
    ]


# --------------------------------------------------------------------------- table
def format_table(rows: list[dict], tiny: bool) -> list[str]:
    lines = ["## Targets of issue #6", ""]
    if tiny:
        lines += [
            "**--tiny run: a smoke test of the code path (two tolerances, one repeat, small "
            "batches). Its numbers are not measurements, and the met? column means nothing.**",
            "",
        ]
    lines += [
        "| target | workload | measured | target value | met? |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['workload']} | {r['cell']} | {r['goal']} | {r['met']} |"
        )
    return lines


# --------------------------------------------------------------------------- runs
def plan(args) -> dict[str, tuple[Callable, list[str]]]:
    """{run name: (main, argv)} of the sub-scripts."""
    common = ["--threads", str(args.threads), "--clock", args.clock]
    tiny = ["--tiny"] if args.tiny else []
    f32_tols = [] if args.tiny else ["--tols", *FLOAT32_TOLS]
    # solve(..., compile=True) on the tiny systems: always in a full run, under --tiny only with
    # --compile (each (problem, method) compiles once, ~35 s on 2 cores).
    compiled = ["--compiled", "on"] if (args.compile or not args.tiny) else []
    mlps = list(FORWARD_WORKLOADS)
    runs = {
        "dopri5 float64": (wp.main, ["--methods", "dopri5", "--dtype", "float64", *compiled]),
        "dopri8 float64": (
            wp.main,
            ["--methods", "dopri8", "--problems", "lorenz", "arenstorf", *compiled],
        ),
        "dopri5 float32": (
            wp.main,
            ["--methods", "dopri5", "--dtype", "float32", "--problems", *mlps, *f32_tols],
        ),
        "gradients": (gradients.main, []),
        "per_sample d=2": (per_sample.main, ["--d", "2"]),
        "training": (
            training.main,
            [] if (args.compile or not args.tiny) else ["--compiled", "off"],
        ),
    }
    if not args.tiny:
        runs["per_sample d=64"] = (per_sample.main, ["--d", "64"])
    return {name: (fn, argv + tiny + common) for name, (fn, argv) in runs.items()}


def measure_f_costs(dtype: str, clock) -> dict[tuple[str, str], float]:
    """Seconds per call of each MLP field alone, as work_precision.Problem.measure_f_cost."""
    out = {}
    factories = wp.make_problems(getattr(torch, dtype))
    for name in FORWARD_WORKLOADS:
        prob = factories[name]()
        prob.measure_f_cost(getattr(torch, dtype), clock)
        out[(name, dtype)] = prob.f_cost["torch"]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="CI smoke run of every script (seconds; no numbers)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the torch.compile measurements (compiled field, compiled stepping) under "
        "--tiny too",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to FILE")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time (perf_counter) or this process's CPU time (process_time: steadier on a "
        "loaded machine)",
    )
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    start = time.perf_counter()
    header = machine_header(args, ["float64", "float32"])
    print("# neuralode benchmarks: run_all.py\n")
    print("\n".join(header))
    sys.stdout.flush()

    installed = {"torchdiffeq": wp.torchdiffeq is not None, "torchode": wp.torchode is not None}
    wp_runs: dict[str, list] = {}
    ps_runs: dict[int, list[dict]] = {}
    grad_rows: list = []
    train_rows: list = []
    f_costs: dict[tuple[str, str], float] = {}
    for name, (fn, sub_argv) in plan(args).items():
        print(f"\n\n## {name}: {Path(fn.__code__.co_filename).name} {' '.join(sub_argv)}\n")
        sys.stdout.flush()
        rows = fn(sub_argv)
        if fn is wp.main:
            wp_runs[name] = rows
            dtype = name.split()[1]
            if name.startswith("dopri5"):
                f_costs.update(measure_f_costs(dtype, clock))
        elif fn is gradients.main:
            grad_rows = rows
        elif fn is training.main:
            train_rows = rows
        else:
            ps_runs[int(name.split("=")[1])] = rows
        sys.stdout.flush()

    torch.set_num_threads(args.threads)
    results = (
        forward_rows(wp_runs, installed)
        + overhead_rows(wp_runs, f_costs)
        + gradient_rows(grad_rows, installed)
        + tiny_system_rows(wp_runs)
        + per_sample_rows(ps_runs)
        + compile_rows(args, clock, wp_runs)
        + training_target_rows(train_rows)
    )
    total = time.perf_counter() - start
    command = " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        ["# neuralode benchmarks: run_all.py", ""]
        + header
        + [""]
        + format_table(results, args.tiny)
        + [
            "",
            f"Total runtime {total:.0f} s. Reproduce: `{command}`.",
        ]
    )
    print("\n\n" + "\n".join(text[2:]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(text) + "\n")
    return results


if __name__ == "__main__":
    main()
