"""Memory and time of the gradient methods as the number of solver steps grows.

An MLP vector field ``f(t, y) = MLP(y)`` (``d -> hidden -> d``, tanh) on a batch of states is
integrated over ``t in [0, 1]`` with fixed steps of Kutta's 3/8 rule (neuralode ``"rk38"``,
torchdiffeq ``"rk4"``: the same method) and ``dt = 1 / n``; the loss is a fixed random linear
function of ``y(1)``. For each gradient method and ``n`` the script reports, for one
forward + backward:

- **autograd MiB**: bytes of the distinct tensor storages saved for backward during the forward
  pass (counted with :func:`torch.autograd.graph.saved_tensors_hooks`). This is the graph that
  Direct keeps; it does not see states stored outside autograd (Checkpointed's checkpoints).
- **peak RSS MiB**: growth of the process's peak resident set size
  (``resource.getrusage(...).ru_maxrss``) over a warmed-up baseline. Each method runs in a fresh
  subprocess with ``n`` increasing, so the peak at ``n`` is the peak of that run; this includes
  checkpoints, the backward pass and allocator overhead. On a CUDA device (``--device cuda``)
  ``torch.cuda.max_memory_allocated`` is reported instead.
- **time s**: best wall time of forward + backward over ``--repeat`` runs (one run for
  ``n > 100``), on ``--threads`` CPU threads.
- **grad err**: relative max-norm error of the gradient (parameters and y0) against a float64
  dopri8 solve at rtol = atol = 1e-12 (so it mixes discretisation and, for Backsolve, the
  continuous-versus-discrete difference).
- **x torchdiffeq**: time ratio to the torchdiffeq counterpart (``odeint`` for Direct and
  Checkpointed, ``odeint_adjoint`` for Backsolve and Reversible).

``Checkpointed(16)`` bounds the stored states to 16 (recomputing the dropped ones in the backward
pass); ``Checkpointed(sqrt n)`` to ``isqrt(n)``, the two-level choice that holds the fewest
states (``k`` checkpoints plus a replayed segment of about ``n / k``). ``Reversible`` solves
with McCallum & Foster's reversible version of the method (two method steps per step, coupling
0.999, restarts where the two states drift apart): its gradient is exact for that scheme, whose
solution differs from plain rk 3/8 at the same steps, so its ``grad err`` is measured against
the same reference as the others. When Reversible runs, a second table puts it side by side
with the exact methods of bounded memory: its time over theirs (above 1: Reversible is slower)
and every method's peak memory. ``--clock cpu`` times process CPU time instead of wall time
(steadier on a loaded machine, with ``--threads 1``).

Usage::

    python benchmarks/gradients_memory.py                # float32, d = 16, n up to 10000
    python benchmarks/gradients_memory.py --max-direct-steps 10000   # Direct at 10000 too
    python benchmarks/gradients_memory.py --dtype float64 --dim 2 --steps 10 100 1000
    python benchmarks/gradients_memory.py --steps 1000 4000 10000 --clock cpu \
        --methods checkpoint checkpoint16 checkpoint_sqrt reversible backsolve

Needs ``torchdiffeq`` (``pip install neuralode[bench]``); without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

METHODS = [
    "direct",
    "backsolve",
    "checkpoint",
    "checkpoint16",
    "checkpoint_sqrt",
    "reversible",
    "torchdiffeq",
    "torchdiffeq_adjoint",
]
LABELS = {
    "direct": "neuralode Direct",
    "backsolve": "neuralode Backsolve",
    "checkpoint": "neuralode Checkpointed",
    "checkpoint16": "neuralode Checkpointed(16)",
    "checkpoint_sqrt": "neuralode Checkpointed(sqrt n)",
    "reversible": "neuralode Reversible",
    "torchdiffeq": "torchdiffeq odeint",
    "torchdiffeq_adjoint": "torchdiffeq odeint_adjoint",
}
PEER = {
    "direct": "torchdiffeq",
    "checkpoint": "torchdiffeq",
    "checkpoint16": "torchdiffeq",
    "checkpoint_sqrt": "torchdiffeq",
    "backsolve": "torchdiffeq_adjoint",
    "reversible": "torchdiffeq_adjoint",
}


# --------------------------------------------------------------------------- worker side
def _build(args, dtype, device):
    import torch
    from torch import nn

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(args.dim, args.hidden), nn.Tanh(), nn.Linear(args.hidden, args.dim)
            )

        def forward(self, t, y):
            return self.net(y)

    # Drawn in float64 on the CPU, then cast: every dtype and device sees the same problem.
    torch.manual_seed(args.seed)
    func = Field().double().to(device=device, dtype=dtype)
    y0 = torch.randn(args.batch, args.dim, dtype=torch.float64).to(device=device, dtype=dtype)
    c = torch.randn(args.batch, args.dim, dtype=torch.float64).to(device=device, dtype=dtype)
    return func, y0, c


def _solve_fn(method: str, n: int):
    """A function (func, y0) -> y(1) for ``method`` with ``n`` fixed steps."""
    import torch

    import neuralode as no

    def t_of(y0):
        return torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)

    if not method.startswith("torchdiffeq"):  # neuralode's methods
        grad = {
            "direct": no.Direct(),
            "backsolve": no.Backsolve(),
            "checkpoint": no.Checkpointed(),
            "checkpoint16": no.Checkpointed(max_checkpoints=16),
            # Two-level checkpointing stores at most k states and replays a segment of about
            # n / k states at a time: k = sqrt(n) minimises the states held (about 2 sqrt(n)).
            "checkpoint_sqrt": no.Checkpointed(max_checkpoints=max(2, math.isqrt(n))),
            "reversible": no.Reversible(),
        }[method]

        def run(func, y0):
            return no.solve(func, y0, t_of(y0), solver="rk38", dt=1.0 / n, gradient=grad).ys[-1]

        return run
    import torchdiffeq

    fn = torchdiffeq.odeint if method == "torchdiffeq" else torchdiffeq.odeint_adjoint

    def run_td(func, y0):
        return fn(func, y0, t_of(y0), method="rk4", options=dict(step_size=1.0 / n))[-1]

    return run_td


def _reference_grad(args, device):
    """Gradient of the loss at float64, dopri8, rtol = atol = 1e-12. Checkpointed (exact for
    the discrete solve) keeps the peak memory of this process low before the baseline."""
    import torch

    import neuralode as no

    func, y0, c = _build(args, torch.float64, device)
    y0.requires_grad_()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    yT = no.solve(func, y0, t, solver="dopri8", rtol=1e-12, atol=1e-12, gradient="checkpoint").ys[
        -1
    ]
    grads = torch.autograd.grad((yT * c).sum(), [y0, *func.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _one(args, method, n, dtype, device, ref, clock=time.perf_counter):
    """One forward + backward; returns (time, autograd bytes, gradient error)."""
    import torch

    func, y0, c = _build(args, dtype, device)
    y0.requires_grad_()
    run = _solve_fn(method, n)
    saved: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return x

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        yT = run(func, y0)
    loss = (yT * c).sum()
    grads = torch.autograd.grad(loss, [y0, *func.parameters()], allow_unused=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = clock() - t0
    g = torch.cat(
        [
            (torch.zeros_like(x) if gx is None else gx).reshape(-1).double()
            for gx, x in zip(grads, [y0, *func.parameters()])
        ]
    )
    err = float((g - ref).abs().max() / ref.abs().max())
    return elapsed, sum(saved.values()), err


def worker(args) -> None:
    """Run one method at one dtype for increasing n; print one JSON line per n."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    method = args.worker
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ref = _reference_grad(args, device)
    _one(args, method, 3, dtype, device, ref)  # warm up kernels and the allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_bytes(device)
    for n in sorted(args.steps):
        if n > args.max_steps.get(method, math.inf):
            print(json.dumps(dict(method=method, n=n, skipped=True)), flush=True)
            continue
        repeat = args.repeat if n <= 100 else 1  # long runs are timed once
        times = []
        for _ in range(repeat):
            el, saved, err = _one(args, method, n, dtype, device, ref, clock)
            times.append(el)
        peak = _peak_bytes(device) - base
        print(
            json.dumps(dict(method=method, n=n, time=min(times), saved=saved, peak=peak, err=err)),
            flush=True,
        )


# --------------------------------------------------------------------------- driver side
def _have_torchdiffeq() -> bool:
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return False
    return True


def _run_worker(args, method: str, dtype: str) -> list[dict]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--dtype",
        dtype,
        "--dim",
        str(args.dim),
        "--hidden",
        str(args.hidden),
        "--batch",
        str(args.batch),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--repeat",
        str(args.repeat),
        "--device",
        args.device,
        "--clock",
        args.clock,
        "--steps",
        *map(str, args.steps),
        "--max-direct-steps",
        str(args.max_direct_steps),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"worker {method} ({dtype}) failed")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}" if b < 2**30 * 100 else f"{b / 2**30:.1f} GiB"


def table(rows: list[dict], dtype: str, args) -> str:
    by = {(r["method"], r["n"]): r for r in rows}
    lines = [
        f"**{dtype}**, d = {args.dim}, hidden {args.hidden}, batch {args.batch}, rk 3/8 "
        f"(4 stages) with dt = 1/n on [0, 1], {args.threads} thread(s)",
        "",
        "| method | n steps | autograd MiB | peak RSS MiB | time s | x torchdiffeq | grad err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    mem_label = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    lines[2] = lines[2].replace("peak RSS MiB", mem_label)
    for m in METHODS:
        for n in sorted(args.steps):
            r = by.get((m, n))
            if r is None:
                continue
            if r.get("skipped"):
                lines.append(
                    f"| {LABELS[m]} | {n} | skipped (n > --max-direct-steps; grows "
                    "linearly) | | | | |"
                )
                continue
            peer = by.get((PEER.get(m), n))
            ratio = (
                f"{r['time'] / peer['time']:.2f}"
                if peer is not None and not peer.get("skipped") and peer["time"] > 0
                else "-"
            )
            lines.append(
                f"| {LABELS[m]} | {n} | {_mib(r['saved'])} | {_mib(max(r['peak'], 0))} | "
                f"{r['time']:.3f} | {ratio} | {r['err']:.1e} |"
            )
    return "\n".join(lines)


def reversible_table(rows: list[dict], args) -> str:
    """Reversible against the exact methods of bounded memory, side by side per n: time ratios
    (> 1: Reversible is slower) and the peak memory growth of each."""
    by = {(r["method"], r["n"]): r for r in rows if not r.get("skipped")}
    others = [
        m
        for m in ("checkpoint", "checkpoint16", "checkpoint_sqrt", "backsolve", "direct")
        if any(k[0] == m for k in by)
    ]
    mem = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    head = " | ".join(f"x {LABELS[m].removeprefix('neuralode ')}" for m in others)
    lines = [
        f"Reversible / others, time ratio ({args.clock} clock) and {mem} (Reversible; others)",
        "",
        f"| n steps | Reversible s | {head} | {mem}: Reversible; "
        + "; ".join(LABELS[m].removeprefix("neuralode ") for m in others)
        + " |",
        "|---:|---:|" + "---:|" * len(others) + "---|",
    ]
    for n in sorted(args.steps):
        r = by.get(("reversible", n))
        if r is None:
            continue
        ratios = [f"{r['time'] / by[(m, n)]['time']:.2f}" if (m, n) in by else "-" for m in others]
        peaks = [_mib(max(r["peak"], 0))] + [
            _mib(max(by[(m, n)]["peak"], 0)) if (m, n) in by else "-" for m in others
        ]
        lines.append(
            f"| {n} | {r['time']:.3f} | " + " | ".join(ratios) + f" | {'; '.join(peaks)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run")
    p.add_argument(
        "--max-direct-steps",
        type=int,
        default=1000,
        help="skip the graph-keeping methods (Direct, torchdiffeq odeint) above this many steps "
        "(their memory and time grow linearly; 10000 steps keep ~0.8 GiB of graph in float32)",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall time, or process CPU time (steadier on a loaded machine; use with --threads 1)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.max_steps = {"direct": args.max_direct_steps, "torchdiffeq": args.max_direct_steps}
    if args.worker is not None:
        args.dtype = args.dtype[0]
        worker(args)
        return
    methods = [m for m in args.methods if _have_torchdiffeq() or not m.startswith("torchdiffeq")]
    t_start = time.perf_counter()
    for dtype in args.dtype:
        rows = []
        for m in methods:
            rows += _run_worker(args, m, dtype)
        print(table(rows, dtype, args))
        print()
        if any(r["method"] == "reversible" for r in rows):
            print(reversible_table(rows, args))
            print()
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
