"""The formulas every driver shares, written once (issue #12): the interpolant sum
(``solvers.tableau.interpolant_sum``), the per-row scaled error norm (``_norms.rms_rows``) and the
controller's step rule (``Controller.step_rule`` and its protocol), against known values."""

import math

import numpy as np
import pytest
import torch

from neuralode._compiled import _consts
from neuralode._norms import ErrorNorm, rms_rows
from neuralode._tree import flatten_state
from neuralode.controllers import ConstantStep, PIController, StepToGrid
from neuralode.controllers.step_size import grid_point, pi_update
from neuralode.solvers import get_tableau
from neuralode.solvers.explicit_rk import make_stepper
from neuralode.solvers.implicit.base import HermiteStepper, hermite_weights
from neuralode.solvers.tableau import interpolant_sum, weights_at

F64 = torch.float64
A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=F64)  # a damped rotation


def linear(t, y):  # y' = A y
    return y @ A.T


def one_step(method, y, t, h):
    """One step of ``method`` from ``(t, y)``: ``(y_new, Kd)`` with the dense stages."""
    st = make_stepper(get_tableau(method), F64, y.device)
    y_new, ks = st.stages(linear, t, h, y, linear(t, y), t + h)
    K = torch.stack(ks).reshape(len(ks), -1)
    return y_new, st.dense_stages(linear, t, h, y, K, None)


def exact(y0, t):  # the solution of y' = A y from y0 after time t, (B, M)
    return y0 @ torch.linalg.matrix_exp(A * t).T


# ----------------------------------------------------------------------- the interpolant sum
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4", "dopri8"])
def test_interpolant_reproduces_the_step_ends_in_every_form(method):
    y = torch.tensor([[1.0, 0.5], [-0.2, 2.0], [0.3, -1.0]], dtype=F64)
    t, h = 0.4, 0.25
    y_new, Kd = one_step(method, y, t, h)
    P = get_tableau(method).tensors(F64, y.device)["P"]
    theta = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    W = weights_at(theta, P)  # (3, Sd)
    shared = interpolant_sum(y, h, W, Kd)  # (3, B, M)
    torch.testing.assert_close(shared[0], y, rtol=0, atol=1e-15)
    torch.testing.assert_close(shared[2], y_new, rtol=1e-13, atol=1e-13)
    # One value per sample (a 2-D t): the shared values of those samples.
    samples = torch.tensor([2, 0, 1])
    torch.testing.assert_close(
        interpolant_sum(y, h, W, Kd, samples), shared[torch.arange(3), samples], rtol=1e-14,
        atol=1e-14,
    )  # fmt: skip
    # Per row (per-sample control): row j at its own fraction theta[j].
    per_row = interpolant_sum(y, torch.full((3,), h, dtype=F64), W, Kd)
    torch.testing.assert_close(per_row, shared[torch.arange(3), torch.arange(3)], rtol=1e-14,
                               atol=1e-14)  # fmt: skip
    # Compiled stepping's window: one row holding the batch, three fractions of its step.
    Sd = Kd.shape[0]
    window = interpolant_sum(y.view(1, 1, 3, 2), torch.tensor([h], dtype=F64), W.unsqueeze(0),
                             Kd.view(Sd, 1, 1, 3, 2))  # fmt: skip
    torch.testing.assert_close(window[0], shared, rtol=1e-14, atol=1e-14)


def test_dopri5_interpolant_converges_at_fourth_order_to_the_closed_form():
    """Inside one step from the exact state the dense output's error is O(h^5) (a 4th-order
    continuous extension; Hairer, Norsett & Wanner I, sec. II.6): halving h divides it by ~32."""
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    theta = torch.tensor([0.25, 0.5, 0.8], dtype=F64)
    errs = []
    for h in (0.4, 0.2, 0.1):
        y_new, Kd = one_step("dopri5", y0, 0.0, h)
        W = weights_at(theta, get_tableau("dopri5").tensors(F64, y0.device)["P"])
        vals = interpolant_sum(y0, h, W, Kd)[:, 0]
        ref = torch.cat([exact(y0, float(th) * h) for th in theta])
        errs.append(float((vals - ref).abs().max()))
    assert errs[0] < 1e-5  # (measured 2.4e-6)
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(4.5 < s < 5.5 for s in slopes), (errs, slopes)


def test_hermite_extension_through_the_same_sum_is_exact_on_a_cubic():
    """y = t^3 + t: the cubic Hermite interpolant through (y_n, f_n, y_{n+1}, f_{n+1}) is the
    cubic itself, on the shared grid and per row (the implicit steppers' dense output)."""
    t0, h = 0.5, 0.7
    y0, y1 = t0**3 + t0, (t0 + h) ** 3 + (t0 + h)
    Kd = torch.tensor([[3 * t0**2 + 1], [(y1 - y0) / h], [3 * (t0 + h) ** 2 + 1]], dtype=F64)
    theta = torch.tensor([0.1, 0.45, 0.9], dtype=F64)
    ref = (t0 + theta * h) ** 3 + (t0 + theta * h)
    y = torch.tensor([[y0]], dtype=F64)
    vals = HermiteStepper().interpolate(Kd, y, h, theta)  # (3, 1, 1)
    torch.testing.assert_close(vals.view(3), ref, rtol=1e-14, atol=1e-14)
    rows = interpolant_sum(y.expand(3, 1), torch.full((3,), h, dtype=F64), hermite_weights(theta),
                           Kd.expand(3, 3).contiguous())  # fmt: skip
    torch.testing.assert_close(rows.view(3), ref, rtol=1e-14, atol=1e-14)


def test_traced_lowering_gives_the_eager_values():
    """The form torch.compile traces (the elementwise sum, no addcmul) and the eager one."""
    torch.manual_seed(0)
    y, Kd = torch.randn(1, 1, 4, 3, dtype=F64), torch.randn(7, 1, 1, 4, 3, dtype=F64)
    W, h = torch.rand(1, 5, 7, dtype=F64), torch.tensor([0.3], dtype=F64)
    traced = torch.compile(interpolant_sum, backend="eager", fullgraph=True)(y, h, W, Kd)
    ref = y + 0.3 * torch.einsum("rws,srqnm->rwnm", W, Kd)
    torch.testing.assert_close(traced, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(interpolant_sum(y, h, W, Kd), ref, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------ the per-row norm
def _hand(r, sizes=None, parts=None):
    """The definition in numpy: per row the RMS (tensor state) or the maximum over the
    (first ``parts``, non-empty) components of each component's RMS."""
    x = np.abs(r.numpy()).reshape(r.shape[0], r.shape[1], -1)
    if sizes is None:
        return np.sqrt((x**2).mean(axis=(1, 2)))
    bounds = np.cumsum([0, *sizes])
    comps = [x[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])][:parts]
    return np.max([np.sqrt((c**2).mean(axis=(1, 2))) for c in comps if c.shape[2]], axis=0)


@pytest.mark.parametrize("R,n", [(1, 1), (1, 4), (5, 1), (2, 3)])
def test_rms_rows_against_the_definition(R, n):
    torch.manual_seed(R * 10 + n)
    r = torch.randn(R, n, 7, dtype=F64) * torch.tensor([1, 1, 5, 5, 5, 0.1, 0.1], dtype=F64)
    torch.testing.assert_close(rms_rows(r), torch.from_numpy(_hand(r)), rtol=1e-13, atol=0)
    sizes = (2, 0, 3, 2)
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    inv = 1.0 / torch.tensor(sizes, dtype=F64).clamp(min=1)
    for parts, expect_first in ((None, False), (1, True), (2, True), (3, False)):
        ref = torch.from_numpy(_hand(r, sizes, parts))
        for kw in ({}, dict(ids=ids, inv_sizes=inv)):  # a reduction per component; scatter-add
            got = rms_rows(r, sizes, parts, **kw)
            assert got.dtype == F64 and got.shape == (R,)
            torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
        # (the seminorm over the first component: the largest component left out)
        first = torch.from_numpy(_hand(r[..., :2]))
        assert torch.allclose(ref, first, rtol=1e-13) == expect_first


def test_rms_rows_large_components_empty_norm_complex_and_float32():
    torch.manual_seed(1)
    sizes = (3000, 1500)  # many columns per component: a reduction each, with ids given too
    r = torch.randn(1, 2, 4500, dtype=F64)
    r[..., 3000:] *= 4
    ids = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    inv = 1.0 / torch.tensor(sizes, dtype=F64)
    ref = torch.from_numpy(_hand(r, sizes))
    torch.testing.assert_close(rms_rows(r, sizes, None, ids, inv), ref, rtol=1e-12, atol=0)
    assert float(ref[0]) == pytest.approx(4.0, rel=0.05)
    # Only empty components in the norm: zero (not 0/0).
    assert rms_rows(r[..., :3], (0, 3), 1).tolist() == [0.0]
    # A complex error: |r|^2.
    z = torch.complex(torch.full((2, 1, 4), 3.0), torch.full((2, 1, 4), 4.0))
    torch.testing.assert_close(rms_rows(z), torch.full((2,), 5.0, dtype=F64), rtol=1e-6, atol=0)
    torch.testing.assert_close(rms_rows(z, (1, 3)), torch.full((2,), 5.0, dtype=F64), rtol=1e-6,
                               atol=0)  # fmt: skip
    got = rms_rows(torch.full((3, 1, 8), 2.0, dtype=torch.float32), (4, 4))
    assert got.dtype == F64 and got.tolist() == pytest.approx([2.0] * 3, rel=1e-6)


def test_error_norm_shared_and_per_row_are_rms_rows():
    """The eager drivers' norm (over the batch: a float; per row: (B,)) is rms_rows."""
    torch.manual_seed(2)
    state = (torch.randn(4, 3, dtype=F64), torch.randn(4, 2, 2, dtype=F64))
    spec, flat = flatten_state(state, batched=True)
    for parts in (None, 1):
        norm = ErrorNorm(flat, spec, parts)
        r = torch.randn(flat.shape, dtype=F64) * 3
        ref = _hand(r.unsqueeze(1), spec.sizes, parts)  # per row
        torch.testing.assert_close(norm.reduce(r, rows=True), torch.from_numpy(ref), rtol=1e-13,
                                   atol=0)  # fmt: skip
        whole = _hand(r.unsqueeze(0), spec.sizes, parts)[0]
        assert norm.reduce(r) == pytest.approx(whole, rel=1e-13)


# ------------------------------------------------------------------ the controller protocol
def _C(ctrl, tab="dopri5"):
    spec, _ = flatten_state(torch.zeros(2, 3), batched=False)
    return _consts(get_tableau(tab), ctrl, F64, 8, spec, False, rows=False, pick=False,
                   record=False, n_out=4)  # fmt: skip


def test_compiled_constants_ignore_per_solve_data_of_the_controller():
    """Controllers that differ only in data the compiled step receives as tensors (tolerances,
    landing times, the first step, the grid) give equal, hashable constants: one compilation;
    a different formula setting gives other constants."""
    a = _C(PIController(rtol=1e-3, atol=1e-6, step_t=[0.5], dt0=0.1))
    b = _C(PIController(rtol=torch.tensor([1e-5, 1e-4, 1e-3]), atol=1e-9, step_t=[0.2, 0.7]))
    assert a == b and hash(a) == hash(b)
    assert a != _C(PIController(safety=0.8)) and a != _C(PIController(dt_max=0.5))
    g1, g2 = _C(StepToGrid([0.0, 0.3, 1.0]), "rk4"), _C(StepToGrid([0.0, 0.5, 0.6, 1.0]), "rk4")
    assert g1 == g2 and hash(g1) == hash(g2)
    c1, c2 = _C(ConstantStep(0.1, step_t=[0.25]), "rk4"), _C(ConstantStep(0.1), "rk4")
    assert c1 == c2 and c1 != _C(ConstantStep(0.2), "rk4")
    assert c1 != g1 and not c1.ctrl.adaptive and a.ctrl.adaptive


def test_step_rules_on_rows_give_the_controllers_formulas():
    t = torch.tensor([0.0, 0.33, 0.95, 2.0], dtype=F64)
    sdir = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64)
    t0 = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=F64)
    t_end = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64)
    h = torch.tensor([0.2, 5.0, 0.01, 0.4], dtype=F64)
    rule = ConstantStep(0.1, step_t=[0.5]).step_rule()
    torch.testing.assert_close(rule.propose(t, h, t0, t_end, sdir),
                               grid_point(t, t0, t_end, sdir, 0.1))  # fmt: skip
    assert rule.propose(t, h, t0, t_end, sdir).tolist() == pytest.approx([0.1, 0.4, 1.0, 1.9])
    grid = StepToGrid([0.0, 0.5, 1.0]).step_rule()
    assert torch.isinf(grid.propose(t, grid.bounded(h * math.inf), t0, t_end, sdir)).all()
    assert not grid.adaptive and grid.step_rule() is grid
    pi = PIController(dt_max=1.0, safety=0.8, pcoeff=0.2, icoeff=0.5, rtol=1e-3).step_rule()
    assert pi.bounded(h).tolist() == [0.2, 1.0, 0.01, 0.4]
    assert pi.underflows(torch.tensor([1e-20, 0.1], dtype=F64), torch.ones(2, dtype=F64)).tolist() == [True, False]  # fmt: skip
    e = torch.tensor([0.5, 2.0, 0.0, math.nan], dtype=F64)
    prev = torch.full((4,), 0.3, dtype=F64)
    acc, clip = e <= 1, torch.zeros(4, dtype=torch.bool)
    got = pi.adapt(h, h, e, prev, 5, acc, clip)
    ref = pi_update(0.8, 10.0, 0.2, 0.2, 0.5, h, h, e, prev, 5, acc, clip)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, equal_nan=True)


def test_step_count_and_with_landings():
    assert ConstantStep(0.1).step_count(0.0, 1.0) == 10
    assert ConstantStep(0.3, step_t=[0.5, 2.0]).step_count(0.0, 1.0) == 5  # 4 + the landing
    assert ConstantStep(0.3).step_count(1.0, 0.0) == 4
    assert StepToGrid([0.0, 0.3, 0.7, 1.0, 2.0]).step_count(0.0, 1.0) == 3
    assert PIController().step_count(0.0, 1.0) is None
    assert StepToGrid([0.0, 1.0]).with_landings([0.5, 0.25]).grid == (0.0, 0.25, 0.5, 1.0)
    pi = PIController(rtol=1e-4, step_t=[0.1]).with_landings([0.6])
    assert pi.step_t == (0.1, 0.6) and pi.rtol == 1e-4
    cs = ConstantStep(0.2, jump_t=[0.3]).with_landings([0.7])
    assert (cs.dt, cs.step_t, cs.jump_t) == (0.2, (0.7,), (0.3,))
