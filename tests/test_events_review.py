"""Regression tests for the review of events and gradients under per-sample control.

Each test names the defect it guards against; the references are closed forms or the
mirrored (forward-in-time) solve.
"""

import math

import pytest
import torch

import neuralode
from neuralode import Event

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# -------------------------------------------- 1. events solved backward in time from a zero of g
def _osc(t, y):
    return torch.stack([y[:, 1], -y[:, 0]], 1)


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_backward_terminal_event_with_g_zero_at_start(bc):
    # y0 = sin t, cos t: g = y0 is zero at t=0; going backward it first reaches zero at -pi.
    # The "before" sign was taken from dg/dt without the direction of integration, so the
    # start itself counted as the crossing (event_t ~ -1e-33).
    y0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=D)
    sol = neuralode.solve(
        _osc, y0, torch.tensor([0.0, -13.0], dtype=D), event=Event(lambda t, y: y[:, 0]),
        batch_control=bc, **TOL,
    )  # fmt: skip
    torch.testing.assert_close(sol.event_t, torch.full((2,), -math.pi, dtype=D), atol=1e-8, rtol=0)


def test_backward_terminal_event_whole_state_g_zero_at_start():
    y0 = torch.tensor([[0.0, 1.0]], dtype=D)
    sol = neuralode.solve(
        _osc, y0, torch.tensor([0.0, -13.0], dtype=D), event=Event(lambda t, y: y[0, 0]), **TOL
    )
    assert abs(float(sol.event_t) + math.pi) < 1e-8


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_backward_non_terminal_event_after_crossing(bc):
    # y = 1 - t backward from 0: g = y - 2 crosses at t = -1, then stays positive.
    g = (lambda t, y: y[:, 0] - 2.0) if bc == "per_sample" else (lambda t, y: y[0, 0] - 2.0)
    sol = neuralode.solve(
        lambda t, y: -torch.ones_like(y), torch.tensor([[1.0]], dtype=D),
        torch.tensor([0.0, -0.5, -3.0], dtype=D), event=Event(g, terminal=False),
        batch_control=bc, **TOL,
    )  # fmt: skip
    assert sol.status == "success"
    assert sol.event_t.numel() == 1
    assert abs(float(sol.event_t.reshape(-1)[0]) + 1.0) < 1e-9
    torch.testing.assert_close(sol.ys[:, 0, 0], torch.tensor([1.0, 1.5, 4.0], dtype=D))


GRAV = 9.81


def _fall(sign):
    return lambda t, y: sign * torch.stack([y[:, 1], torch.full_like(y[:, 1], -GRAV)], 1)


def _bounce(t, y):
    return torch.stack([y[:, 0], -0.9 * y[:, 1]], 1)


@pytest.mark.parametrize("direction", [0, -1])
@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_backward_bouncing_ball_mirrors_forward(bc, direction):
    # Solving backward from 0 to -T is solving forward with -f from 0 to T: the event times
    # are the mirror images, the states the same. After each bounce g = height starts at ~0.
    y0 = torch.tensor([[1.0, 0.0]], dtype=D)
    if bc == "per_sample":
        g = lambda t, y: y[:, 0]  # noqa: E731
    else:
        g = lambda t, y: y[0, 0]  # noqa: E731
    ev = Event(g, direction=direction, terminal=False, reset=_bounce)
    tf = torch.tensor([0.0, 0.7, 2.0], dtype=D)
    fwd = neuralode.solve(_fall(-1.0), y0, tf, event=ev, batch_control=bc, **TOL)
    bwd = neuralode.solve(_fall(1.0), y0, -tf, event=ev, batch_control=bc, **TOL)
    assert fwd.event_t.numel() >= 3
    torch.testing.assert_close(bwd.event_t, -fwd.event_t, atol=1e-8, rtol=0)
    torch.testing.assert_close(bwd.ys, fwd.ys, atol=1e-7, rtol=0)
    # Closed form of the first bounce: a drop from height 1 takes sqrt(2/g).
    first = float(fwd.event_t.reshape(-1)[0])
    assert abs(first - math.sqrt(2 / GRAV)) < 1e-8


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "backsolve"])
@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_backward_bouncing_ball_gradients_mirror_forward(bc, gradient):
    g = (lambda t, y: y[:, 0]) if bc == "per_sample" else (lambda t, y: y[0, 0])
    ev = Event(g, terminal=False, reset=_bounce)
    tf = torch.tensor([0.0, 2.0], dtype=D)
    grads = []
    for sign, tt in ((-1.0, tf), (1.0, -tf)):
        y0 = torch.tensor([[1.0, 0.0]], dtype=D, requires_grad=True)
        sol = neuralode.solve(
            _fall(sign), y0, tt, event=ev, batch_control=bc, gradient=gradient, **TOL
        )
        assert sol.event_t.numel() == 3
        grads.append([torch.autograd.grad(x, y0, retain_graph=True)[0]
                      for x in (sol.event_t.sum(), sol.ys[-1].sum())])  # fmt: skip
    (te_f, y_f), (te_b, y_b) = grads
    torch.testing.assert_close(te_b, -te_f, rtol=1e-6, atol=1e-8)  # event times mirrored
    torch.testing.assert_close(y_b, y_f, rtol=1e-6, atol=1e-8)


# ------------------------------------------- 2. per-sample Backsolve with a failed sample (throw=False)
GRADS = ["direct", "checkpoint", "backsolve"]


def _blowup(t, y):
    return y**2  # y = y0 / (1 - y0 t): sample y0=1 blows up at t=1, y0=0.2 at t=5


@pytest.mark.parametrize("extra", [None, "event", "integral"])
@pytest.mark.parametrize("gradient", GRADS)
def test_per_sample_failed_sample_gradients(gradient, extra):
    # Backsolve integrated the failed sample back from the end, where it never got to, and
    # raised StepSizeUnderflowError. Its outputs before the failure have gradients as under
    # Direct (dy(t)/dy0 = 1 / (1 - y0 t)^2); those past it are NaN constants.
    y = torch.tensor([[1.0], [0.2]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 0.9, 2.0, 3.0], dtype=D)
    kw = dict(batch_control="per_sample", throw=False, gradient=gradient, rtol=1e-9, atol=1e-12)
    if extra == "event":
        kw["event"] = Event(lambda t, y: y[:, 0] - 1e30)  # never reached by the survivor
    if extra == "integral":
        kw["integral"] = lambda t, y: y[:, 0]
    sol = neuralode.solve(_blowup, y, t, **kw)
    assert sol.status != "success"
    assert abs(float(sol.t_final[0]) - 1.0) < 1e-3 and float(sol.t_final[1]) == 3.0
    assert torch.isnan(sol.ys[3:, 0]).all()
    loss = sol.ys[-1, 1].sum() + sol.ys[1:3, 0].sum()
    want = [1 / 0.5**2 + 1 / 0.1**2, 1 / 0.4**2]
    if extra == "integral":  # d/dy0 of int_0^t y = -ln(1 - y0 t): t / (1 - y0 t)
        loss = loss + sol.integral[-1, 1] + sol.integral[1, 0]
        want = [want[0] + 0.5 / 0.5, want[1] + 3.0 / 0.4]
    (gy,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(gy.reshape(-1), torch.tensor(want, dtype=D), rtol=1e-5, atol=0)


def test_per_sample_backsolve_failed_sample_end_only():
    y = torch.tensor([[1.0], [0.2]], dtype=D, requires_grad=True)
    sol = neuralode.solve(
        _blowup, y, torch.tensor([0.0, 2.0], dtype=D), batch_control="per_sample", throw=False,
        gradient="backsolve",
    )  # fmt: skip
    (gy,) = torch.autograd.grad(sol.ys[-1, 1].sum(), y)
    torch.testing.assert_close(
        gy.reshape(-1), torch.tensor([0.0, 1 / 0.6**2], dtype=D), rtol=1e-4, atol=0
    )


# --------------------------------- 3. tensors captured by func, not among the gradient's params
MISSING = "require grad but are not among the parameters"


class _Decay(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
        self.k = k  # a tensor from outside: not a parameter of the module

    def forward(self, t, y):
        return -self.a * self.k * y


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
@pytest.mark.parametrize("gradient", ["backsolve", "checkpoint"])
@pytest.mark.parametrize("field", ["module", "lambda"])
def test_captured_tensor_warns(field, gradient, bc):
    # Per-sample Backsolve/Checkpointed dropped dL/dk silently; the shared Backsolve with a
    # lambda too when the gradient asked for was only w.r.t. k (its backward never ran).
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    f = _Decay(k) if field == "module" else (lambda t, y: -k * y)
    y0 = torch.ones(2, 1, dtype=D, requires_grad=True)
    with pytest.warns(UserWarning, match=f"{MISSING} of the .*shapes \\(\\)"):
        sol = neuralode.solve(
            f, y0, torch.tensor([0.0, 1.0], dtype=D), batch_control=bc, gradient=gradient, **TOL
        )
    (gk,) = torch.autograd.grad(sol.ys[-1].sum(), k, allow_unused=True)
    assert gk is None
    if field == "module":  # the module's own parameter still gets its gradient: -2 k e^{-k}
        (ga,) = torch.autograd.grad(sol.ys[-1].sum(), f.a)
        assert float(ga) == pytest.approx(-2 * 0.7 * math.exp(-0.7), rel=1e-6)


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
@pytest.mark.parametrize("gradient", ["backsolve", "checkpoint"])
def test_no_warning_for_explicit_params_or_fresh_leaves(gradient, bc):
    import warnings

    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    gm = (neuralode.Backsolve if gradient == "backsolve" else neuralode.Checkpointed)(params=(k,))
    y0 = torch.ones(2, 1, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)

    def fresh(t, y):  # a leaf made afresh on every call has no gradient anyone could read
        return -torch.tensor(0.7, dtype=D, requires_grad=True) * y

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = neuralode.solve(lambda t, y: -k * y, y0, t, batch_control=bc, gradient=gm, **TOL)
        neuralode.solve(fresh, y0, t, batch_control=bc, gradient=gradient, **TOL)
    (gk,) = torch.autograd.grad(sol.ys[-1].sum(), k)
    assert float(gk) == pytest.approx(-2 * math.exp(-0.7), rel=1e-6)


# ------------------------------------------------- 4. per-sample Backsolve and outputs=
def _osc_batch():
    return torch.tensor([[1.0, 0.0], [0.5, 0.3]], dtype=D, requires_grad=True)


def test_per_sample_backsolve_records_its_outputs_mode():
    # outputs= was ignored silently under per-sample control (and stats had no record); at
    # rtol=1e-10 the forward steps outnumber the 50 outputs: "auto" stops, as shared.
    t = torch.linspace(0.0, 10.0, 50, dtype=D)
    for outputs, want_mode in (("auto", "stop"), ("replay", "replay"), ("stop", "stop")):
        y0 = _osc_batch()
        sol = neuralode.solve(
            _osc, y0, t, batch_control="per_sample", gradient=neuralode.Backsolve(outputs=outputs),
            **TOL,
        )  # fmt: skip
        (gy,) = torch.autograd.grad(sol.ys[-1, :, 0].sum() + sol.ys[20, :, 1].sum(), y0)
        assert sol.stats["backsolve_outputs"] == want_mode  # (decided in the backward pass)
        # y0(t) = a cos t + b sin t, y1(t) = -a sin t + b cos t for y = (a, b)
        t20 = float(t[20])
        want = [math.cos(10.0) - math.sin(t20), math.sin(10.0) + math.cos(t20)]
        torch.testing.assert_close(gy, torch.tensor([want] * 2, dtype=D), rtol=0, atol=1e-7)


# ------------------------------------------ 5. max_steps limits the whole solve across events
def _ball_event(bc):
    g = (lambda t, y: y[:, 0]) if bc == "per_sample" else (lambda t, y: y[0, 0])
    return Event(g, direction=-1, terminal=False, reset=_bounce)


def test_max_steps_counts_all_segments_shared():
    # Each segment between events had a fresh budget: max_steps=8 let ~34 steps through.
    y0, t = torch.tensor([[1.0, 0.0]], dtype=D), torch.linspace(0.0, 5.0, 6, dtype=D)
    ev = _ball_event("shared")
    ref = neuralode.solve(_fall(1.0), y0, t, event=ev)
    total = ref.stats["n_accepted"] + ref.stats["n_rejected"]
    assert ref.stats["n_steps"] == ref.stats["n_accepted"] and total > 20
    ok = neuralode.solve(_fall(1.0), y0, t, event=ev, max_steps=total)
    assert ok.status == "success"
    torch.testing.assert_close(ok.ys, ref.ys)
    with pytest.raises(neuralode.MaxStepsError, match=f"max_steps={total - 1} .*whole solve"):
        neuralode.solve(_fall(1.0), y0, t, event=ev, max_steps=total - 1)
    with pytest.raises(neuralode.MaxStepsError, match="max_steps=8 "):
        neuralode.solve(_fall(1.0), y0, t, event=ev, max_steps=8)
    part = neuralode.solve(_fall(1.0), y0, t, event=ev, max_steps=20, throw=False)
    assert part.status == "max_steps" and "max_steps=20" in part.message
    assert 0.0 < part.t_final < 5.0
    later = t > part.t_final
    assert torch.isnan(part.ys[later]).all() and not torch.isnan(part.ys[~later]).any()


def test_max_steps_counts_all_segments_per_sample():
    y0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D)
    t = torch.linspace(0.0, 5.0, 6, dtype=D)
    ev = _ball_event("per_sample")
    with pytest.raises(neuralode.MaxStepsError, match="after 8 step attempts.*max_steps=8"):
        neuralode.solve(_fall(1.0), y0, t, event=ev, batch_control="per_sample", max_steps=8)
    ok = neuralode.solve(_fall(1.0), y0, t, event=ev, batch_control="per_sample", max_steps=200)
    assert ok.status == "success" and not torch.isnan(ok.ys).any()
    part = neuralode.solve(
        _fall(1.0), y0, t, event=ev, batch_control="per_sample", max_steps=20, throw=False
    )
    assert part.status == "max_steps"
    assert torch.isnan(part.ys[-1]).all()  # neither sample reached t=5 within 20 attempts


# ------------------------- 6. per-sample non-terminal events: t_final and stats over segments
def test_per_sample_non_terminal_failed_sample_t_final_and_stats():
    # y' = y^2: sample 1 (y0 = 1) blows up at t = 1; sample 2 (y0 = -1, y = -1/(1+t)) crosses
    # -0.6 at t = 2/3; sample 0 (y0 = 0.5) has no event. t_final was [2, 2, 2] and the stats
    # had no per-sample counts.
    y0 = torch.tensor([[0.5], [1.0], [-1.0]], dtype=D)
    t = torch.linspace(0.0, 1.9, 5, dtype=D)
    ev = Event(lambda t, y: y[:, 0] + 0.6, terminal=False)
    kw = dict(batch_control="per_sample", throw=False, rtol=1e-8, atol=1e-10)
    sol = neuralode.solve(_blowup, y0, t, event=ev, **kw)
    plain = neuralode.solve(_blowup, y0, t, **kw)
    assert sol.status == "dt_underflow"
    assert sol.t_final.shape == (3,)
    assert float(sol.t_final[0]) == 1.9 and float(sol.t_final[2]) == 1.9
    assert abs(float(sol.t_final[1]) - 1.0) < 1e-3
    torch.testing.assert_close(sol.t_final, plain.t_final)
    assert sol.stats["failed_samples"] == [1]
    assert abs(float(sol.event_t[0, 2]) - 2.0 / 3.0) < 1e-7
    for key in ("n_accepted", "n_rejected", "n_steps"):
        v = sol.stats[key]
        assert isinstance(v, torch.Tensor) and v.shape == (3,) and v.dtype == torch.long
    torch.testing.assert_close(sol.stats["n_steps"], sol.stats["n_accepted"])
    # Samples 0 and 1 have no event: one segment each, the steps of the plain solve.
    torch.testing.assert_close(sol.stats["n_accepted"][:2], plain.stats["n_accepted"][:2])
    # Sample 2 runs in two segments (to its event, then on): more steps than without it.
    assert int(sol.stats["n_accepted"][2]) > int(plain.stats["n_accepted"][2]) > 0
    assert sol.stats["sample_evals"] >= plain.stats["sample_evals"] > 0
    assert "n_iterations" in sol.stats and "wasted_share" in sol.stats


def test_shared_terminal_event_failed_solve_reports_its_status():
    # A terminal event solve that failed (throw=False) said status "success", t_final = end.
    sol = neuralode.solve(
        _blowup, torch.tensor([[1.0]], dtype=D), torch.linspace(0.0, 2.0, 5, dtype=D),
        event=Event(lambda t, y: y[0, 0] - 1e30), throw=False,
    )  # fmt: skip
    assert sol.status == "dt_underflow" and "underflow" in sol.message
    assert abs(sol.t_final - 1.0) < 1e-3
    assert torch.isnan(sol.ys[3:]).all()


# ------------------------------------------------------------------ 7. clearer error messages
def _decay(t, y):
    return -y


@pytest.mark.parametrize("terminal", [True, False])
def test_per_sample_event_with_captured_per_sample_constant_says_why(terminal):
    y0 = torch.tensor([[1.0], [2.0], [3.0]], dtype=D)
    thr = torch.tensor([0.5, 0.4, 0.3], dtype=D)
    ev = Event(lambda t, y: y[:, 0] - thr, terminal=terminal)
    with pytest.raises(ValueError, match=r"event function.*rows being integrated.*in the state"):
        neuralode.solve(_decay, y0, torch.tensor([0.0, 3.0], dtype=D), event=ev,
                        batch_control="per_sample")  # fmt: skip
    # What the message suggests works: the threshold as a state component with zero derivative.
    z0 = torch.cat([y0, thr.unsqueeze(1)], 1)
    sol = neuralode.solve(
        lambda t, z: torch.stack([-z[:, 0], torch.zeros_like(z[:, 1])], 1), z0,
        torch.tensor([0.0, 3.0], dtype=D), event=Event(lambda t, z: z[:, 0] - z[:, 1]),
        batch_control="per_sample", **TOL,
    )  # fmt: skip
    want = torch.log(y0[:, 0] / thr)  # y0 e^{-t} = thr
    torch.testing.assert_close(sol.event_t, want, atol=1e-8, rtol=0)


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_reset_with_wrong_shape_names_reset(bc):
    g = (lambda t, y: y[:, 0] - 0.5) if bc == "per_sample" else (lambda t, y: y[0, 0] - 0.5)
    ev = Event(g, terminal=False, reset=lambda t, y: y[:, :1].repeat(1, 2))
    with pytest.raises(ValueError, match=r"returned by Event\(reset=...\) has shape") as info:
        neuralode.solve(_decay, torch.tensor([[1.0], [2.0]], dtype=D),
                        torch.tensor([0.0, 3.0], dtype=D), event=ev, batch_control=bc)  # fmt: skip
    assert "func must return" not in str(info.value)


@pytest.mark.parametrize("bc", ["shared", "per_sample"])
def test_evaluate_on_an_event_solve_works_up_to_the_event(bc):
    # (Formerly refused; dense output of event solves: tests/test_events_dense.py.)
    g = (lambda t, y: y[:, 0] - 0.5) if bc == "per_sample" else (lambda t, y: y[0, 0] - 0.5)
    sol = neuralode.solve(_decay, torch.tensor([[1.0]], dtype=D),
                          torch.tensor([0.0, 3.0], dtype=D), event=Event(g), batch_control=bc)  # fmt: skip
    y = sol.evaluate(torch.tensor([0.5], dtype=D))
    torch.testing.assert_close(y.reshape(()), torch.tensor(math.exp(-0.5), dtype=D), atol=1e-5,
                               rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"outside (the|its) solved interval \[0\.0, 0\.69"):
        sol.evaluate(torch.tensor([1.0], dtype=D))


# ----------------------------------------- 8. a custom norm returning one element per sample
def test_per_sample_norm_may_return_a_one_element_tensor():
    # The shared driver takes a norm of shape (1,); per sample it was refused.
    y0 = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=D)
    t = torch.linspace(0.0, 5.0, 4, dtype=D)

    def solve(norm):
        ctrl = neuralode.PIController(rtol=1e-6, atol=1e-8, norm=norm)
        return neuralode.solve(_osc, y0, t, controller=ctrl, batch_control="per_sample")

    scalar = solve(lambda x: x.abs().max())
    one = solve(lambda x: x.abs().max().reshape(1))
    torch.testing.assert_close(one.ys, scalar.ys)
    torch.testing.assert_close(one.stats["n_accepted"], scalar.stats["n_accepted"])
    exact = torch.stack([y0[:, 0] * math.cos(5.0) + y0[:, 1] * math.sin(5.0)])
    torch.testing.assert_close(one.ys[-1, :, 0], exact[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"0-d tensor \(or a one-element one.*got \(2,\)"):
        solve(lambda x: x.abs().amax(0).reshape(-1)[:2])
