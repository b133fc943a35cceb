"""Small text helpers for the printed summaries."""

from __future__ import annotations

__all__ = ["nfe_line", "time_line", "table", "verdict"]


def time_line(metrics: list[dict]) -> str:
    """``Training time: ...`` from the per-epoch times."""
    if not metrics:
        return "Training time: no completed epoch."
    total = sum(r["time_s"] for r in metrics)
    return (
        f"Training time: {total:.1f} s for {len(metrics)} epochs "
        f"({total / len(metrics):.2f} s per epoch, validation included)"
    )


def nfe_line(metrics: list[dict], max_epochs_shown: int = 5) -> str:
    """``NFE per epoch (forward / backward): ...`` for a few evenly spaced epochs."""
    if not metrics:
        return "NFE per epoch: no completed epoch."
    n = len(metrics)
    if n <= max_epochs_shown:
        shown = list(range(n))
    else:
        shown = sorted(
            {round(i * (n - 1) / (max_epochs_shown - 1)) for i in range(max_epochs_shown)}
        )
    parts = [
        f"{metrics[i]['epoch']}: {metrics[i]['nfe_forward']}/{metrics[i]['nfe_backward']}"
        for i in shown
    ]
    per_step_f = metrics[-1]["nfe_forward_per_step"]
    per_step_b = metrics[-1]["nfe_backward_per_step"]
    return (
        "NFE per epoch, forward/backward (epoch: nfe): "
        + ", ".join(parts)
        + f"; last epoch per step {per_step_f:.0f}/{per_step_b:.0f}"
    )


def table(header: list[str], rows: list[list], indent: str = "  ") -> str:
    """A plain fixed-width table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in header]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append(indent + "  ".join(parts).rstrip())
        if j == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def verdict(model_value: float, baselines: dict[str, float], what: str, higher_better=False):
    """One sentence: does the model beat every baseline on ``what``?"""
    if model_value is None or not baselines:
        return f"  {what}: nothing to compare."
    better = {
        k: (model_value > v if higher_better else model_value < v)
        for k, v in baselines.items()
        if v is not None
    }
    won = [k for k, ok in better.items() if ok]
    lost = [k for k, ok in better.items() if not ok]
    if not lost:
        return f"  {what}: the model beats {', '.join(won)}."
    if not won:
        return f"  {what}: the model does NOT beat {', '.join(lost)}."
    return f"  {what}: the model beats {', '.join(won)} but does NOT beat {', '.join(lost)}."
