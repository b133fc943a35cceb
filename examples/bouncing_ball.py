"""A bouncing ball: non-terminal events with a state reset.

The ball falls under gravity, ``h'' = -g``. Each time the height crosses zero going down (an
event with ``direction=-1``) the event is recorded and the velocity is reversed and scaled by the
coefficient of restitution ``e`` (the reset), and the solve continues. Impact times have a
closed form: ``t1 = sqrt(2 h0 / g)`` and ``t_{k+1} = t_k + 2 e^k v1 / g`` with
``v1 = sqrt(2 g h0)``; the script prints them next to the ones neuralode locates and plots the
height with the impacts marked.

Run from anywhere::

    python examples/bouncing_ball.py                # writes the repository's docs/bouncing_ball.png
    python examples/bouncing_ball.py --e 0.6 --out /tmp/ball.png

Without ``--out`` the plot goes to ``docs/`` of the repository that holds this script (the figure
the README shows), or to ``bouncing_ball.png`` in the current directory when the script was copied
out of a checkout; no directory is created then.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import neuralode

G = 9.81  # m/s^2


def analytic_impacts(h0: float, e: float, n: int) -> list[float]:
    """The first ``n`` impact times of a ball dropped from ``h0`` with restitution ``e``."""
    v1 = math.sqrt(2 * G * h0)
    times = [math.sqrt(2 * h0 / G)]
    for k in range(1, n):
        times.append(times[-1] + 2 * e**k * v1 / G)
    return times


def simulate(h0: float, e: float, t_end: float, n_out: int = 1000):
    """Solve with a non-terminal event and a reset; returns (t, heights, impact times), the
    heights at ``n_out`` times from the solve's dense output (joined across the bounces)."""

    def gravity(t, y):  # y = (height, velocity)
        return torch.stack([y[1], torch.full_like(y[1], -G)])

    def bounce(t, y):  # velocity reversed and scaled at each impact
        return y * torch.tensor([1.0, -e], dtype=y.dtype)

    event = neuralode.Event(
        lambda t, y: y[0], direction=-1, terminal=False, reset=bounce, max_events=100
    )
    t = torch.linspace(0.0, t_end, n_out, dtype=torch.float64)
    y0 = torch.tensor([h0, 0.0], dtype=torch.float64)
    sol = neuralode.solve(gravity, y0, t[[0, -1]], event=event, rtol=1e-10, atol=1e-12)
    return t, sol.evaluate(t)[:, 0], sol.event_t


def plot(t, heights, impacts, out: Path, h0: float, e: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    ax.plot(t.numpy(), heights.numpy(), lw=1.5, label="height (neuralode)")
    ax.plot(
        impacts.numpy(),
        [0.0] * len(impacts),
        "v",
        color="C3",
        ms=6,
        label=f"impacts ({len(impacts)} events)",
    )
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("height [m]")
    ax.set_title(f"Bouncing ball: h0 = {h0:g} m, e = {e:g} (non-terminal events with reset)")
    ax.legend(loc="upper right", frameon=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def default_out() -> Path:
    """The repository's ``docs/bouncing_ball.png``, else ``./bouncing_ball.png`` (never a new dir)."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    return docs / "bouncing_ball.png" if docs.is_dir() else Path("bouncing_ball.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h0", type=float, default=1.0, help="drop height in m (default 1)")
    parser.add_argument(
        "--e", type=float, default=0.8, help="coefficient of restitution (default 0.8)"
    )
    parser.add_argument("--t-end", type=float, default=3.5, help="end time in s (default 3.5)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to save the plot (default: the repository's docs/bouncing_ball.png, or "
        "./bouncing_ball.png outside a checkout)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = default_out()

    t, heights, impacts = simulate(args.h0, args.e, args.t_end)
    exact = analytic_impacts(args.h0, args.e, len(impacts))
    print(f"{'k':>3}  {'neuralode t_k [s]':>18}  {'analytic t_k [s]':>18}  {'difference':>10}")
    for k, (a, b) in enumerate(zip(impacts.tolist(), exact), start=1):
        print(f"{k:>3}  {a:18.12f}  {b:18.12f}  {a - b:10.1e}")
    plot(t, heights, impacts, args.out, args.h0, args.e)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
