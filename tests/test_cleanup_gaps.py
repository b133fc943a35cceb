"""Regression tests for small gaps left by issue 12 ("One stepping engine"): a controller
whose ``propose`` does not advance under compiled stepping and the reversible driver; an
``adapt`` that returns a 0-d tensor under shared control; ``ConstantStep.step_count`` with
many landings; compiled per-sample dense output in a step that ends on a ``jump_t``; the size of
the modules split along their seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import neuralode
from neuralode.controllers import Controller
from neuralode.controllers.step_size import maximum, minimum, where

F64 = torch.float64


@dataclass(frozen=True)
class _Stuck(Controller):
    """A fixed-step controller whose proposal stays at ``t`` (or goes back, ``back``)."""

    back: bool = False

    def initial_step(self, *a):
        return 0.1

    def propose(self, t, h, t0, t_end, direction):
        return t - direction * h if self.back else t


def _stuck_solve(back, max_steps, **kw):
    y0 = torch.ones(2, 1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    return neuralode.solve(lambda t, y: -y, y0, t, solver="rk4", controller=_Stuck(back=back),
                           max_steps=max_steps, **kw)  # fmt: skip


def _stuck_match(back):
    return rf"_Stuck\.propose returned t_try={'-0.1' if back else '0.0'} from t=0\.0: .* fix"


@pytest.mark.parametrize("back", [False, True])
@pytest.mark.parametrize("max_steps", [None, 1000])
def test_reversible_propose_that_does_not_advance_raises(back, max_steps):
    # Before: a zero step forever (max_steps=None: a hang), or MaxStepsError at t=-200.
    with pytest.raises(ValueError, match=_stuck_match(back)):
        _stuck_solve(back, max_steps, gradient="reversible")


@pytest.mark.parametrize(
    ("control", "back"), [("shared", False), ("per_sample", True)], ids=["shared", "per_sample"]
)
def test_compiled_propose_that_does_not_advance_raises(control, back):
    # Before: zero steps forever (back=False: no attempt counted, a hang even with max_steps),
    # or steps backward to MaxStepsError at t=-100. One compile each.
    with pytest.raises(ValueError, match=_stuck_match(back)):
        _stuck_solve(back, 1000, compile=True, batch_control=control)


@dataclass(frozen=True)
class _IControl(Controller):
    """I control ``h clip(0.9 e^(-1/k), 0.2, 5)``; with ``as_tensor`` its ``adapt`` returns the
    step size as a 0-d float64 tensor (under shared control it receives floats)."""

    rtol: float = 1e-7
    atol: float = 1e-9
    as_tensor: bool = False
    adaptive = True

    def initial_step(self, *a):
        return 0.01

    def adapt(self, h, h_prop, e, prev, k, accept, clipped):
        fac = minimum(5.0, maximum(0.2, 0.9 * maximum(e, 1e-100) ** (-1.0 / k)))
        h_next = where(accept, h * fac, h * minimum(fac, 1.0))
        if self.as_tensor and not isinstance(h_next, torch.Tensor):
            h_next = torch.tensor(h_next, dtype=F64)
        return h_next, prev


@pytest.mark.parametrize("gradient", ["direct", "reversible"])
def test_adapt_returning_a_0d_tensor_under_shared_control(gradient):
    # Before: IndexError "Dimension out of range" from the stage combination (the 0-d step size
    # was taken for a per-row one). Now the same steps as the float version.
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    runs = [
        neuralode.solve(
            lambda t, y: -y, y0, t, controller=_IControl(as_tensor=a), gradient=gradient
        )  # fmt: skip
        for a in (False, True)
    ]
    ref = y0.squeeze(1) * torch.exp(-t).unsqueeze(1)  # (T, B)
    for sol in runs:
        assert torch.allclose(sol.ys.squeeze(-1), ref, rtol=1e-5, atol=1e-8)
    assert runs[1].stats["n_accepted"] == runs[0].stats["n_accepted"] > 5
    assert runs[1].stats["n_rejected"] == runs[0].stats["n_rejected"]


def _f32(x):
    return float(torch.tensor(x, dtype=torch.float32))


# (controller, t0, t_end, the steps counted by hand)
_COUNTS = [
    # landings on the grid points (0.1 * i is a rounding off t0 + i dt): merged, no extra step
    (neuralode.ConstantStep(0.1, step_t=[0.1 * i for i in range(1, 10)]), 0.0, 1.0, 10),
    (neuralode.ConstantStep(0.1, step_t=[_f32(0.1 * i) for i in range(1, 10)]), 0.0, 1.0, 10),
    (neuralode.ConstantStep(0.1, step_t=[0.1 * i for i in range(1, 10)]), 1.0, 0.0, 10),
    # landings between grid points: one step more each
    (neuralode.ConstantStep(0.1, step_t=[0.25, 0.55]), 0.0, 1.0, 12),
    (neuralode.ConstantStep(0.1, step_t=[0.25, 0.55]), 1.0, 0.0, 12),
    # 0.25 0.5 | 0.6 (jump) 0.75 1.0; and two landings in one grid interval, one on the grid
    (neuralode.ConstantStep(0.25, step_t=[0.5], jump_t=[0.6]), 0.0, 1.0, 5),
    (neuralode.ConstantStep(0.5, step_t=[0.6, 0.7, 1.0]), 0.0, 2.0, 6),
    (neuralode.ConstantStep(0.3), 0.0, 1.0, 4),  # (the last step clipped to 1.0)
]


@pytest.mark.parametrize(("ctrl", "t0", "t_end", "n"), _COUNTS)
def test_constant_step_count_is_exact(ctrl, t0, t_end, n):
    # Before: one step per landing on top of the grid (19 for the first case, 11 for [0.5]...).
    assert ctrl.step_count(t0, t_end) == n
    t = torch.tensor([t0, t_end], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, torch.ones(1, 1, dtype=F64), t, solver="euler",
                          controller=ctrl)  # fmt: skip
    assert sol.stats["n_accepted"] == n


def test_compiled_fixed_step_unrolls_the_exact_count(monkeypatch):
    # ConstantStep(0.1) landing on the output times of a 0.1 grid: 10 steps, and the first
    # compiled call unrolls 10 (before: 19, nine masked steps in every call of that length).
    from neuralode import _compiled_lengths

    picked = []
    pick = _compiled_lengths.pick

    def spy(*args, **kw):
        picked.append(pick(*args, **kw))
        return picked[-1]

    monkeypatch.setattr(_compiled_lengths, "pick", spy)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    ctrl = neuralode.ConstantStep(0.1, step_t=t[1:-1].tolist())
    y0 = torch.tensor([[1.0], [0.5]], dtype=F64)

    def f(t, y):
        return -y * (1.0 + t)

    kw = dict(solver="rk4", controller=ctrl)
    eager = neuralode.solve(f, y0, t, **kw)
    comp = neuralode.solve(f, y0, t, compile=True, **kw)
    assert comp.stats["compiled"] and picked == [10]
    assert comp.stats["n_accepted"] == eager.stats["n_accepted"] == 10
    assert torch.allclose(comp.ys, eager.ys, rtol=1e-12, atol=1e-14)
    exact = y0.squeeze(1) * torch.exp(-(t + t**2 / 2)).unsqueeze(1)
    assert torch.allclose(eager.ys.squeeze(-1), exact, rtol=1e-5)


def _kink(t, y):  # y' = 1 before t = 0.5, -3 from it on (t: 0-d or (B,))
    return torch.where(t < 0.5, 1.0, -3.0).to(y.dtype).reshape(-1, 1).expand_as(y)


@pytest.mark.parametrize("control", ["shared", "per_sample"])
def test_compiled_dense_output_in_a_step_ending_on_a_jump(control):
    # rk4 ConstantStep(0.3, jump_t=0.5): the step [0.3, 0.5] ends on the jump, and its cubic
    # Hermite extension needs f at the step end: the left limit (1), as the eager drivers use.
    # Before (per-sample; shared control was right): the compiled records had no left-limit
    # time, the dense stage was f at 0.5 itself (-3), and evaluate(0.4) was 0.1 off the exact
    # 0.4 (the solution is piecewise linear: cubic Hermite is exact with the right slopes).
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    kw = dict(solver="rk4", controller=neuralode.ConstantStep(0.3, jump_t=(0.5,)),
              batch_control=control, dense_output=True)  # fmt: skip
    q = torch.tensor([0.35, 0.4, 0.45, 0.7], dtype=F64)
    exact = y0.squeeze(1) + torch.where(q < 0.5, q, 0.5 - 3 * (q - 0.5)).unsqueeze(1)  # (4, B)
    eager = neuralode.solve(_kink, y0, t, **kw)
    comp = neuralode.solve(_kink, y0, t, compile=True, **kw)
    assert comp.stats["compiled"]
    for sol in (eager, comp):
        assert torch.allclose(sol.evaluate(q).reshape(4, 2), exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "module",
    ["_compat.py", "_compat_args.py", "gradients/adjoint.py", "gradients/_adjoint_backward.py"],
)
def test_split_modules_stay_within_the_size_guideline(module):
    # Before: _compat.py 624 lines, gradients/adjoint.py 628 (the guideline: ~600).
    from pathlib import Path

    path = Path(neuralode.__file__).parent / module
    assert len(path.read_text().splitlines()) <= 600
