"""Linear algebra for implicit steps: Jacobians from autograd, factorisations, GMRES.

Everything works on the engine's flat 1-D state of ``N = B * M`` scalars.

- :func:`jacobian` -- the dense ``N x N`` Jacobian ``df/dy`` (and optionally ``df/dt``) by
  reverse-mode autograd, vectorised with ``torch.func.jacrev`` and falling back to a loop of
  vector-Jacobian products for functions that ``vmap`` cannot trace.
- :class:`JVP` -- Jacobian-vector products ``J v`` at a fixed point (forward-mode
  ``torch.func.jvp``; double-backward if forward mode is unsupported) for matrix-free solves.
- :class:`DenseSolver` -- one factorised iteration matrix ``I - h g J`` (diagonally implicit
  stages, Rosenbrock stages).
- :class:`EigenSolver` -- the ``s N``-dimensional iteration matrix ``I - h (A x J)`` of a fully
  implicit method, split by the eigen-decomposition ``A = T diag(lam) T^-1`` into ``s`` systems
  ``I - h lam_i J`` (complex for complex ``lam_i``; for a real problem only one system per
  conjugate pair is factorised; Hairer & Wanner II, sec. IV.8).
- :func:`gmres` -- restarted GMRES with right preconditioning (Saad & Schultz 1986), for the
  matrix-free Newton iterations and for the transposed systems of the implicit-function-theorem
  gradients.

Evaluations of func made here (Jacobians, Jacobian-vector products) do not count towards NFE:
the steppers report them as ``n_jac`` and ``n_jvp``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

__all__ = ["flat_func", "jacobian", "JVP", "LUSolve", "DenseSolver", "EigenSolver", "gmres"]


def flat_func(f, t: float):
    """``y1d -> f(t, y1d)`` on the flat state, bypassing the NFE counter of ``f``."""
    tt = f._time(t)
    spec = f.spec

    def g(y: torch.Tensor) -> torch.Tensor:
        out = f.func(tt, spec.unflatten(y.view(spec.batch, -1)))
        return spec.flatten(out, what="the derivative returned by func", t=t).reshape(-1)

    return g


def flat_func_t(f):
    """``(t_tensor, y1d) -> f(t, y1d)`` on the flat state (for ``df/dt``), uncounted."""
    spec = f.spec

    def g(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = f.func(tt, spec.unflatten(y.view(spec.batch, -1)))
        return spec.flatten(out, what="the derivative returned by func").reshape(-1)

    return g


# Below this size the Jacobian is built row by row with ordinary vector-Jacobian products:
# cheaper than vmap for small systems, and free of torch.func's one-time set-up cost (seconds).
_LOOP_MAX = 32


def jacobian(f, t: float, y: torch.Tensor, *, with_t: bool = False):
    """Dense Jacobian ``df/dy`` at ``(t, y)`` (``y`` 1-D, ``(N, N)`` result).

    With ``with_t`` also returns ``df/dt`` ``(N,)``. When grad mode is on the result is
    differentiable with respect to ``y`` and the parameters of func (second derivatives by
    double backward). Small systems use one vector-Jacobian product per row, larger ones
    ``torch.func.jacrev`` (vectorised), falling back to the row loop for functions that
    ``vmap`` cannot trace, and to finite differences for functions that hide their dependence
    on the state from autograd (e.g. an adjoint system that detaches its input).

    The Jacobian is always built on a detached copy of ``y``: a graph that reached back through
    the whole solve would make every backward pass here cost as much as the solve so far
    (quadratic time). :class:`_Reattach` connects the result to ``y`` afterwards.
    """
    create_graph = torch.is_grad_enabled()
    g = flat_func_t(f)
    yl = y.detach().requires_grad_()
    with torch.enable_grad():
        tt = f._time(t).requires_grad_(with_t)
        out = g(tt, yl)
    if not out.requires_grad:
        return _jacobian_fd(g, f._time(t), y.detach(), out.detach(), with_t)
    n = y.numel()
    J = ft = None
    if not with_t and n > _LOOP_MAX:
        try:
            with torch.set_grad_enabled(create_graph):
                J = torch.func.jacrev(flat_func(f, t))(yl)
        except Exception:  # e.g. in-place ops or data-dependent control flow in func
            J = None
    if J is None:
        J, ft = _jacobian_rows(out, yl, tt, with_t, create_graph)
    outs = (J,) if not with_t else (J, ft)
    if not create_graph:
        outs = tuple(o.detach() for o in outs)
    elif y.requires_grad:
        outs = _Reattach.apply(y, yl, *outs)
    return outs[0] if not with_t else outs


def _jacobian_rows(out, yl, tt, with_t, create_graph):
    n = yl.numel()
    inputs = [yl, tt] if with_t else [yl]
    eye = torch.eye(n, dtype=out.dtype, device=out.device)
    rows_y, rows_t = [], []
    with torch.enable_grad():
        for i in range(n):
            gi = torch.autograd.grad(
                out, inputs, eye[i], retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            rows_y.append(gi[0] if gi[0] is not None else torch.zeros_like(yl))
            if with_t:
                rows_t.append(gi[1] if gi[1] is not None else torch.zeros_like(tt))
    J = torch.stack(rows_y)
    ft = torch.stack(rows_t).to(yl.dtype) if with_t else None
    if J.is_complex():
        # Autograd's vector-Jacobian products of a holomorphic function are conjugated
        # (v^T conj(J)): undo it to get J itself.
        J = J.conj()
        ft = ft.conj() if ft is not None else None
    return J, ft


def _jacobian_fd(g, tt, y, f0, with_t):
    """Forward differences, one evaluation of func per column (no graph)."""
    real = y.real if y.is_complex() else y
    eps = torch.finfo(real.dtype).eps
    cols = []
    with torch.no_grad():
        for j in range(y.numel()):
            d = math.sqrt(eps) * max(1.0, abs(float(y[j])))
            yp = y.clone()
            yp[j] += d
            cols.append((g(tt, yp) - f0) / d)
        J = torch.stack(cols, dim=1)
        if not with_t:
            return J
        dt = math.sqrt(eps) * max(1.0, abs(float(tt)))
        ft = (g(tt + dt, y) - f0) / dt
    return J, ft


class _Reattach(torch.autograd.Function):
    """Identity on ``outs`` built on the detached copy ``yl`` of ``y``; in the backward pass it
    adds their dependence on ``y`` (a vector-Jacobian product through the local graph, kept
    for that purpose) and hands the incoming gradients on to that graph (parameters)."""

    @staticmethod
    def forward(ctx, y, yl, *outs):
        ctx.yl = yl
        ctx.save_for_backward(*outs)
        return tuple(o.detach().clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        outs = ctx.saved_tensors
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        gy = None
        if pairs:
            gy = torch.autograd.grad(
                [o for o, _ in pairs],
                ctx.yl,
                [g for _, g in pairs],
                retain_graph=True,
                create_graph=torch.is_grad_enabled(),
                allow_unused=True,
            )[0]
        return (gy, None, *(g if o.requires_grad else None for o, g in zip(outs, grads)))


class JVP:
    """Jacobian-vector products ``v -> J v`` of func at a fixed ``(t, y)`` (1-D).

    Forward-mode AD (dual numbers; about the cost of one evaluation of func); two reverse passes
    (double backward) for functions with operations forward mode does not support; forward
    differences for functions that hide their dependence on the state from autograd.
    """

    def __init__(self, f, t: float, y: torch.Tensor):
        self.g = flat_func(f, t)
        self.y = y.detach()
        self.count = 0
        self._mode = "forward"
        self._f0 = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        v = v.to(self.y.dtype)
        if self._mode == "forward":
            try:
                with torch.no_grad(), fwAD.dual_level():
                    out = self.g(fwAD.make_dual(self.y, v))
                    tangent = fwAD.unpack_dual(out).tangent
                if tangent is not None:
                    return tangent
                self._mode = "fd"  # no tangent at all: func detaches its input
            except Exception:  # forward-mode AD unsupported by some op in func
                self._mode = "double"
        if self._mode == "double":
            try:
                with torch.enable_grad():
                    return torch.autograd.functional.jvp(self.g, self.y, v)[1].detach()
            except RuntimeError:
                self._mode = "fd"
        with torch.no_grad():
            if self._f0 is None:
                self._f0 = self.g(self.y)
            vn = float(torch.linalg.vector_norm(v))
            if vn == 0.0:
                return torch.zeros_like(v)
            real = self.y.real if self.y.is_complex() else self.y
            eps = torch.finfo(real.dtype).eps
            d = math.sqrt(eps) * (1.0 + float(torch.linalg.vector_norm(self.y))) / vn
            return (self.g(self.y + d * v) - self._f0) / d


class LUSolve(torch.autograd.Function):
    """``x = W^-1 b`` (or ``W^-H b``) with a given factorisation of ``W``, differentiable in
    ``W`` and ``b`` to any order. ``W`` ``(N, N)`` with ``b`` ``(N,)``, or a batch of blocks
    ``(B, M, M)`` with ``b`` ``(B, M)``.

    The backward pass reuses the factorisation: ``gb = W^-H gx``, ``gW = -gb x^H`` (for the
    adjoint solve ``gb = W^-1 gx``, ``gW = -x gb^H``), itself written with this function so that
    double backward works. The generic backward of ``lu_factor``/``lu_solve`` refactorises and is
    far slower for the small systems of a Rosenbrock step.
    """

    @staticmethod
    def forward(ctx, W, b, LU, piv, adjoint=False):
        x = torch.linalg.lu_solve(LU, piv, b.unsqueeze(-1), adjoint=adjoint).squeeze(-1)
        ctx.save_for_backward(W, LU, piv, x)
        ctx.adjoint = adjoint
        return x

    @staticmethod
    def backward(ctx, gx):
        W, LU, piv, x = ctx.saved_tensors
        gb = LUSolve.apply(W, gx, LU, piv, not ctx.adjoint)
        gW = None
        if ctx.needs_input_grad[0]:
            # Outer products; batched over leading dimensions ((B, M, M) stacks of blocks).
            u, v = (x, gb) if ctx.adjoint else (gb, x)
            gW = -(u.unsqueeze(-1) * v.conj().unsqueeze(-2))
        return gW, gb, None, None, None


def _eye_minus(J: torch.Tensor, factor) -> torch.Tensor:
    M = J * (-factor)
    M.diagonal().add_(1.0)
    return M


def _factor(M: torch.Tensor):
    """LU factors of ``M``, or None when ``M`` is singular or not finite (one host sync)."""
    LU, piv, info = torch.linalg.lu_factor_ex(M)
    if int(info) != 0 or not bool(torch.isfinite(LU).all()):
        return None
    return LU, piv


class DenseSolver:
    """A factorised ``M = I - g J`` (``g = h gamma``): ``solve`` and ``solve_adjoint``.

    ``solve`` returns None when ``M`` is singular (the Newton iteration then fails).
    """

    def __init__(self, J: torch.Tensor, g: float):
        self.g = g
        factors = _factor(_eye_minus(J, g))
        self.singular = factors is None
        self.LU, self.piv = factors if factors is not None else (None, None)

    def solve(self, r: torch.Tensor) -> torch.Tensor | None:
        """``M^-1 r`` for ``r`` of shape ``(N,)`` or ``(N, k)``."""
        if self.singular:
            return None
        vec = r.dim() == 1
        x = torch.linalg.lu_solve(self.LU, self.piv, r.unsqueeze(-1) if vec else r)
        return x.squeeze(-1) if vec else x

    def solve_adjoint(self, r: torch.Tensor) -> torch.Tensor:
        """``M^-H r`` (the conjugate transpose, matching autograd's vector-Jacobian products)."""
        x = torch.linalg.lu_solve(self.LU, self.piv, r.unsqueeze(-1), adjoint=True)
        return x.squeeze(-1)


class EigenSolver:
    """``M = I - h (A kron J)`` on ``(s, N)`` stage arrays, by the eigen-decomposition of ``A``.

    ``M^-1 R = (T kron I) diag((I - h lam_i J)^-1) (T^-1 kron I) R``. For a real problem the
    systems of a conjugate pair are conjugate, so one complex factorisation serves both.
    """

    def __init__(self, tableau, J: torch.Tensor, h: float):
        lam, T, Ti = tableau.eigen()
        self.real = not J.is_complex()
        cdtype = J.dtype if J.is_complex() else (J.new_empty(0).dtype.to_complex())
        dev = J.device
        self.T = torch.as_tensor(T, dtype=cdtype, device=dev)
        self.Ti = torch.as_tensor(Ti, dtype=cdtype, device=dev)
        self.s = len(lam)
        self.singular = False
        # reps[i]: index of the system whose solution gives row i, and whether to conjugate it.
        self.reps: list[tuple[int, bool]] = []
        self.factors: dict[int, tuple] = {}
        for i, li in enumerate(lam):
            if self.real and li.imag < -1e-14:
                j = min(
                    (k for k in range(self.s) if k != i and abs(lam[k] - np.conj(li)) < 1e-10),
                    default=None,
                )
                if j is not None:
                    self.reps.append((j, True))
                    continue
            self.reps.append((i, False))
            if self.real and abs(li.imag) <= 1e-14:
                M = _eye_minus(J, h * float(li.real))
            else:
                M = _eye_minus(J.to(cdtype), h * complex(li))
            factors = _factor(M)
            if factors is None:
                self.singular = True
            self.factors[i] = factors
        self.n_factorisations = len(self.factors)

    def _diag_solve(self, Rt: torch.Tensor, adjoint: bool) -> torch.Tensor:
        out = [None] * self.s
        for i, (_, conj) in enumerate(self.reps):
            if not conj:
                LU, piv = self.factors[i]
                ri = Rt[i] if LU.is_complex() else Rt[i].real
                rhs = ri.to(LU.dtype).unsqueeze(-1)
                out[i] = torch.linalg.lu_solve(LU, piv, rhs, adjoint=adjoint).squeeze(-1)
        for i, (j, conj) in enumerate(self.reps):
            if conj:
                out[i] = out[j].conj()
        return torch.stack([o.to(Rt.dtype) for o in out])

    def solve(self, R: torch.Tensor) -> torch.Tensor | None:
        """``M^-1 R`` for stage arrays ``R`` ``(s, N)`` (None if ``M`` is singular)."""
        if self.singular:
            return None
        Rt = self.Ti @ R.to(self.T.dtype)
        X = self.T @ self._diag_solve(Rt, adjoint=False)
        return X.real.to(R.dtype) if self.real else X

    def solve_adjoint(self, R: torch.Tensor) -> torch.Tensor:
        """``M^-H R = (T^-H kron I) diag((I - h lam_i J)^-H) (T^H kron I) R``."""
        Rt = self.T.mH @ R.to(self.T.dtype)
        X = self.Ti.mH @ self._diag_solve(Rt, adjoint=True)
        return X.real.to(R.dtype) if self.real else X


def gmres(
    matvec,
    b: torch.Tensor,
    *,
    precond=None,
    x0: torch.Tensor | None = None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    restart: int = 40,
    maxiter: int = 400,
):
    """Solve ``A x = b`` by restarted GMRES with right preconditioning.

    Parameters
    ----------
    matvec : callable
        ``v -> A v`` for vectors shaped like ``b`` (any shape; the iteration works on the
        flattened vector).
    precond : callable, optional
        ``v -> P^-1 v`` (right preconditioner: GMRES runs on ``A P^-1``).
    rtol, atol : float
        Stop when ``||b - A x|| <= max(rtol ||b||, atol)``.
    restart, maxiter : int
        Krylov dimension before a restart, and total number of iterations.

    Returns
    -------
    (x, iterations, converged)

    Notes
    -----
    The Arnoldi basis is orthogonalised by classical Gram--Schmidt applied twice (one
    matrix-vector product against the basis per pass, numerically as good as modified
    Gram--Schmidt; Giraud et al. 2005); the small least-squares problem is solved with Givens
    rotations on the host.
    """
    shape = b.shape
    bf = b.reshape(-1)
    n = bf.numel()
    x = torch.zeros_like(bf) if x0 is None else x0.reshape(-1).clone()
    bnorm = float(torch.linalg.vector_norm(bf))
    if bnorm == 0.0 and x0 is None:
        return x.view(shape), 0, True
    tol = max(rtol * bnorm, atol)
    prec = precond if precond is not None else (lambda v: v)

    def A(v):
        return matvec(v.view(shape)).reshape(-1)

    def P(v):
        return prec(v.view(shape)).reshape(-1)

    total = 0
    m = max(1, min(restart, n))
    while True:
        r = bf - A(x) if (total or x0 is not None) else bf.clone()
        beta = float(torch.linalg.vector_norm(r))
        if beta <= tol or not math.isfinite(beta):
            return x.view(shape), total, beta <= tol
        if total >= maxiter:
            return x.view(shape), total, False
        V = torch.empty((m + 1, n), dtype=bf.dtype, device=bf.device)
        V[0] = r / beta
        H = np.zeros((m + 1, m), dtype=complex)
        cs, sn = [], []
        g = np.zeros(m + 1, dtype=complex)
        g[0] = beta
        k = 0
        for j in range(m):
            w = A(P(V[j]))
            hcol = torch.zeros(j + 1, dtype=bf.dtype, device=bf.device)
            for _ in range(2):  # CGS2
                hj = V[: j + 1].conj() @ w
                w = w - V[: j + 1].T @ hj
                hcol = hcol + hj
            hnext = float(torch.linalg.vector_norm(w))
            col = np.zeros(m + 1, dtype=complex)
            col[: j + 1] = hcol.cpu().numpy()
            col[j + 1] = hnext
            for i in range(j):  # apply the earlier rotations
                a_, b_ = col[i], col[i + 1]
                col[i] = cs[i] * a_ + sn[i] * b_
                col[i + 1] = -np.conj(sn[i]) * a_ + cs[i] * b_
            a_, b_ = col[j], col[j + 1]
            rho = math.hypot(abs(a_), abs(b_))
            if rho == 0.0:
                c_, s_ = 1.0, 0.0
            elif abs(a_) == 0.0:
                c_, s_ = 0.0, 1.0
            else:
                c_ = abs(a_) / rho
                s_ = (a_ / abs(a_)) * np.conj(b_) / rho
            cs.append(c_)
            sn.append(s_)
            col[j] = c_ * a_ + s_ * b_
            col[j + 1] = 0.0
            g[j + 1] = -np.conj(s_) * g[j]
            g[j] = c_ * g[j]
            H[:, j] = col
            k = j + 1
            total += 1
            if hnext > 0.0:
                V[j + 1] = w / hnext
            if abs(g[j + 1]) <= tol or hnext == 0.0 or total >= maxiter:
                break
        # Back substitution on the k x k upper triangle.
        yk = np.zeros(k, dtype=complex)
        for i in range(k - 1, -1, -1):
            yk[i] = (g[i] - H[i, i + 1 : k] @ yk[i + 1 : k]) / H[i, i]
        if not bf.is_complex():
            yk = yk.real
        yt = torch.as_tensor(yk, dtype=bf.dtype, device=bf.device)
        x = x + P(V[:k].T @ yt)
