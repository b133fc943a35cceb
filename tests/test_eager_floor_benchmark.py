"""``benchmarks/eager_floor.py --tiny``: the floor benchmark's code path runs (a smoke test; the
tiny numbers are not measurements): the hand-written dopri5 loop reproduces neuralode's solve
over the same steps, and every row carries a finite time and ratio."""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eager_floor  # noqa: E402
import training  # noqa: E402

import neuralode  # noqa: E402


def test_hand_written_loop_reproduces_neuralode():
    func = training.Spiral().double()
    y0, t, _ = training.spiral_data()
    y0, t = y0.double(), t.double()
    times = neuralode.solve(func, y0, t, rtol=1e-6, atol=1e-6).step_times
    with torch.no_grad():
        ours = neuralode.odeint(func, y0, t, method="dopri5", rtol=1e-6, atol=1e-6)
        hand = eager_floor.hand_written(func, y0, t, list(zip(times[:-1], times[1:])))
    torch.testing.assert_close(hand, ours, rtol=1e-12, atol=1e-12)


def test_tiny_run_reports_every_row():
    with contextlib.redirect_stdout(io.StringIO()):
        rows = eager_floor.main(["--tiny"])
    names = [r["name"] for r in rows]
    assert "training step: hand-written dopri5 loop" in names
    assert "overhead: mlp_d2 float32" in names
    for r in rows:
        assert r["ms"] > 0 and (r["ratio"] is None or math.isfinite(r["ratio"]))
