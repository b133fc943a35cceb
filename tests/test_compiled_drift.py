"""compile=True with per-sample control follows the eager per-row driver where they once drifted.

The compiled per-sample driver (neuralode._compiled_rows) starts a solve with the engine's own
pieces: the controller's first stage time (f's limit from inside the interval at a jump_t at
t0), the eager driver's output and time layout, and the one "raise or record" of a failure
(neuralode._failures.report_failure). One field and one controller serve every test here, so
one compiled version (a few tens of seconds to compile) serves them all.
"""

import math
import re

import pytest
import torch

import neuralode

F64 = torch.float64
T = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
# A jump_t at t0: f is discontinuous there (f(0) = y^2, f(0+) = 1 + y^2).
KW = dict(
    controller=neuralode.PIController(rtol=1e-9, atol=1e-11, jump_t=[0.0]),
    batch_control="per_sample",
    dense_output=False,
)


def field(t, y):
    """``y' = 1[t > 0] + y^2``: from y(0) = y0, ``y = tan(t + atan(y0))`` for t > 0, which
    blows up at ``t = pi/2 - atan(y0)``. ``t`` is (B,) (per-sample control)."""
    return (t > 0).to(y.dtype).reshape(-1, 1) + y * y


def test_first_stage_just_past_a_jump_t_at_t0_equals_eager_and_closed_form():
    # Before the fix the compiled first stage saw f(t0) = y^2 (the left limit): y(1) was off
    # by about 1e-6 (0.99999927 for f = 1[t > 0] from 0), the eager driver and shared control
    # not.
    y0 = torch.tensor([[0.0], [0.5]], dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(field, y0, T, compile=True, **KW)
        ref = neuralode.solve(field, y0, T, **KW)
    assert sol.stats["compiled"] is True
    assert torch.equal(sol.stats["n_accepted"], ref.stats["n_accepted"])
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-14)
    exact = torch.tan(T.view(-1, 1, 1) + torch.atan(y0))
    torch.testing.assert_close(sol.ys, exact, rtol=1e-8, atol=0.0)


def _outcome(compile, y0, throw):
    """``(exception or None, solution or None)`` of one solve."""
    try:
        with torch.no_grad():
            return None, neuralode.solve(field, y0, T, compile=compile, throw=throw, **KW)
    except neuralode.StepSizeUnderflowError as e:
        return e, None


def test_failure_of_one_sample_is_raised_and_recorded_as_eagerly():
    # Sample 1 blows up at t = pi/2 - atan(5) ~ 0.197, sample 0 reaches t = 1.
    y0 = torch.tensor([[0.0], [5.0]], dtype=F64)
    (err, _), (want, _) = _outcome(True, y0, True), _outcome(False, y0, True)
    assert err is not None and want is not None and type(err) is type(want)
    assert err.sample == want.sample == 1
    assert "(compiled stepping)" in str(err)
    # The same message apart from the engine's name; the failure times agree to rounding.
    msg = str(err).replace(" (compiled stepping)", "")
    num = r"[-+0-9.e]+"
    assert re.sub(num, "#", msg) == re.sub(num, "#", str(want))
    assert err.t == pytest.approx(want.t, rel=1e-6)
    assert err.t == pytest.approx(math.pi / 2 - math.atan(5.0), rel=1e-5)

    (_, sol), (_, ref) = _outcome(True, y0, False), _outcome(False, y0, False)
    assert sol.stats["compiled"] is True
    assert sol.status == ref.status == "dt_underflow"
    assert sol.stats["failed_samples"] == ref.stats["failed_samples"] == [1]
    assert re.sub(num, "#", sol.message.replace(" (compiled stepping)", "")) == re.sub(
        num, "#", ref.message
    )
    torch.testing.assert_close(sol.ys[:, 0], torch.tan(T).view(-1, 1), rtol=1e-8, atol=0.0)
    assert torch.equal(sol.ys[:, 1].isnan(), ref.ys[:, 1].isnan())
