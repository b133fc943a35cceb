"""RNODE regularisers: known values on linear flows, exact vs autograd Jacobians, Hutchinson."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode.regularizers import (
    JacobianFrobenius,
    KineticEnergy,
    jacobian_terms,
    kinetic_energy,
    sample_noise,
    total_derivative,
)

D = torch.float64


def spiral_matrix(a: float, w: float) -> torch.Tensor:
    # A = [[a, -w], [w, a]]: |e^{At} z| = e^{at} |z| and |A z| = sqrt(a^2 + w^2) |z|.
    return torch.tensor([[a, -w], [w, a]], dtype=D)


@pytest.mark.parametrize("integral_in_error_norm", [True, False])
def test_kinetic_energy_of_linear_flow(integral_in_error_norm):
    a, w, T = -0.3, 1.7, 2.0
    A = spiral_matrix(a, w)

    def f(t, z):
        return z @ A.T

    z0 = torch.tensor([[1.0, 0.5], [-2.0, 0.3]], dtype=D)
    sol = neuralode.solve(
        f,
        z0,
        torch.tensor([0.0, T], dtype=D),
        integral=KineticEnergy(f),
        integral_in_error_norm=integral_in_error_norm,
        rtol=1e-10,
        atol=1e-12,
    )
    # int_0^T (a^2 + w^2) e^{2at} |z0|^2 dt
    want = (a * a + w * w) * z0.square().sum(1) * (math.exp(2 * a * T) - 1) / (2 * a)
    tol = 1e-8 if integral_in_error_norm else 1e-6
    torch.testing.assert_close(sol.integral[-1], want, rtol=tol, atol=0)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_jacobian_frobenius_of_linear_flow(estimator):
    # ||A||_F^2 = 2 (a^2 + w^2); for this A, ||e^T A||^2 = (a^2 + w^2) |e|^2 = 2 (a^2 + w^2) for
    # every Rademacher e, so the Hutchinson estimate is exact here.
    a, w, T = 0.4, -1.1, 1.5
    A = spiral_matrix(a, w)

    def f(t, z):
        return z @ A.T

    z0 = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    e = sample_noise(z0, "rademacher", generator=torch.Generator().manual_seed(2))
    g = JacobianFrobenius(f, estimator, e=e if estimator == "hutchinson" else None)
    sol = neuralode.solve(f, z0, torch.tensor([0.0, T], dtype=D), integral=g, rtol=1e-9)
    torch.testing.assert_close(
        sol.integral[-1], torch.full((3,), 2 * (a * a + w * w) * T, dtype=D), rtol=1e-9, atol=0
    )


def field(t, z):
    W = torch.tensor([[0.3, -1.2, 0.5], [0.8, 0.1, -0.4], [-0.6, 0.9, 0.2]], dtype=D)
    return torch.tanh(z @ W.T) * z.flip(1) + torch.sin(z)


def test_exact_terms_match_autograd_jacobian():
    z = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(3))
    zz = z.clone().requires_grad_()
    div, frob = jacobian_terms(field(0.0, zz), zz)
    for b in range(4):
        J = torch.autograd.functional.jacobian(lambda x: field(0.0, x[None])[0], z[b])
        assert div[b].item() == pytest.approx(torch.trace(J).item(), rel=1e-12, abs=1e-12)
        assert frob[b].item() == pytest.approx(J.square().sum().item(), rel=1e-12)
    torch.testing.assert_close(kinetic_energy(field(0.0, z)), field(0.0, z).square().sum(1))


def test_total_derivative_is_the_acceleration():
    # f(t, z) = A z + c sin(t): d^2z/dt^2 = A f + c cos(t).
    A = torch.tensor([[0.3, -1.0], [0.7, 0.2]], dtype=D)
    c = torch.tensor([0.5, -2.0], dtype=D)

    def f(t, z):
        return z @ A.T + c * torch.sin(t)

    z = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(7)).requires_grad_()
    t = torch.tensor(0.4, dtype=D, requires_grad=True)
    dz = f(t, z)
    want = dz @ A.T + c * torch.cos(t)
    torch.testing.assert_close(total_derivative(dz, z, t), want.detach(), rtol=1e-12, atol=1e-12)
    # Autonomous: t unused.
    z = torch.randn(3, 3, dtype=D, generator=torch.Generator().manual_seed(8)).requires_grad_()
    dz = field(0.0, z)
    J = [
        torch.autograd.functional.jacobian(lambda x: field(0.0, x[None])[0], z[b]) for b in range(3)
    ]
    want = torch.stack([J[b] @ dz[b] for b in range(3)])
    torch.testing.assert_close(total_derivative(dz, z, t), want.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="autograd recording"):
        total_derivative(torch.zeros(3, 2, dtype=D), z, t)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    # Many rows of the same z, each with its own noise: the sample mean of the estimates lies
    # within 4 standard errors of the exact trace and Frobenius norm.
    n = 20000
    z = torch.randn(1, 3, dtype=D, generator=torch.Generator().manual_seed(4)).expand(n, 3)
    zz = z.clone().requires_grad_()
    dz = field(0.0, zz)
    exact_div, exact_frob = jacobian_terms(dz, zz)
    e = sample_noise(zz, noise, generator=torch.Generator().manual_seed(5))
    est_div, est_frob = jacobian_terms(dz, zz, estimator="hutchinson", e=e)
    for est, exact in ((est_div, exact_div[0]), (est_frob, exact_frob[0])):
        se = est.std() / math.sqrt(n)
        assert abs(est.mean() - exact).item() < 4 * se.item()
        assert se.item() > 0  # a real estimate, not the exact value


def test_noise_moments():
    like = torch.zeros(50000, 2, dtype=D)
    for kind in ("rademacher", "gaussian"):
        e = sample_noise(like, kind, generator=torch.Generator().manual_seed(6))
        cov = e.T @ e / e.shape[0]
        torch.testing.assert_close(cov, torch.eye(2, dtype=D), atol=0.03, rtol=0)
    assert set(sample_noise(like).unique().tolist()) == {-1.0, 1.0}


def test_regularizer_errors():
    z = torch.zeros(2, 3, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        kinetic_energy(torch.zeros(3))
    with pytest.raises(ValueError, match="estimator must be one of"):
        jacobian_terms(field(0.0, z), z, estimator="trace")
    with pytest.raises(ValueError, match="needs noise e"):
        jacobian_terms(field(0.0, z), z, estimator="hutchinson")
    with pytest.raises(RuntimeError, match="autograd recording"):
        jacobian_terms(torch.zeros(2, 3), z)
    with pytest.raises(ValueError, match="noise must be one of"):
        sample_noise(z, "uniform")
    with pytest.raises(ValueError, match="needs the noise e"):
        JacobianFrobenius(field, "hutchinson")
    with pytest.raises(TypeError, match="must be callable"):
        KineticEnergy(3)
