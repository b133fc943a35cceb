"""Reversible gradients: exact gradients of an algebraically reversible Runge--Kutta scheme in
memory that does not grow with the number of steps (McCallum & Foster 2024)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch

from .._loop import sorted_outputs_grad
from ..solvers.tableau import ButcherTableau
from ._common import Run, check_params, find_params, held_run, hold_run
from ._reversible_loop import integrate_reversible
from .checkpoint import n_initial_outputs

__all__ = ["Reversible"]


@dataclass(frozen=True)
class Reversible:
    r"""Make the explicit Runge--Kutta method reversible and differentiate it exactly in
    constant memory.

    The solve carries a pair of states ``(y, z)``, both starting at ``y0``. With ``Psi(t, x, h)``
    the increment of one step of the chosen explicit Runge--Kutta method (``x + Psi`` is its step
    from ``(t, x)`` over ``h``; ``h`` may be negative), a step from ``t_n`` to ``t_{n+1} = t_n + h``
    is::

        y_{n+1} = lam * y_n + (1 - lam) * z_n + Psi(t_n, z_n, h)
        z_{n+1} = z_n - Psi(t_{n+1}, y_{n+1}, -h)

    and ``y`` is the solution returned. The step is inverted algebraically (no solve)::

        z_n = z_{n+1} + Psi(t_{n+1}, y_{n+1}, -h)
        y_n = (y_{n+1} - (1 - lam) * z_n - Psi(t_n, z_n, h)) / lam

    The forward pass keeps no graph and stores only the step times and the final pair (plus the
    pairs at restarts and anchors, below). The backward pass walks the steps in reverse: it reconstructs
    ``(y_n, z_n)`` from ``(y_{n+1}, z_{n+1})`` with the inverse above, and backpropagates through
    that step with the vector field's vector-Jacobian products (``torch.autograd.grad`` on each of
    the two increments of the step, evaluated once with a graph; their values also serve the
    reconstruction). The gradient is the exact gradient of the reversible scheme (equal to
    autograd through it, to rounding), autograd memory is one step's graph whatever the number
    of steps, and the backward pass costs about twice the forward.

    **Anchors.** The inverse divides by ``lam``: an error in the reconstructed states (rounding)
    grows by about ``1 / lam`` per step walked back in a slowly varying mode. So the forward pass
    also stores the pair every ``K = floor(log(1e4) / -log(lam))`` steps since the last stored
    one (``lam**-K <= 1e4``: every 9,205 steps at the default, 87 at 0.9, 13 at 0.5), and the
    backward pass restarts its reconstruction from it: memory is ``O(n log(1 / lam))`` states
    for ``n`` steps, none below 9,205 steps at the default (``stats["reversible_anchors"]``
    counts them). The backward pass also compares its reconstruction, for free, with every
    stored pair and with ``y0``: ``stats["reversible_reconstruction_error"]`` is the largest
    relative (max-norm) difference, and above ``sqrt(eps)`` of the dtype (1.5e-8 in float64)
    a RuntimeWarning says that the gradient is inaccurate (decaying modes amplify by about
    ``lam / R(h mu)**2`` per step, which anchors do not bound; restarts do).

    **Restarts.** Linearised, a decaying mode of f with ``|h mu|`` above about ``1 - lam`` makes
    the parasitic mode ``y - z`` grow (see ``coupling``), and without a remedy the solution goes
    wrong on dissipative problems with the default coupling (DETEST C1: error 3e6; B1: 12; E2:
    step collapse; ``y' = -50 y`` over [0, 10] grows to 1e210). So after every accepted step the
    gap between the two states is tested, and when it calls for it the pair is stored and ``z``
    restarts from ``y`` (``z_{n+1} := y_{n+1}``, which makes the next step the plain method's).
    The backward pass takes the stored pair when it reaches that step, so the scheme stays
    exactly invertible and the gradient exact (``z := y`` is differentiated like any
    assignment), reconstruction errors do not carry across a restart, and memory grows by two
    states per restart only: ``stats["reversible_restarts"]`` counts them. The test:

    - *fixed steps* test the growth of the gap, which is what harms: ``q = max|y - z| / max|y|``
      (relative, so the same at every scale of the state) is about the local error one step
      after a (re)start (its value there, floored at 10 ulps of the dtype, is the baseline);
      while the parasitic mode is bounded each step adds about one baseline to ``q``, and when
      it is excited ``q`` grows geometrically and perturbs the solution by about its one-step
      growth. A step in which ``q`` grows by more than ``restart_gap`` baselines restarts.
      Measured: MLP fields (8-32-8 tanh, weights at 1x and 3x the default initialisation,
      batch 16, float32 and float64) on [0, 1] with euler or rk4 at 10, 100 and 1,000 steps
      never restart (the growth stays below 2 baselines; the gap itself can be large at coarse
      steps: 0.3 relative at 10 euler steps with 3x weights, where the reversible solution's
      error is 4x the plain method's); ``y' = -50 y`` with rk4 at ``dt = 0.005`` restarts
      every 6 steps and its error is 1.75x plain rk4's at every scale (``y0`` from 1e-9 to 1e9;
      the test is scale-free, so tiny states decay like large ones). Components much smaller
      than the largest one are protected only down to about the largest one's local error
      (the max norm) or the baseline's floor: with ``y' = diag(-50, -0.5) y`` from ones, rk4
      at ``dt = 0.005``, the fast component bottoms out near 1e-14 in float64 and 1e-7 in
      float32 instead of decaying to 1e-87.
    - *adaptive steps* (a tolerance was asked for): the gap
      ``max_i |y_i - z_i| / (atol_i + rtol_i * max(|y_i|, |z_i|))`` with the solve's tolerances
      (floored at 1000 and 10 ulps of the dtype, so that rounding alone never counts) above
      ``restart_gap`` restarts. Neural-ODE-like solves rarely restart (8-32-8 MLP fields on
      [0, 1], float32 and float64, dopri5 at rtol 1e-3 to 1e-9: none at the default weights,
      one at 2x weights; on [0, 10] 0-2 and 1-8); long solves restart now and then as
      local errors accumulate in the gap, and contracting ones where their decay requires
      (dopri5 at rtol 1e-6 on [0, 20]: A3 1 restart in 79 steps, E3 7 in 167, the orbits D1 and
      D3 12 in 100 and 128, C1 6 in 66, B1 5 in 148, E2 9 in 180). Below ``atol`` the state is
      not protected, as in the plain method's error control.

    **The solution is the reversible scheme's**, not the plain method's at the same steps: the
    two differ by the method's local errors, and the reversible solution converges at the order
    of the wrapped method (measured in ``tests/test_reversible.py``: slopes 2, 3, 4 for midpoint,
    heun3, rk4). Each step costs two steps of the method (``2 * stages`` evaluations of f; one
    fewer per half for FSAL methods without error control, whose last stage only serves the
    error estimate). On DETEST problems with dopri5 at rtol 1e-6 (outputs at t = 0, 1, ..., 20)
    and the defaults its global error is 0.05-18x the plain method's (A3 2.3x, A4 0.05x, B1 18x,
    C1 9x, D1 1.9x, D3 11x, E2 0.6x, E3 1.5x) and within the engine suite's bound
    (``FACTOR[class] * rtol``) on all of them. ``stats["reversible_gap"]`` is
    ``max|y - z| / max|y|`` at the end; with restarts turned off (``restart_gap=None``) a gap
    above 0.1 means the parasitic mode has taken over, and a RuntimeWarning says so.

    Steps: fixed (:class:`~neuralode.ConstantStep`, :class:`~neuralode.StepToGrid`) or adaptive
    (:class:`~neuralode.PIController`, from the method's embedded error estimate of the
    ``Psi(t_n, z_n, h)`` half of the step, checked before the second half is computed; its
    ``dt_min``, ``dt_max`` and ``force_dt_min`` hold as in the other gradient methods). Every
    output time is a landing point (steps are clipped to end on it): there is no dense output,
    and the value at an output time is the scheme's state there.

    Parameters
    ----------
    coupling : float, default 0.999
        The coupling ``lam`` in (0, 1] (McCallum & Foster's default is 0.999). Linearised, each
        eigenvalue ``mu`` of the Jacobian of f gives two modes: the solution, multiplied by about
        ``R(h mu)`` per step (``R`` the method's stability function), and a parasitic mode of the
        difference ``y - z``, multiplied by about ``lam / R(h mu)``. *Forward stability* needs
        ``|lam / R(h mu)| < 1``: oscillatory modes (``mu`` imaginary) are damped at any
        ``lam < 1``, but a decaying mode only while roughly ``|h mu| < -log(lam)`` (0.001 at the
        default); beyond it the parasitic mode grows from the local errors. *Backward accuracy*:
        the reconstruction multiplies rounding errors, relative to the state, by about
        ``max(|lam / R(h mu)**2|, |R(h mu)**2 / lam|)`` per step, close to 1 while
        ``|h mu|`` is small against ``1 - lam``. A smaller ``lam`` damps more in the forward
        solve; a larger one keeps the reconstruction accurate over more steps; ``lam = 1`` does
        not damp ``y - z`` at all. So the scheme suits dynamics whose decay over one step is small
        against ``1 - lam`` (non-stiff, oscillatory or mildly dissipative fields); fast decay
        needs smaller steps, restarts (``restart_gap``, on by default), or a coupling matched
        to it (``lam = R(h mu)**2``, which only one decay rate can match). Without restarts,
        local errors are amplified by roughly ``exp(a T)`` over a solve of length ``T`` with a
        mode decaying like ``exp(-a t)`` once ``a h > 1 - lam``. Measured on ``y' = -50 y`` over
        [0, 10] with rk4 and ``dt = 0.005`` (``tests/test_reversible.py``): without restarts the
        default overflows; ``lam = R(h mu)**2 = 0.6065`` solves it and reconstructs the states
        to about 1e-9 (the single mode's amplification is 1 per step), and 1 % away from it the
        solution is wrong. A second, slow mode (``mu = -0.5``) is reconstructed with a growth of
        ``1 / lam = 1.65`` per step: without anchors its gradient was NaN after 2,000 steps;
        with them (every 18 steps at 0.6065) it is exact to 1e-9
        (``tests/test_reversible_anchors.py``). With restarts (the default) the default
        coupling's error is 1.75x plain rk4's (333 restarts in 2,000 steps).
    params : sequence of Tensor, optional
        Tensors to differentiate besides ``y0``. Default: the parameters of ``func`` when it is
        an ``nn.Module``.
    restart_gap : float or None, default 10.0
        When to restart ``z`` from ``y`` (above). Fixed steps: after a step in which the
        relative gap grew by more than ``restart_gap`` times its value one step after the last
        restart (about one local error); the gap's effect on the solution per step is about
        that growth, so 10 keeps it to about 10 local errors on contracting problems while
        bounded gaps (neural-ODE-like solves) never restart. Adaptive steps: after a step whose
        gap, in units of the tolerance, exceeds ``restart_gap``. Smaller: more restarts
        (memory) and a solution closer to the plain method's; larger: fewer restarts, larger
        errors on contracting problems; None: no restarts (memory flat whatever the problem;
        wrong on dissipative ones at the default coupling).

    Raises
    ------
    ValueError
        For a coupling outside (0, 1], a ``restart_gap`` that is not positive or None, a solver
        that is not an explicit Runge--Kutta tableau, or ``dense_output=True`` (the scheme has no
        continuous extension). ``batch_control="per_sample"`` is refused by the solve (the two
        states of the scheme advance with one step size; use the shared step).

    Notes
    -----
    Gradients of gradients (``create_graph=True``) replay the whole reversible solve with a
    graph (memory then grows with the steps, as with :class:`~neuralode.Direct`).
    A solve that stopped early (``throw=False``) is differentiated through the outputs it
    reached: the backward pass starts from the pair after the last step holding outputs (kept
    by the forward pass, two states), so it never reconstructs states in the region where the
    forward solve failed (a blow-up would make them inf); later outputs are NaN constants
    without a gradient, as under :class:`~neuralode.Direct`.
    Gradients with respect to ``t`` use the continuous derivatives, as for the other methods;
    event times are differentiated by the implicit function theorem at the event, as with
    :class:`~neuralode.Direct` and :class:`~neuralode.Checkpointed`.

    func must be deterministic: the backward pass evaluates it again (to reconstruct the states and differentiate each step), so a
    random func (``nn.Dropout`` in training mode, noise drawn inside func) gives the gradient
    of different draws than the forward pass used, silently. Draw the randomness outside func
    (a fixed mask or noise tensor per solve), or use :class:`~neuralode.Direct`.

    References
    ----------
    S. McCallum and J. Foster, "Efficient, accurate and stable gradients for neural ODEs",
    arXiv:2410.11648, 2024 (the reversible scheme for any explicit Runge--Kutta method, its
    coupling parameter and the default 0.999; their adaptive version sums the error estimates of
    both halves, this one uses the first half's, so that a rejected step costs one half; the
    restarts are this library's addition).
    P. Kidger, J. Foster, X. Li and T. Lyons, "Efficient and accurate gradients for neural SDEs",
    NeurIPS 2021 (the reversible Heun method that this generalises).
    J. Zhuang, N. Dvornek, S. Tatikonda and J. Duncan, "MALI: a memory efficient and reverse
    accurate integrator for neural ODEs", ICLR 2021 (asynchronous leapfrog).
    """

    coupling: float = 0.999
    params: tuple | None = None
    restart_gap: float | None = 10.0  # after params: Reversible(lam, params) keeps its meaning

    def __post_init__(self):
        lam = self.coupling
        if isinstance(lam, torch.Tensor):
            # Not differentiable (a setting of the scheme, not a parameter): refuse rather than
            # silently detach a tensor that may require grad.
            raise ValueError(
                f"Reversible(coupling=...) must be a Python number in (0, 1], got a tensor "
                f"({lam!r}); pass float(coupling)"
            )
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
            raise ValueError(
                f"Reversible(coupling=...) must be a number in (0, 1], got {self.coupling!r}; "
                "the default 0.999 suits non-stiff problems, smaller values damp decaying modes"
            )
        object.__setattr__(self, "coupling", float(lam))
        gap = self.restart_gap
        if gap is not None and (
            isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap > 0
        ):
            raise ValueError(
                f"Reversible(restart_gap=...) must be a positive number or None, got {gap!r}; "
                "the default 10 restarts when the two states differ by 10 tolerances"
            )
        if gap is not None:
            object.__setattr__(self, "restart_gap", float(gap))

    def run(self, run: Run, y0flat: torch.Tensor):
        tab = run.prob.tableau
        if not isinstance(tab, ButcherTableau):
            raise ValueError(
                f"gradient=Reversible() needs an explicit Runge--Kutta solver, got "
                f"{getattr(tab, 'name', type(tab).__name__)!r}; use e.g. solver='dopri5' or 'rk4', "
                "or gradient='checkpoint' for implicit and multistep methods"
            )
        if run.dense:
            raise ValueError(
                "dense_output=True is not available with gradient=Reversible(): the reversible "
                "scheme has no continuous extension; put the times you need in t (steps land on "
                "every output time) or use gradient='direct'"
            )
        params = find_params(run.func, self.params, "Reversible(params=...)")
        if torch.is_grad_enabled():
            check_params(run, y0flat, params, "reversible")
        return _ReversibleFn.apply(run, self, y0flat, *params)


# ---------------------------------------------------------------------------- autograd
class _ReversibleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Run, cfg: Reversible, y0flat, *params):
        with torch.no_grad():
            res, records, z, _, restarts, anchors = integrate_reversible(
                run, cfg.coupling, y0flat.detach(), restart_gap=cfg.restart_gap
            )
        hold_run(ctx, run)  # weakly: the outputs' nodes hold it (see structured_outputs)
        y_end, z_end = res.y_final, z
        if res.status != "success":
            # Stopped early (throw=False): the adjoint is zero past the last output reached
            # (later outputs are NaN constants, as under Direct), so the backward pass starts
            # from the pair after the last step holding outputs and never walks back through
            # the failure (a blow-up would make the reconstruction inf).
            last = run.extra.get("reversible_last_output")
            k_last, y_end, z_end = last if last is not None else (-1, y0flat, y0flat)
            records = records[: k_last + 1]
            restarts = {k: v for k, v in restarts.items() if k <= k_last}
            anchors = {k: v for k, v in anchors.items() if k <= k_last}
        ctx.cfg, ctx.records = cfg, records
        ctx.n_params = len(params)
        ctx.stored_at = [(k, True) for k in restarts] + [(k, False) for k in anchors]
        # Saved for backward: the final pair, the pairs at restarts and anchors (and the
        # inputs, to replay for double backward).
        pairs = [x for d in (restarts, anchors) for pair in d.values() for x in pair]
        ctx.save_for_backward(y_end, z_end, y0flat, *params, *pairs)
        ys, res.ys = res.ys, None  # (the run need not keep the outputs)
        return ys

    @staticmethod
    def backward(ctx, g_ys):
        run, lam = held_run(ctx), ctx.cfg.coupling
        y, z, y0flat, *rest = ctx.saved_tensors
        params, pairs = rest[: ctx.n_params], rest[ctx.n_params :]
        # step index -> (y, z, whether z was reset to y after that step)
        stored = {
            k: (pairs[2 * i], pairs[2 * i + 1], reset) for i, (k, reset) in enumerate(ctx.stored_at)
        }
        if torch.is_grad_enabled():
            # create_graph=True: replay the whole reversible solve with a graph.
            y0g = y0flat if y0flat.requires_grad else y0flat.detach().requires_grad_()
            res = integrate_reversible(run, lam, y0g, restart_gap=ctx.cfg.restart_gap)[0]
            grads = torch.autograd.grad(
                res.ys, [y0g, *params], g_ys, create_graph=True, allow_unused=True
            )
            return (
                None,
                None,
                *[
                    g if g is not None else torch.zeros_like(x)
                    for g, x in zip(grads, [y0flat, *params])
                ],
            )
        prob, samples = run.prob, run.samples_all
        g = sorted_outputs_grad(prob, g_ys)
        f = run.vector_field()
        # The forward's scheme (tableau, coupling), with a vector field that counts NFE anew.
        sch = copy.copy(run.extra["reversible_scheme"])
        sch.f = f
        inc = sch.increment
        ay = torch.zeros_like(y)
        az = torch.zeros_like(z)
        gp = [torch.zeros_like(q) for q in params]
        c_z = 1.0 - lam

        def add_outputs(a, lo, hi):
            if hi <= lo:
                return a
            if samples is None:
                return a.add_(g[lo:hi].sum(0))
            return a.index_add_(0, samples[lo:hi], g[lo:hi])

        def accumulate(grads, sign):
            for i, gq in enumerate(grads):
                if gq is not None:
                    gp[i].add_(gq, alpha=sign)

        # Per step, two VJPs in sequence (the second's cotangent needs the first's result):
        # z_{n+1} = z_n - G(y_{n+1}) sends -J_G^T a_z into y_{n+1}; then
        # y_{n+1} = lam y_n + (1 - lam) z_n + F(z_n) sends lam a_y to y_n and
        # (1 - lam) a_y + J_F^T a_y to z_n. Each increment is evaluated once, with a graph; its
        # value also serves the reconstruction.
        # The reconstruction is checked, for free, wherever the exact pair is known: at every
        # stored pair and at y0 (relative max-norm error of y and z).
        worst = y.new_zeros((), dtype=y.real.dtype)

        def check(y_rec, z_rec, y_true, z_true):
            scale = y_true.abs().max().clamp_min(torch.finfo(worst.dtype).tiny)
            err = torch.maximum((y_rec - y_true).abs().max(), (z_rec - z_true).abs().max())
            return torch.maximum(worst, (err / scale).nan_to_num(nan=math.inf))

        for k in range(len(ctx.records) - 1, -1, -1):
            t, t_new, t_first, t_last, lo, hi = ctx.records[k]
            pair = stored.get(k)
            if pair is not None:  # restore the stored pair (the reconstruction restarts there)
                y_k, z_k, reset = pair
                # After a reset, the step's z is y; the pair before the reset is stored.
                worst = check(y, z, y_k, y_k if reset else z_k)
                if reset:  # z = y is differentiated like any assignment
                    ay, az = ay.add_(az), torch.zeros_like(az)
                y, z = y_k, z_k
            ay = add_outputs(ay, lo, hi)
            with torch.enable_grad():
                y1 = y.detach().requires_grad_()
                G = inc(t_new, t - t_new, t_last, t_first, y1)[0]
            gy, *gG = _vjp(G, [y1, *params], az)
            accumulate(gG, -1.0)
            if gy is not None:
                ay = ay.sub_(gy)
            z_prev = torch.add(z, G.detach())
            with torch.enable_grad():
                z0 = z_prev.detach().requires_grad_()
                F = inc(t, t_new - t, t_first, t_last, z0)[0]
            gz, *gF = _vjp(F, [z0, *params], ay)
            accumulate(gF, 1.0)
            y = sch.unmix(y, z_prev, F.detach())
            z = z_prev
            az = az.add_(ay, alpha=c_z)
            if gz is not None:
                az = az.add_(gz)
            ay = ay.mul_(lam)
        a = add_outputs(ay + az, 0, n_initial_outputs(prob))  # y_0 = z_0 = y0
        run.stats["nfe_backward"] = f.nfe
        if ctx.records:
            worst = float(check(y, z, y0flat, y0flat))
            run.stats["reversible_reconstruction_error"] = worst
            _warn_reconstruction(worst, y0flat.dtype, lam)
        return (None, None, a, *gp)


def _warn_reconstruction(err: float, dtype: torch.dtype, lam: float) -> None:
    """Warn when the backward pass reconstructed the states worse than sqrt(eps) (relative):
    then the gradient has lost at least half its digits."""
    tol = math.sqrt(torch.finfo(dtype).eps)
    if not err <= tol:  # NaN included
        warnings.warn(
            f"the backward pass of gradient=Reversible(coupling={lam}) reconstructed the states "
            f"with a relative error of {err:.2g} (more than sqrt(eps) = {tol:.1g}): the "
            "gradient is inaccurate. The inverse step amplifies rounding by about "
            "coupling / R(h mu)**2 per step for a mode decaying like exp(mu t); use a coupling "
            "closer to 1, keep restarts on (restart_gap=10.0, the default), take smaller steps, "
            "or use gradient='checkpoint'",
            RuntimeWarning,
            stacklevel=3,
        )


def _vjp(out, inputs, cot):
    """``cot^T d out / d inputs`` (None where unused); all None when ``out`` has no graph (a
    vector field that depends on neither the state nor the parameters). The graph is retained:
    a parameter computed outside func (``w = 2 * a`` with ``params=[a]``) is reached through the
    user's own subgraph, which every step's VJP traverses; the step's own graph is freed anyway
    when ``out`` is dropped."""
    if not out.requires_grad:
        return [None] * len(inputs)
    return torch.autograd.grad(out, inputs, cot, allow_unused=True, retain_graph=True)


def reconstruction_error(
    func, y0, t, *, coupling: float = 0.999, restart_gap: float | None = 10.0, **solve_kwargs
):
    """How exactly the backward pass reconstructs the states: a diagnostic.

    Solves with ``gradient=Reversible(coupling)`` (``solve_kwargs`` go to :func:`neuralode.solve`),
    keeping every state pair ``(y_n, z_n)`` of the forward solve, then walks back from the final
    pair with the algebraic inverse, as the backward pass does. Returns ``(err, solution)`` with
    ``err = max_n max(|y_n' - y_n|, |z_n' - z_n|) / max(|y_n|, |z_n|)`` (max norms; primes are the
    reconstructed states).
    """
    from .._solve import solve

    probe = _Probe(coupling=coupling, restart_gap=restart_gap)
    sol = solve(func, y0, t, gradient=probe, **solve_kwargs)
    return sol.stats["reconstruction_error"], sol


@dataclass(frozen=True)
class _Probe(Reversible):
    """Reversible with the reconstruction measured (see :func:`reconstruction_error`)."""

    def run(self, run: Run, y0flat: torch.Tensor):
        lam = self.coupling
        with torch.no_grad():
            res, records, z, states, restarts, anchors = integrate_reversible(
                run, lam, y0flat, restart_gap=self.restart_gap, keep_states=True
            )
            y = res.y_final
            sch = run.extra["reversible_scheme"]
            worst = 0.0
            for k in range(len(records) - 1, -1, -1):
                y, z = restarts.get(k, anchors.get(k, (y, z)))
                ys, zs = states[k]
                y, z = sch.invert(records[k][:4], y, z)
                scale = max(float(ys.abs().max()), float(zs.abs().max()))
                if scale > 0:
                    err = max(float((y - ys).abs().max()), float((z - zs).abs().max()))
                    worst = max(worst, err / scale)
        run.stats["reconstruction_error"] = worst
        return res.ys
