"""``method="scipy_solver"`` of the torchdiffeq face: solves by ``scipy.integrate.solve_ivp``.

``odeint`` hands the solve to scipy without gradients (as torchdiffeq does). ``odeint_adjoint``
differentiates it by the adjoint method with scipy again on the backward solve: between
consecutive output times (last to first) the augmented system ``(y, a, g)`` with ``y' = f``,
``a' = -a^T df/dy``, ``g' = -a^T df/dp`` is integrated backward by the same scipy method, the
adjoint ``a`` jumps by ``dL/dy(t_i)`` at each output, and ``y`` restarts from the forward
solution there. Gradients with respect to the times are ``dL/dt_i = <dL/dy(t_i), f(t_i, y_i)>``
for ``i > 0`` and ``dL/dt_0 = -<a(t_0^+), f(t_0, y_0)>`` (the adjoint carried back to t0,
without the jump of output 0, which is y0 itself).

References
----------
Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018
(the augmented backward system).
"""

from __future__ import annotations

import torch

__all__ = ["scipy_odeint", "scipy_odeint_adjoint"]


def _solve_ivp(rhs, t0: float, t1: float, y0, t_eval, rtol, atol, opts, what: str):
    try:
        from scipy.integrate import solve_ivp
    except ImportError as e:  # pragma: no cover
        raise ImportError("method='scipy_solver' needs scipy: pip install scipy") from e
    kw = {k: opts[k] for k in ("max_step", "min_step", "first_step") if k in opts}
    sol = solve_ivp(
        rhs,
        (t0, t1),
        y0,
        method=opts.get("solver", "LSODA"),
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
        **kw,
    )
    if not sol.success:
        raise RuntimeError(f"scipy solve_ivp failed ({what}): {sol.message}")
    return sol.y


def _check(y0):
    if isinstance(y0, (tuple, list)):
        raise ValueError("method='scipy_solver' supports tensor states only")


def scipy_odeint(func, y0, t, rtol, atol, opts):
    """The forward solve (no gradients): ``(T, *y0.shape)`` at the times ``t``."""
    _check(y0)
    t = torch.as_tensor(t)
    shape, dtype, device = y0.shape, y0.dtype, y0.device
    if t.numel() == 1:  # nothing to integrate
        return y0.detach().clone()[None]
    tt = t.detach().cpu().double().numpy()
    real = y0.real.dtype if y0.is_complex() else y0.dtype

    def rhs(s, y):
        with torch.no_grad():
            yt = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
            out = func(torch.tensor(s, dtype=real, device=device), yt)
        return out.detach().cpu().reshape(-1).numpy()

    ys = _solve_ivp(
        rhs, tt[0], tt[-1], y0.detach().cpu().reshape(-1).numpy(), tt, rtol, atol, opts, "forward"
    )
    return torch.as_tensor(ys.T.copy(), device=device).to(dtype).reshape(len(tt), *shape)


class _ScipyAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, rtol, atol, opts, t, y0, *params):
        ys = scipy_odeint(func, y0, t, rtol, atol, opts)
        ctx.func, ctx.rtol, ctx.atol, ctx.opts = func, rtol, atol, opts
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    def backward(ctx, g_ys):
        t, ys, *params = ctx.saved_tensors
        func = ctx.func
        shape, dtype, device = ys.shape[1:], ys.dtype, ys.device
        real = ys.real.dtype if ys.is_complex() else ys.dtype
        n = ys[0].numel()
        sizes = [p.numel() for p in params]

        def f_and_vjp(s: float, y, a):
            with torch.enable_grad():
                yv = y.detach().requires_grad_()
                out = func(torch.tensor(s, dtype=real, device=device), yv)
                vj = torch.autograd.grad(out, [yv, *params], -a, allow_unused=True)
            vj = [torch.zeros_like(x) if v is None else v for v, x in zip(vj, [yv, *params])]
            return out.detach(), vj

        def rhs(s, z):
            z = torch.as_tensor(z, device=device).to(dtype)
            y, a = z[:n].view(shape), z[n : 2 * n].view(shape)
            out, vj = f_and_vjp(s, y, a)
            parts = [out.reshape(-1), vj[0].reshape(-1)] + [v.reshape(-1).to(dtype) for v in vj[1:]]
            return torch.cat(parts).cpu().numpy()

        T = ys.shape[0]
        tt = t.detach().cpu().double().tolist()
        a = g_ys[-1].clone()
        a_flow = torch.zeros_like(a)
        gp = torch.zeros(sum(sizes), dtype=dtype, device=device)
        t_grad = torch.zeros(T, dtype=t.dtype, device=t.device) if t.requires_grad else None
        for i in range(T - 1, 0, -1):
            if t_grad is not None:
                with torch.no_grad():
                    fi = func(torch.tensor(tt[i], dtype=real, device=device), ys[i])
                t_grad[i] = (g_ys[i] * fi).sum().real.to(t.dtype)
            z0 = torch.cat([ys[i].reshape(-1), a.reshape(-1), gp]).cpu().numpy()
            z = _solve_ivp(
                rhs, tt[i], tt[i - 1], z0, None, ctx.rtol, ctx.atol, ctx.opts, "backward"
            )[:, -1]
            z = torch.as_tensor(z, device=device).to(dtype)
            a_flow = z[n : 2 * n].view(shape)  # the adjoint carried back to t_{i-1}
            a = a_flow + g_ys[i - 1]
            gp = z[2 * n :]
        if t_grad is not None:
            with torch.no_grad():
                f0 = func(torch.tensor(tt[0], dtype=real, device=device), ys[0])
            # output 0 is y0 itself and does not move with t0: only the carried adjoint counts
            t_grad[0] = -(a_flow * f0).sum().real.to(t.dtype)
        grads_p = []
        for p, g in zip(params, torch.split(gp, sizes)):
            g = g.view(p.shape)
            grads_p.append((g.real if g.is_complex() and not p.is_complex() else g).to(p.dtype))
        return (None, None, None, None, t_grad, a, *grads_p)


def scipy_odeint_adjoint(func, y0, t, rtol, atol, opts, params):
    """The scipy solve, differentiable w.r.t. ``t``, ``y0`` and ``params`` (adjoint method)."""
    _check(y0)
    t = torch.as_tensor(t)
    params = [p for p in params if p.requires_grad]
    return _ScipyAdjoint.apply(func, rtol, atol, opts, t, y0, *params)
