"""compile=True x batch_control="per_sample" x Backsolve puts the forward's y back (re-anchoring).

The per-sample backsolve adjoint under ``compile=True`` runs its backward solve in compiled
chunks where it stops at every output (``outputs="auto"``): on landing on a row's output slot
the chunk adds the adjoint's jump and sets y to the forward's output there (``k["RP"]``), and
f is evaluated afresh at that y. With ``outputs="replay"`` the forward runs compiled (its step
keeper fills ``state["out_y"]``, the start state of the step that wrote each output) and the
backward solve eagerly, which puts y back at the start of every replayed step. Without the
put-back the y solved backward leaves the trajectory of a contracting field exponentially
(relative error in the gradient of W before the fix: 5.6e-1 with either; after: 3.2e-9 and
6.1e-9, as eagerly). One compilation per graph (20-90 s each on 2 cores): every solve is made
once in a module-scoped fixture.
"""

import pytest
import torch

import neuralode
import neuralode._compiled as compiled
import neuralode.gradients.rows as rows
from test_backsolve_reanchor import Contracting  # dy/dt = -k y + tanh(W y + b)

F64 = torch.float64
FWD = dict(rtol=1e-8, atol=1e-10)
ADJ = dict(rtol=1e-10, atol=1e-12)
Y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
T1 = torch.linspace(0.0, 5.0, 21, dtype=F64)
# Each sample its own grid (2-D t) on about [0, 5]: different times and ends per row.
T2 = torch.stack(
    [T1, torch.linspace(0.0, 4.0, 21, dtype=F64) + 0.013 * T1 / 5, T1.pow(1.2) * 0.9 / 5**0.2]
)


FIELD = Contracting()


def _grads(gradient, compile):
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(FIELD, y0, T2, **FWD, gradient=gradient, compile=compile,
                          batch_control="per_sample")  # fmt: skip
    w = torch.linspace(0.5, 1.5, sol.ys.numel(), dtype=F64).view(sol.ys.shape)
    return sol, torch.autograd.grad((w * sol.ys).sum(), [y0, FIELD.w, FIELD.b])


@pytest.fixture(scope="module")
def solves():
    """(solution, grads) per outputs= of the compiled solves, Direct's grads, and the start
    states of the steps that wrote each output (``state["out_y"]``) that the backward pass
    of outputs="replay" read, compiled and eager."""
    out = {"direct": _grads("direct", False)[1]}
    stops = rows._stops

    def spy(run, *args):  # keep what the forward left for the backward pass
        out["out_y", run.compile] = run.result[4].get("out_y")
        return stops(run, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 2)
        mp.setattr(rows, "_stops", spy)
        for outputs in ("auto", "replay"):
            out[outputs] = _grads(neuralode.Backsolve(**ADJ, outputs=outputs), True)
        _grads(neuralode.Backsolve(**ADJ, outputs="replay"), False)
    return out


def _rel(got, want):
    return [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


@pytest.mark.parametrize(
    ("outputs", "mode", "compiled_backward"), [("auto", "stop", True), ("replay", "replay", False)]
)
def test_compiled_per_sample_backsolve_matches_direct(solves, outputs, mode, compiled_backward):
    """21 outputs per sample on about [0, 5]: y0, W and b gradients against Direct."""
    sol, got = solves[outputs]
    assert sol.stats["compiled"] is True
    assert sol.stats["backsolve_outputs"] == mode
    assert sol.stats["compiled_backward"] is compiled_backward
    errs = _rel(got, solves["direct"])
    assert max(errs) < 1e-5, errs


def test_compiled_forward_keeps_the_start_states_of_the_steps_with_outputs(solves):
    """The compiled per-row forward fills ``state["out_y"]`` as the eager driver does (the same
    steps up to the last bits of the error estimate; NaN for the outputs at t0)."""
    got, want = solves["out_y", True], solves["out_y", False]
    assert got is not None and got.shape == (T2.numel(), Y0.shape[1])
    assert torch.isnan(got[: Y0.shape[0]]).all() and not torch.isnan(got[Y0.shape[0] :]).any()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
