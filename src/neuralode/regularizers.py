"""Regularisers of neural ODE training as running-cost integrals (RNODE).

Finlay, Jacobsen, Nurbekyan and Oberman (2020) regularise a continuous normalising flow with the
kinetic energy of the flow and the Frobenius norm of the vector field's Jacobian, both integrated
along the trajectories::

    K = int_{t0}^{t1} ||f(t, z(t))||^2 dt,      J = int_{t0}^{t1} ||df/dz (t, z(t))||_F^2 dt.

The kinetic energy favours straight trajectories at constant speed (optimal transport), the
Jacobian norm a field that changes slowly along them; together they make the dynamics easy to
integrate and cut the number of function evaluations (NFE) of training. Both are running costs
``g(t, z)``: pass them as ``neuralode.solve(func, z0, t, integral=g)``, or compute them inside a
fused vector field from the same evaluation of ``f`` (what :class:`neuralode.models.CNF` does).

- :func:`kinetic_energy` and :func:`jacobian_terms` act on one evaluation ``dz = f(t, z)``:
  squared norm per sample; divergence (trace of the Jacobian) and squared Frobenius norm, exact
  (``d`` vector-Jacobian products) or by Hutchinson's estimator with one noise vector ``e``
  (``e^T J e`` estimates the trace and ``||e^T J||^2`` the squared Frobenius norm, from the same
  vector-Jacobian product, for noise with ``E[e e^T] = I``).
- :class:`KineticEnergy` and :class:`JacobianFrobenius` are running costs ``g(t, z)`` for
  ``integral=``; they evaluate ``f`` themselves (one more evaluation per stage), which a fused
  field avoids.
- :func:`sample_noise` draws Rademacher or Gaussian noise for Hutchinson's estimator.

States are batches of vectors ``z: (B, d)``: every quantity is per sample, shape ``(B,)``,
which is what makes the exact Jacobian cost ``d`` vector-Jacobian products (rows of different
samples do not interact).

References
----------
Finlay, Jacobsen, Nurbekyan, Oberman, "How to train your neural ODE: the world of Jacobian and
kinetic regularization", ICML 2020 (RNODE: both regularisers, the Frobenius norm by the same
noise as the trace estimate). Hutchinson, "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", 1989. Grathwohl, Chen, Bettencourt, Sutskever,
Duvenaud, "FFJORD", ICLR 2019 (Hutchinson's trace estimator in CNFs).
"""

from __future__ import annotations

import torch

__all__ = [
    "kinetic_energy",
    "jacobian_terms",
    "total_derivative",
    "sample_noise",
    "KineticEnergy",
    "JacobianFrobenius",
]

_ESTIMATORS = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")


def _check_batch(z: torch.Tensor, name: str = "z") -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a batch of vectors of shape (B, d), got {got}")


def kinetic_energy(dz: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm of the velocity per sample: ``||dz_b||^2``.

    Parameters
    ----------
    dz : Tensor (B, d)
        An evaluation of the vector field.

    Returns
    -------
    Tensor (B,)
        Same dtype as ``dz``; differentiable.

    Raises
    ------
    ValueError
        If ``dz`` is not 2-D.
    """
    _check_batch(dz, "dz")
    return dz.square().sum(1)


def sample_noise(like: torch.Tensor, kind: str = "rademacher", generator=None) -> torch.Tensor:
    """Noise for Hutchinson's estimator, shaped like ``like``, with ``E[e e^T] = I``.

    Parameters
    ----------
    like : Tensor
        Shape, dtype and device of the noise.
    kind : {"rademacher", "gaussian"}, default "rademacher"
        Rademacher (entries +-1 with equal probability; the lowest variance for the trace
        estimate) or standard normal entries.
    generator : torch.Generator, optional
        Random number generator.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
        return bits.to(like.dtype).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    raise ValueError(f"noise must be one of {_NOISES}, got {kind!r}")


def jacobian_terms(
    dz: torch.Tensor,
    z: torch.Tensor,
    *,
    estimator: str = "exact",
    e: torch.Tensor | None = None,
    frobenius: bool = True,
    create_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divergence ``tr(df/dz)`` and squared Frobenius norm ``||df/dz||_F^2`` per sample.

    Parameters
    ----------
    dz : Tensor (B, d)
        ``f(t, z)`` computed from ``z`` with autograd recording (``z.requires_grad``).
    z : Tensor (B, d)
        The state ``dz`` was computed from. Rows must not interact in ``f`` (a batch of
        independent samples).
    estimator : {"exact", "hutchinson"}, default "exact"
        ``"exact"``: the ``d`` rows of the Jacobian by ``d`` vector-Jacobian products (for small
        ``d``). ``"hutchinson"``: one vector-Jacobian product ``v = e^T J``; the divergence is
        estimated by ``v . e`` and the squared Frobenius norm by ``||v||^2`` (unbiased for any
        noise with ``E[e e^T] = I``; the same noise for both, as in RNODE).
    e : Tensor (B, d), optional
        The noise, required by ``"hutchinson"`` (see :func:`sample_noise`); keep it fixed over a
        solve so that the estimated dynamics are one ODE.
    frobenius : bool, default True
        Also return the squared Frobenius norm (else None in its place).
    create_graph : bool, optional
        Keep the graph of the derivatives (needed to differentiate the results). Default:
        whether gradient recording is enabled.

    Returns
    -------
    (Tensor (B,), Tensor (B,) or None)
        Divergence and squared Frobenius norm.

    Raises
    ------
    ValueError
        For shapes other than ``(B, d)``, an unknown estimator, or Hutchinson without ``e``.
    RuntimeError
        If ``dz`` was not computed from ``z`` with autograd recording.
    """
    _check_batch(dz, "dz")
    _check_batch(z, "z")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    if not dz.requires_grad:
        raise RuntimeError(
            "jacobian_terms needs dz = f(t, z) computed with autograd recording from a z that "
            "requires grad (wrap the evaluation in torch.enable_grad() and use "
            "z.requires_grad_())"
        )
    if estimator == "hutchinson":
        if e is None or e.shape != z.shape:
            raise ValueError(
                f"estimator='hutchinson' needs noise e of z's shape {tuple(z.shape)}, got "
                f"{None if e is None else tuple(e.shape)}; draw it with sample_noise(z)"
            )
        # retain_graph: dz's graph may serve more derivatives (the acceleration, autograd).
        (v,) = torch.autograd.grad(dz, z, e, create_graph=create_graph, retain_graph=True)
        div = (v * e).sum(1)
        return div, (v.square().sum(1) if frobenius else None)
    d = z.shape[1]
    div = torch.zeros(z.shape[0], dtype=dz.dtype, device=dz.device)
    frob = torch.zeros_like(div) if frobenius else None
    for i in range(d):
        (row,) = torch.autograd.grad(
            dz[:, i].sum(), z, create_graph=create_graph, retain_graph=True
        )
        div = div + row[:, i]
        if frobenius:
            frob = frob + row.square().sum(1)
    return div, frob


def total_derivative(
    dz: torch.Tensor, z: torch.Tensor, t: torch.Tensor, *, create_graph: bool | None = None
) -> torch.Tensor:
    """The acceleration ``d^2 z/dt^2 = df/dt + (df/dz) f`` along the flow, per sample.

    ``||d^2 z/dt^2||^2`` integrated over time is the second-order Taylor regulariser of
    TayNODE (Kelly et al. 2020, ``K = 2``), which penalises curved, quickly changing
    trajectories. Computed by the double vector-Jacobian product trick (a Jacobian-vector
    product from two reverse passes), without a Jacobian.

    Parameters
    ----------
    dz : Tensor (B, d)
        ``f(t, z)`` computed with autograd recording from ``z`` and ``t`` (both requiring grad).
    z : Tensor (B, d)
    t : Tensor (0-d)
        The time ``dz`` was computed at, requiring grad (e.g. ``t.detach().requires_grad_()``;
        for an autonomous field its derivative is zero).
    create_graph : bool, optional
        Keep the graph (default: whether gradient recording is enabled).

    Returns
    -------
    Tensor (B, d)

    References
    ----------
    Kelly, Bettencourt, Johnson, Duvenaud, "Learning Differential Equations that are Easy to
    Solve", NeurIPS 2020.
    """
    _check_batch(dz, "dz")
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    if not dz.requires_grad:
        raise RuntimeError(
            "total_derivative needs dz = f(t, z) computed with autograd recording from z and t "
            "that require grad"
        )
    u = torch.zeros_like(dz, requires_grad=True)
    # (J^T u, f_t . u), linear in u; differentiating it w.r.t. u along (f, 1) gives J f + f_t.
    gz, gt = torch.autograd.grad(dz, (z, t), u, create_graph=True, allow_unused=True)
    outs, tangents = [], []
    if gz is not None:
        outs.append(gz)
        tangents.append(dz)
    if gt is not None and gt.requires_grad:
        outs.append(gt)
        tangents.append(torch.ones_like(gt))
    if not outs or not any(o.requires_grad for o in outs):  # f does not depend on t or z
        return torch.zeros_like(dz)
    (acc,) = torch.autograd.grad(
        outs, u, tangents, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(dz) if acc is None else acc


def _with_grad(func, t, z):
    """``(f(t, z), z')`` with ``z'`` a version of z that ``f``'s output can be differentiated
    by (z itself when it is part of the graph, so gradients flow through it)."""
    zz = z if z.requires_grad else z.detach().requires_grad_()
    return func(t, zz), zz


class KineticEnergy:
    """The running cost ``g(t, z) = ||f(t, z)||^2`` per sample, for ``solve(..., integral=g)``.

    Parameters
    ----------
    func : callable
        The vector field ``f(t, z) -> (B, d)``.

    Notes
    -----
    ``g`` evaluates ``f`` once more per call (``solve`` calls ``f`` and ``g`` at every stage);
    :class:`neuralode.models.CNF` computes it from the evaluation it already has.

    Examples
    --------
    >>> import torch, neuralode
    >>> from neuralode.regularizers import KineticEnergy
    >>> f = lambda t, z: -z
    >>> z0 = torch.ones(1, 2, dtype=torch.float64)
    >>> sol = neuralode.solve(f, z0, [0.0, 1.0], integral=KineticEnergy(f))
    >>> round(float(sol.integral[-1, 0]), 4)  # int_0^1 2 e^{-2t} dt = 1 - e^{-2}
    0.8647
    """

    def __init__(self, func):
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}")
        self.func = func

    def __call__(self, t, z):
        return kinetic_energy(self.func(t, z))


class JacobianFrobenius:
    """The running cost ``g(t, z) = ||df/dz (t, z)||_F^2`` per sample, for ``integral=``.

    Parameters
    ----------
    func : callable
        The vector field ``f(t, z) -> (B, d)`` on independent samples.
    estimator : {"exact", "hutchinson"}, default "exact"
        Exact (``d`` vector-Jacobian products per evaluation) or Hutchinson's estimate
        ``||e^T J||^2`` with the fixed noise ``e``.
    e : Tensor (B, d), optional
        Noise for ``"hutchinson"`` (:func:`sample_noise`), fixed for the solve: make a new
        instance with fresh noise for the next solve.

    Raises
    ------
    ValueError
        For an unknown estimator or Hutchinson without noise; when called, for noise of
        another shape than the state (Hutchinson with ``batch_control="per_sample"``, which
        passes only the rows still being integrated: use the exact estimator there).
    """

    def __init__(self, func, estimator: str = "exact", e: torch.Tensor | None = None):
        if not callable(func):
            raise TypeError(f"func must be callable as func(t, z), got {type(func).__name__}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        if estimator == "hutchinson" and e is None:
            raise ValueError(
                "JacobianFrobenius(estimator='hutchinson') needs the noise e (B, d); draw it "
                "with sample_noise(z0) once per solve"
            )
        self.func, self.estimator, self.e = func, estimator, e

    def __call__(self, t, z):
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            dz, zz = _with_grad(self.func, t, z)
            e = self.e
            if e is not None and e.shape != zz.shape:  # per-sample control: rows still running
                raise ValueError(
                    f"JacobianFrobenius(estimator='hutchinson'): the noise e has shape "
                    f"{tuple(e.shape)} but g was called with a state of shape "
                    f"{tuple(zz.shape)}. With batch_control='per_sample' the solver passes only "
                    "the rows still being integrated, which the fixed noise cannot follow; use "
                    "estimator='exact' there, or batch_control='shared'"
                )
            _, frob = jacobian_terms(dz, zz, estimator=self.estimator, e=e, create_graph=create)
        return frob
