"""compile=True x batch_control="per_sample" x Checkpointed / Backsolve.

The forward runs in compiled chunks of the masked per-row step, which record every step's
times, accepted rows and starting states; from them the per-sample gradient methods of
gradients/rows.py get what the eager per-sample driver would have kept (Checkpointed: the
states to replay; Backsolve: the step that wrote each output, for its replays). Checkpointed
replays eagerly; Backsolve's adjoint solve runs in compiled chunks too where it stops at every
output (neuralode._compiled_rows_adjoint), else eagerly. So gradients equal the eager
per-sample method's (the steps are the same up to the last bits of the error estimate) and
the closed form to the solve's tolerance.

The field is linear with a rate that jumps at t = 0.4, ``f(t, y) = c(t) A y`` with
``c = 1 + [t > 0.4] / 2``, solved with ``jump_t=[0.4]``: a step ending there evaluates its last
stage at the left limit and the next step's first at the right limit, which the replays and
the adjoint's parameter integral must reproduce from the recorded times (a wrong limit moves
the gradients by ~1e-2 for Checkpointed, ~1e-4 for the Backsolve replays: checked by mutating
them). The flow is ``expm(A s(t))`` with ``s = int c dt``: the closed form (y0, A and t
gradients by autograd through ``torch.linalg.matrix_exp``). Each sample has its own grid of a
2-D t (forward, backward, repeated final times) with outputs just past the jump, so the
samples take different numbers of steps. A tuple state without ``jump_t`` covers the other
branches. Compilation dominates the run time (six compiled versions: per field the recording
forward, the plain forward and the adjoint): every compiled solve is made once in a
module-scoped fixture, with one step unrolled per call (a smaller graph).
"""

import pytest
import torch

import neuralode
import neuralode._compiled as compiled

F64 = torch.float64
TOL = dict(rtol=1e-8, atol=1e-10)
JUMP = 0.4
CTRL = neuralode.PIController(**TOL, jump_t=[JUMP])


class JumpLinear(torch.nn.Module):
    """``c(t) A y`` with ``c = 1 + [t > 0.4] / 2``; ``t`` is (B,) per sample."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.3, 1.1], [-0.9, -0.2]], dtype=F64))

    def forward(self, t, y):
        c = 1.0 + 0.5 * (t > JUMP).to(y.dtype)
        return c.reshape(-1, 1) * (y @ self.A.T)


FIELD = JumpLinear()
Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)
# Forward over the jump; backward from a later start over it; a short forward one past it whose
# last times repeat. Outputs just past the jump (in the steps that start or end there, which
# the backsolve adjoint replays) and a different number of steps per sample.
T2 = torch.tensor(
    [
        [0.0, 0.125, 0.25, 0.375, 0.4005, 0.5, 0.625, 0.875, 1.0],
        [0.5, 0.42, 0.125, -0.25, -0.625, -1.0, -1.5, -2.0, -2.5],
        [0.2, 0.3, 0.6, 0.9, 1.3, 1.7, 3.0, 3.0, 3.0],
    ],
    dtype=F64,
)
W = torch.tensor([1.0, -2.0], dtype=F64)


def _loss(ys):  # ys (T, B, 2): every output, the third output squared
    return (ys * W).sum() + ys[2].square().sum()


def _grads(compile, gradient, **kw):
    """Solve (per sample, 2-D t, jump_t) and return the solution and the loss's gradients
    w.r.t. y0, t and A (NaN outputs of failed samples count as 0); ``kw``: more arguments."""
    y0, t = Y0.clone().requires_grad_(), T2.clone().requires_grad_()
    sol = neuralode.solve(FIELD, y0, t, compile=compile, gradient=gradient, controller=CTRL,
                          batch_control="per_sample", **kw)  # fmt: skip
    grads = torch.autograd.grad(_loss(torch.nan_to_num(sol.ys)), [y0, t, FIELD.A])
    return sol, grads


def _closed_form(jumps=True):
    """The outputs and the loss's gradients w.r.t. y0, t and A (``jumps=False``: c = 1)."""
    y0, t = Y0.clone().requires_grad_(), T2.clone().requires_grad_()
    A = FIELD.A.detach().clone().requires_grad_()
    t0 = t[:, :1]
    s = t - t0  # int_t0^t c
    if jumps:
        s = s + 0.5 * (torch.relu(t - JUMP) - torch.relu(t0 - JUMP))
    ys = torch.einsum("btij,bj->tbi", torch.linalg.matrix_exp(A * s[..., None, None]), y0)
    return ys.detach(), torch.autograd.grad(_loss(ys), [y0, t, A])


GRADS = {
    "checkpoint": "checkpoint",
    "checkpoint_max2": neuralode.Checkpointed(max_checkpoints=2),
    "backsolve": "backsolve",
    "backsolve_replay": neuralode.Backsolve(outputs="replay"),
}


@pytest.fixture(scope="module")
def solves():
    """(solution, grads) per (gradient key, compile[, variant]): the compiled solves and their
    eager references; Direct and the closed form."""
    out = {"direct": _grads(False, "direct"), "closed": _closed_form()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 1)
        for key, gradient in GRADS.items():
            for comp in (True, False):
                out[key, comp] = _grads(comp, gradient)
                if key == "checkpoint_max2":
                    continue
                # (the same compiled versions: the step limit and dense output change no
                # constant of the chunk)
                out[key, comp, "failed"] = _grads(comp, gradient, max_steps=20, throw=False)
                out[key, comp, "dense"] = _grads(comp, gradient, dense_output=True)
    return out


def _close(got, want, rtol, atol):
    for g, w, name in zip(got, want, ("y0", "t", "A")):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("key", ["checkpoint", "checkpoint_max2"])
def test_compiled_checkpointed_equals_eager_and_direct(solves, key):
    sol, grads = solves[key, True]
    ref, ref_grads = solves[key, False]
    assert sol.stats["compiled"] is True
    # The samples take their own, different numbers of steps, as eagerly.
    n_acc = sol.stats["n_accepted"]
    assert len(set(n_acc.tolist())) == 3
    assert torch.equal(n_acc, ref.stats["n_accepted"])
    if key == "checkpoint_max2":
        assert sol.stats["n_checkpoints"] <= 2  # the others recomputed in the backward pass
    # The same steps (to the last bits of the error estimate): gradients equal to rounding.
    _close(grads, ref_grads, rtol=1e-9, atol=1e-11)
    _close(grads, solves["direct"][1], rtol=1e-9, atol=1e-11)
    ys, closed = solves["closed"]
    torch.testing.assert_close(sol.ys, ys, rtol=0, atol=2e-7)
    _close(grads, closed, rtol=0, atol=2e-6)  # the solve's own error (rtol 1e-8)


@pytest.mark.parametrize("key", ["backsolve", "backsolve_replay"])
def test_compiled_backsolve_equals_eager_backsolve(solves, key):
    sol, grads = solves[key, True]
    ref, ref_grads = solves[key, False]
    assert sol.stats["compiled"] is True
    assert torch.equal(sol.stats["n_accepted"], ref.stats["n_accepted"])
    # Stopping at every output ("auto" here), the adjoint solve runs in compiled chunks too;
    # replaying forward steps, eagerly.
    mode = "stop" if key == "backsolve" else "replay"
    assert sol.stats["backsolve_outputs"] == ref.stats["backsolve_outputs"] == mode
    assert sol.stats["compiled_backward"] is (mode == "stop")
    if mode == "replay":
        assert sol.stats["nfe_backward_replay"] == ref.stats["nfe_backward_replay"] > 0
    # The backward solve starts from the compiled forward's final state, within a few rounding
    # errors of the eager one, and takes the same steps: the gradients agree closely.
    _close(grads, ref_grads, rtol=1e-8, atol=1e-10)
    # Against Direct and the closed form: within the tolerance of the two solves.
    _close(grads, solves["direct"][1], rtol=0, atol=2e-6)
    _close(grads, solves["closed"][1], rtol=0, atol=2e-6)


@pytest.mark.parametrize("key", ["checkpoint", "backsolve", "backsolve_replay"])
def test_compiled_failed_samples_and_dense_output_equal_eager(solves, key):
    # throw=False: samples 1 and 2 stop at the step limit (their later outputs NaN); both
    # methods differentiate the outputs written before, from the compiled forward's records.
    sol, grads = solves[key, True, "failed"]
    ref, ref_grads = solves[key, False, "failed"]
    assert sol.stats["compiled"] is True and sol.status == ref.status == "max_steps"
    if key == "backsolve":  # failed samples solved back from their last written output
        assert sol.stats["compiled_backward"] is True
    assert sol.stats["failed_samples"] == ref.stats["failed_samples"] == [1, 2]
    assert torch.equal(sol.ys.isnan(), ref.ys.isnan())
    _close(grads, ref_grads, rtol=1e-8, atol=1e-10)
    # Dense output recorded by the same compiled forward.
    sol, grads = solves[key, True, "dense"]
    ref, ref_grads = solves[key, False, "dense"]
    _close(grads, ref_grads, rtol=1e-8, atol=1e-10)
    t = torch.tensor([[0.3], [-1.1], [2.0]], dtype=F64)
    with pytest.warns(UserWarning, match="detached values"):
        got, want = sol.evaluate(t), ref.evaluate(t)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


class PairLinear(torch.nn.Module):
    """``A y`` on the state as a pair ``(u (B, 1), v (B, 1))``."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(FIELD.A.detach().clone())

    def forward(self, t, y):
        u, v = y
        dy = torch.cat([u, v], 1) @ self.A.T
        return dy[:, :1], dy[:, 1:]


PAIR = PairLinear()


@pytest.fixture(scope="module")
def pair_solves():
    """Per-sample solves of the pair state (c = 1, no jump_t): (ys, grads w.r.t. u0, v0, A,
    stats) per (gradient key, compile)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "STEPS_PER_CALL", 1)
        for key in ("checkpoint", "backsolve"):
            for comp in (True, False):
                u0, v0 = Y0[:, :1].clone().requires_grad_(), Y0[:, 1:].clone().requires_grad_()
                sol = neuralode.solve(PAIR, (u0, v0), T2, compile=comp, gradient=GRADS[key],
                                      batch_control="per_sample", **TOL)  # fmt: skip
                ys = torch.cat(sol.ys, -1)
                out[key, comp] = ys, torch.autograd.grad(_loss(ys), [u0, v0, PAIR.A]), sol.stats
    return out


@pytest.mark.parametrize("key", ["checkpoint", "backsolve"])
def test_compiled_gradients_of_a_tuple_state_equal_eager(pair_solves, key):
    ys, grads, stats = pair_solves[key, True]
    ys_ref, ref, _ = pair_solves[key, False]
    assert stats["compiled"] is True
    if key == "backsolve":
        assert stats["compiled_backward"] is True
    torch.testing.assert_close(ys, ys_ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grads, ref, rtol=1e-8, atol=1e-10)
    # The closed form, split by component (the solve's tolerance).
    ys_exact, (y0_grad, _, a_grad) = _closed_form(jumps=False)
    torch.testing.assert_close(ys, ys_exact, rtol=0, atol=2e-7)
    want = (y0_grad[:, :1], y0_grad[:, 1:], a_grad)
    torch.testing.assert_close(grads, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gradient="reversible", batch_control="per_sample"), r"gradient=Reversible"),
        (
            dict(gradient=neuralode.Checkpointed(max_checkpoints=4)),
            r"compile=True with batch_control='shared' keeps a checkpoint at every step: "
            r"Checkpointed\(max_checkpoints=...\) is not supported",
        ),
        (dict(gradient="backsolve", batch_control="per_sample", solver="kvaerno5"), "kvaerno5"),
    ],
)
def test_what_compile_still_refuses_raises_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neuralode.solve(FIELD, Y0, T2[0], compile=True, **kwargs)
