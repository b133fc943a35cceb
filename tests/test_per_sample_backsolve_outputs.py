"""Per-sample Backsolve with many output times: one continuous backward solve per sample.

The backward solve of ``(y, a)`` lands on each sample's stops (its output times, or with
replay the starts of the forward steps holding outputs) without restarting step-size
control, so its cost does not grow with the number of output times. Gradients are compared
with Direct (float64, tight tolerances) for every ``outputs=`` mode, 1-D and 2-D ``t``, and
with respect to the parameters, ``y0`` and ``t``.
"""

import math

import pytest
import torch

import neuralode

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Field(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=D))
        self.b = torch.nn.Parameter(0.3 * torch.randn(2, generator=g, dtype=D))

    def forward(self, t, y):
        rot = torch.stack([y[..., 1], -y[..., 0]], -1)
        return torch.tanh(y @ self.w.T + self.b) + rot


def _y0(B=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, generator=g, dtype=D)


def _grads(gradient, t, y0=None, controller=None, solver="dopri5", throw=True, **tol):
    """Gradients of a weighted sum of the outputs w.r.t. (params, y0, t), flat, and stats."""
    f = Field()
    y0 = (_y0() if y0 is None else y0).clone().requires_grad_()
    t = t.clone().requires_grad_()
    T = t.shape[-1]
    w = torch.randn(T, y0.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=D)
    kw = dict(tol or TIGHT)
    if controller is not None:
        kw = dict(controller=controller)
    sol = neuralode.solve(f, y0, t, batch_control="per_sample", gradient=gradient,
                          solver=solver, throw=throw, **kw)  # fmt: skip
    loss = torch.nan_to_num(sol.ys * w).sum()
    loss.backward()
    flat = [p.grad.reshape(-1) for p in f.parameters()] + [y0.grad.reshape(-1), t.grad.reshape(-1)]
    return torch.cat(flat), sol


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _grids(B=3, T=40, seed=3):
    """Per-sample grids: different spans, starts and densities (row 2 runs backward in time)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(B, T, generator=g, dtype=D), dim=1).values
    t = (
        t * torch.tensor([[6.0], [2.0], [4.0]], dtype=D)[:B]
        + torch.tensor([[0.0], [1.0], [-1.0]], dtype=D)[:B]
    )
    t[2] = t[2].flip(0)
    return t


@pytest.mark.parametrize("outputs", ["stop", "replay", "auto"])
@pytest.mark.parametrize("grid", ["1d", "2d"])
def test_gradients_equal_direct(outputs, grid):
    t = torch.linspace(0.0, 6.0, 60, dtype=D) if grid == "1d" else _grids()
    ref, _ = _grads("direct", t)
    got, sol = _grads(neuralode.Backsolve(outputs=outputs), t)
    assert _rel(got, ref) < 1e-7
    want = {"stop": "stop", "replay": "replay"}.get(outputs)
    assert sol.stats["backsolve_outputs"] in ((want,) if want else ("stop", "replay", "mixed"))


def test_auto_decides_per_sample():
    # Sample 0 has 200 outputs (more than its forward steps: replayed), sample 1 has 3 (stops
    # at them): the backward solve mixes both, and the gradients still equal Direct's.
    dense = torch.linspace(0.0, 5.0, 200, dtype=D)
    sparse = torch.cat([torch.tensor([0.0, 2.5], dtype=D), torch.full((198,), 5.0, dtype=D)])
    t = torch.stack([dense, sparse])
    ref, _ = _grads("direct", t, y0=_y0(2), rtol=1e-6, atol=1e-6)
    got, sol = _grads(
        neuralode.Backsolve(rtol=1e-10, atol=1e-10), t, y0=_y0(2), rtol=1e-6, atol=1e-6
    )
    assert sol.stats["backsolve_outputs"] == "mixed"
    assert _rel(got, ref) < 1e-4


def _nfe_backward(T, outputs="auto"):
    t = torch.linspace(0.0, 10.0, T, dtype=D)
    _, sol = _grads(neuralode.Backsolve(outputs=outputs), t, y0=_y0(2), rtol=1e-6, atol=1e-9)
    return sol.stats["nfe_backward"]


def test_backward_cost_flat_in_the_number_of_outputs():
    # Before: every output restarted the backward solve (initial step selection per segment):
    # 504 / 5,592 backward NFE at 10 / 400 outputs. One continuous solve replays forward
    # steps holding outputs instead; measured 10 -> 400 outputs: about 2x (shared: 1.6x).
    n10, n400 = _nfe_backward(10), _nfe_backward(400)
    assert n400 <= 3 * n10, (n10, n400)
    # Stopping at every output costs at least one backward step per output.
    assert _nfe_backward(400, "stop") > n400


def test_failed_sample_with_replay():
    # Sample 1 blows up at t = 1/0.6 (y' = y^2, y0 = 0.6); with throw=False its outputs before
    # the failure keep their gradients (it falls back to stops), the others replay.
    def blowup(t, y):
        return y * y

    y = torch.tensor([[0.2], [0.6], [0.3]], dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 120, dtype=D)
    w = torch.linspace(0.5, 1.5, 120, dtype=D).view(-1, 1, 1)
    out = {}
    for name in ("direct", "replay"):
        gm = "direct" if name == "direct" else neuralode.Backsolve(outputs="replay")
        y0 = y.detach().clone().requires_grad_()
        sol = neuralode.solve(blowup, y0, t, batch_control="per_sample", throw=False,
                              gradient=gm, rtol=1e-9, atol=1e-9)  # fmt: skip
        assert sol.stats["failed_samples"] == [1]
        torch.nan_to_num(sol.ys * w).sum().backward()
        out[name] = y0.grad.reshape(-1)
    assert bool(torch.isfinite(out["replay"]).all())
    # sample 0 alone: d/dy0 sum_j w_j y(t_j) with y(t) = y0 / (1 - y0 t)
    tt, ww = t, w.reshape(-1)
    want0 = float((ww / (1 - 0.2 * tt) ** 2).sum())
    assert float(out["replay"][0]) == pytest.approx(want0, rel=1e-6)
    torch.testing.assert_close(out["replay"], out["direct"], rtol=1e-5, atol=0)


def test_outputs_duplicated_and_a_few_ulps_apart():
    # Equal output times (2-D rows may repeat a time) and times differing by rounding.
    base = torch.linspace(0.0, 3.0, 30, dtype=D)
    t = torch.stack([base, base.clone(), base.clone()])
    t[1, 10] = t[1, 9]
    t[2, 10:12] = torch.tensor([0.1 * 3, 0.3], dtype=D) + 0.7
    t[2] = torch.sort(t[2]).values
    for outputs in ("stop", "replay"):
        ref, _ = _grads("direct", t)
        got, _ = _grads(neuralode.Backsolve(outputs=outputs), t)
        assert _rel(got, ref) < 1e-7, outputs


def test_replay_across_a_jump_t():
    # Forward steps that start on a jump_t evaluate f past it: their replay too.
    t = torch.linspace(0.0, 4.0, 80, dtype=D)
    ctrl = neuralode.PIController(rtol=1e-10, atol=1e-10, jump_t=[1.3, 2.9])
    ref, _ = _grads("direct", t, controller=ctrl)
    got, sol = _grads(neuralode.Backsolve(outputs="replay"), t, controller=ctrl)
    assert sol.stats["backsolve_outputs"] == "replay"
    assert _rel(got, ref) < 1e-7


def test_fixed_steps_replay():
    # rk4 with dt: the backward solve takes steps of dt from each sample's end and replays
    # the forward steps holding outputs; the gradient approximates the continuous one (O(dt^4)).
    t = torch.linspace(0.0, 2.0, 41, dtype=D)
    ctrl = neuralode.ConstantStep(0.01)
    ref, _ = _grads("direct", t, controller=ctrl, solver="rk4")
    got, sol = _grads(neuralode.Backsolve(outputs="replay"), t, controller=ctrl, solver="rk4")
    assert sol.stats["backsolve_outputs"] == "replay"
    assert _rel(got, ref) < 1e-7


def test_replay_refused_for_implicit_methods():
    t = torch.linspace(0.0, 1.0, 20, dtype=D)
    with pytest.raises(
        ValueError, match=r"outputs='replay'\) with batch_control='per_sample' replays"
    ):
        _grads(
            neuralode.Backsolve(outputs="replay", solver="dopri5"),
            t,
            solver="kvaerno5",
            rtol=1e-6,
            atol=1e-6,
        )
    ref, _ = _grads("direct", t, solver="kvaerno5", rtol=1e-9, atol=1e-9)
    got, sol = _grads(
        neuralode.Backsolve(solver="dopri5"), t, solver="kvaerno5", rtol=1e-9, atol=1e-9
    )
    assert sol.stats["backsolve_outputs"] == "stop"
    assert _rel(got, ref) < 1e-5
    assert math.isfinite(float(got.norm()))


def test_benchmark_smoke():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import backsolve_outputs

    rows = backsolve_outputs.main(["--tiny", "--problems", "oscillator"])
    assert {(r["control"], r["n_t"]) for r in rows} == {
        (c, n) for c in ("per_sample", "shared") for n in (2, 20)
    }
    assert all(r["err"] < 1e-4 and r["nfe_backward"] > 0 for r in rows)
