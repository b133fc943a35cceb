"""Where the time of one compiled Direct training step goes (the spiral step of ``training.py``).

A diagnostic, not a comparison: it wraps neuralode's internal compiled calls (private names, so
it may need updating when they change) and times, in process CPU time (medians over
``--repeats`` steps after a warm-up, one thread):

- the whole step (``solve(..., compile=True)``, the MSE loss, ``backward()``);
- the solve, and in it the compiled call(s) (TorchDynamo's guards, AOTAutograd's forward
  wrapper, the kernels); the rest of the solve is Python on the host (argument handling, the
  chunk's inputs, the report, the Solution);
- the backward pass (the autograd engine, AOTAutograd's backward wrapper, the kernels);
- the two Inductor graphs' C++ entry points alone (forward and backward kernels, timed by
  cProfile with a CPU-time clock: a C function is timed without profiling overhead inside it).

``main(argv)`` prints a markdown table and returns its rows (name, microseconds).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import neuralode
from neuralode import _compiled

try:
    from training import Spiral, spiral_data
except ImportError:  # (run as a module from the repository root)
    from benchmarks.training import Spiral, spiral_data


def _entry_time(fn, n: int) -> float:
    """The per-call CPU time of the Inductor graphs' C++ entry points in ``fn()`` (seconds):
    cProfile with a CPU-time clock times a C function without profiling overhead inside it."""
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return sum(v[2] for k, v in stats.items() if "inductor_entry_cpp" in k[2]) / n


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.process_time
    func = Spiral()
    y0, t, target = spiral_data()
    parts: dict[str, float] = {}
    entry_of = _compiled._entry

    def entry(fn, key, *code):  # times the compiled calls of the solve
        e = entry_of(fn, key, *code)
        if not getattr(e, "_timed", False):
            call = e.fn

            def timed(*a, _call=call):
                start = clock()
                try:
                    return _call(*a)
                finally:
                    parts["compiled call"] = parts.get("compiled call", 0.0) + clock() - start

            e.fn, e._timed = timed, True
        return e

    def step():
        func.zero_grad()
        start = clock()
        sol = neuralode.solve(func, y0, t, compile=True, dense_output=False, rtol=1e-6, atol=1e-6)
        mid = clock()
        loss = ((sol.ys - target) ** 2).mean()
        mid2 = clock()
        loss.backward()
        end = clock()
        parts.update(solve=mid - start, loss=mid2 - mid, backward=end - mid2, step=end - start)

    _compiled._entry = entry
    try:
        for _ in range(3):  # (compiles: the first solve's chunk, then the later solves' start)
            step()
        for _ in range(50):
            step()
        samples: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            parts.clear()
            step()
            for key, value in parts.items():
                samples.setdefault(key, []).append(value)
    finally:
        _compiled._entry = entry_of
    med = {key: statistics.median(v) for key, v in samples.items()}
    # The forward graph alone: the solve under autograd without the backward pass.
    fwd = _entry_time(lambda: neuralode.solve(func, y0, t, compile=True, dense_output=False,
                                              rtol=1e-6, atol=1e-6), args.repeats)  # fmt: skip
    bwd = _entry_time(step, args.repeats) - fwd
    rows = [
        ("training step (solve + loss + backward)", med["step"]),
        ("solve: the compiled call (guards, AOTAutograd forward wrapper, kernels)",
         med["compiled call"]),
        ("  of which the forward graph's kernels (C++ entry point)", fwd),
        ("  of which guards and the AOTAutograd forward wrapper", med["compiled call"] - fwd),
        ("solve: Python on the host (arguments, chunk inputs, report, Solution)",
         med["solve"] - med["compiled call"]),
        ("loss (MSE on the outputs)", med["loss"]),
        ("backward pass", med["backward"]),
        ("  of which the backward graph's kernels (C++ entry point)", bwd),
        ("  of which the autograd engine, AOTAutograd's backward wrapper, eager nodes",
         med["backward"] - bwd),
    ]  # fmt: skip
    print("| part of one compiled Direct training step | us |\n|---|---:|")
    for name, s in rows:
        print(f"| {name} | {1e6 * s:.0f} |")
    return rows


if __name__ == "__main__":
    main()
