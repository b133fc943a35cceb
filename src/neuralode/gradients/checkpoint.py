"""Checkpointed gradients: exact (equal to Direct to rounding) with bounded memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._loop import integrate, replay_step, sorted_outputs_grad
from ._common import (
    Run,
    check_params,
    check_params_rows,
    find_params,
    forward_without_graph,
    held_run,
    hold_run,
)

__all__ = ["Checkpointed"]


@dataclass(frozen=True)
class Checkpointed:
    """Store states at accepted steps in the forward pass; recompute each step with autograd in
    the backward pass.

    The gradient equals :class:`Direct`'s to rounding (the replayed steps use the recorded step
    sizes and bitwise the same arithmetic) while the memory holds the checkpointed states plus
    the graph of one step. With ``max_checkpoints`` the number of stored states is bounded online:
    whenever it is exceeded every second checkpoint is dropped, and the backward pass recomputes
    the missing states from the previous checkpoint (at most about twice the forward work).

    Gradients of gradients (``create_graph=True``) are supported by replaying the whole solve
    with a graph in the backward pass (then memory is that of :class:`Direct`); not under
    ``batch_control="per_sample"``, where they raise RuntimeError (use :class:`Direct` there).

    func must be deterministic: the backward pass evaluates it again (to replay every step with a graph), so a
    random func (``nn.Dropout`` in training mode, noise drawn inside func) gives the gradient
    of different draws than the forward pass used, silently. Draw the randomness outside func
    (a fixed mask or noise tensor per solve), or use :class:`~neuralode.Direct`.

    Parameters
    ----------
    max_checkpoints : int, optional
        Upper bound on stored states (>= 2). Default: one per accepted step. Under
        ``batch_control="per_sample"``: on stored working-set states, one per iteration of the
        per-sample driver by default (``Solution.stats["n_checkpoints"]`` counts those kept).
    params : sequence of Tensor, optional
        Tensors to differentiate besides y0. Default: the parameters of ``func`` when it is an
        ``nn.Module`` (or a bound method of one); none for a plain function or lambda. A
        UserWarning is given (one or two evaluations of func at the start with graph building
        on, under either ``batch_control``) when func uses a tensor requiring grad that is not
        among them: its gradient is not computed (``None``/unchanged).

    References
    ----------
    Zhuang et al., "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural ODE",
    ICML 2020 (store accepted steps, replay them). Griewank & Walther, "Algorithm 799: Revolve",
    ACM TOMS 2000 (checkpointing with bounded memory).
    """

    max_checkpoints: int | None = None
    params: tuple | None = None

    def __post_init__(self):
        if self.max_checkpoints is not None and (
            not isinstance(self.max_checkpoints, int) or self.max_checkpoints < 2
        ):
            raise ValueError(
                f"Checkpointed(max_checkpoints=...) must be an integer >= 2, got {self.max_checkpoints!r}"
            )

    exact_autograd = False  # capabilities: a custom backward pass, with a per-sample version
    per_sample = True
    compiled_forward = True  # the forward may run in compiled chunks (compile=True)
    replays_steps = True  # the backward pass recomputes single accepted steps

    def run_rows(self, run, y0flat: torch.Tensor):
        """The per-sample solve (``batch_control="per_sample"``): every iteration of the
        per-sample driver is replayed with autograd in the backward pass; ``max_checkpoints``
        bounds the iterations whose working-set states are kept (the others are recomputed
        from the previous kept one, as in the shared solve)."""
        from .rows import checkpointed_rows

        params = find_params(run.func, self.params, "Checkpointed(params=...)")
        if torch.is_grad_enabled():
            check_params_rows(run, y0flat, params, "checkpointed")
        return checkpointed_rows(run, y0flat, params, self.max_checkpoints)

    def run(self, run: Run, y0flat: torch.Tensor):
        params = find_params(run.func, self.params, "Checkpointed(params=...)")
        if torch.is_grad_enabled():
            check_params(run, y0flat, params, "checkpointed")
        return _CheckpointFn.apply(run, self, y0flat, *params)


class _CheckpointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Run, cfg: Checkpointed, y0flat, *params):
        res = forward_without_graph(run, y0flat, "states", max_states=cfg.max_checkpoints)
        hold_run(ctx, run)  # weakly: the outputs' nodes hold it (see structured_outputs)
        ctx.n_params = len(params)
        ctx.save_for_backward(y0flat, *params)
        ys, res.ys = res.ys, None  # (the run need not keep the outputs)
        return ys

    @staticmethod
    def backward(ctx, g_ys):
        run = held_run(ctx)
        y0flat, *params = ctx.saved_tensors
        prob = run.prob
        if torch.is_grad_enabled():
            # create_graph=True: replay the whole solve with a graph from the saved inputs, so
            # that the returned gradients are differentiable w.r.t. y0 and the parameters.
            y0g = y0flat if y0flat.requires_grad else y0flat.detach().requires_grad_()
            f = run.vector_field()
            res = integrate(prob, f, y0g, track_grad=True, throw=False)
            grads = torch.autograd.grad(
                res.ys, [y0g, *params], g_ys, create_graph=True, allow_unused=True
            )
            run.stats["nfe_backward"] = f.nfe
            return (None, None, *_zeros_for_none(grads, [y0flat, *params]))
        f = run.vector_field()
        stepper = run.stepper
        steps = run.result.steps
        g_sorted = sorted_outputs_grad(prob, g_ys)
        samples = run.samples_all
        a = torch.zeros_like(run.result.y_final)
        gp = [torch.zeros_like(p) for p in params]
        i = len(steps) - 1
        while i >= 0:
            j = i
            while steps[j].y is None:
                j -= 1
            seg = [steps[j].y]
            with torch.no_grad():
                for k in range(j, i):
                    seg.append(
                        replay_step(prob, stepper, f, steps[k], seg[-1], samples, outputs=False)[0]
                    )
            for k in range(i, j - 1, -1):
                rec = steps[k]
                yk = seg[k - j].detach().requires_grad_()
                with torch.enable_grad():
                    y_new, vals, _ = replay_step(prob, stepper, f, rec, yk, samples)
                outs, gs = [y_new], [a]
                if vals is not None:
                    outs.append(vals)
                    gs.append(g_sorted[rec.out_lo : rec.out_hi])
                # retain_graph: params computed outside func (w = 2 * a, params=[a]) share the
                # user's subgraph w <- a, traversed by every step; the step's graph goes with outs.
                grads = torch.autograd.grad(
                    outs, [yk, *params], gs, allow_unused=True, retain_graph=True
                )
                a = grads[0] if grads[0] is not None else torch.zeros_like(a)
                for q, gq in enumerate(grads[1:]):
                    if gq is not None:
                        gp[q] = gp[q] + gq
            i = j - 1
        a = add_initial_outputs(a, g_sorted, n_initial_outputs(prob), samples)
        run.stats["nfe_backward"] = f.nfe
        return (None, None, a, *gp)


def n_initial_outputs(prob) -> int:
    """How many of the sorted outputs lie at the initial time (they equal y0); the others
    are reached by steps, or not at all when the solve stopped early (``throw=False``: NaN
    outputs, constants without a gradient, as under Direct)."""
    n = 0
    while n < len(prob.out_t) and prob.out_t[n] == prob.t0:
        n += 1
    return n


def add_initial_outputs(a, g_sorted, n0: int, samples):
    """Add the gradients of outputs at t0 (the first ``n0`` sorted outputs equal y0)."""
    if n0 == 0:
        return a
    g0 = g_sorted[:n0]
    if samples is None:
        return a + g0.sum(0)
    return a.index_add(0, samples[:n0], g0)


def _zeros_for_none(grads, like):
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, like)]
