"""CNF: log-densities of linear flows in closed form, Hutchinson, gradients, regularisers."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch import nn

import neuralode
from neuralode import Backsolve, Checkpointed, Direct
from neuralode.models import CNF, MLPVectorField

D = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


class Linear(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A, dtype=D))
        self.dim = self.A.shape[0]

    def forward(self, t, z):
        return z @ self.A.T


def std_normal_logpdf(z):
    return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))


A3 = [[0.2, -0.7, 0.1], [0.5, -0.3, 0.4], [0.0, 0.6, 0.1]]


def test_log_prob_of_linear_flow():
    # f = A z from t0 = 0 to t1 = 1: z(t0) = e^{-A} x, log p(x) = log N(e^{-A} x) - tr A.
    A = torch.tensor(A3, dtype=D)
    x = torch.randn(5, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    flow = CNF(Linear(A), **TIGHT)
    z0 = x @ torch.from_numpy(scipy.linalg.expm(-A.numpy())).T
    want = std_normal_logpdf(z0) - torch.trace(A)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), want, rtol=1e-8, atol=1e-8)
    # Other times and a base density with its own scale: t in [-1, 1] spans 2 time units.
    base = torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=D), 4 * torch.eye(3, dtype=D)
    )
    flow = CNF(Linear(A), t0=-1.0, t1=1.0, base=base, **TIGHT)
    z0 = x @ torch.from_numpy(scipy.linalg.expm(-2 * A.numpy())).T
    want = base.log_prob(z0) - 2 * torch.trace(A)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), want, rtol=1e-8, atol=1e-8)
    # Sampling pushes base draws forward: flow back to the base recovers them.
    with torch.no_grad():
        s = flow.sample(4)
        back = flow.flow(s, [1.0, -1.0])[-1]
    assert s.shape == (4, 3) and flow.nfe_forward > 0
    fwd = torch.from_numpy(scipy.linalg.expm(2 * A.numpy()))
    torch.testing.assert_close(back @ fwd.T, s, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_prob_is_unbiased(noise):
    torch.manual_seed(1)
    field = MLPVectorField(2, hidden=8, time_dependent=True).to(D)
    x = torch.tensor([[0.4, -0.9]], dtype=D)
    with torch.no_grad():
        exact = CNF(field, rtol=1e-8, atol=1e-8).log_prob(x)[0]
        n = 2000  # one noise draw per row
        est = CNF(field, trace="hutchinson", noise=noise, rtol=1e-8, atol=1e-8).log_prob(
            x.expand(n, 2)
        )
    se = est.std() / math.sqrt(n)
    assert se.item() > 1e-4  # the estimate is noisy
    assert abs(est.mean() - exact).item() < 4 * se.item()


def test_regularizers_of_linear_flow():
    # A = [[a, -w], [w, a]]: z(t) = e^{a (t - 1)} R x, so int_0^1 ||A z||^2 dt
    # = (a^2 + w^2) |x|^2 (1 - e^{-2a}) / (2a) and int_0^1 ||A||_F^2 dt = 2 (a^2 + w^2).
    a, w = 0.3, -1.2
    A = torch.tensor([[a, -w], [w, a]], dtype=D)
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.1]], dtype=D)
    for trace in ("exact", "hutchinson"):  # Hutchinson is exact here: ||e^T A||^2 = 2(a^2+w^2)
        weights = {"kinetic": 0.5, "jacobian": 2.0, "acceleration": 0.3}
        flow = CNF(Linear(A), trace=trace, regularizers=weights, **TIGHT)
        logp, regs = flow.log_prob_and_regularizers(x)
        ke = (a * a + w * w) * x.square().sum(1) * (1 - math.exp(-2 * a)) / (2 * a)
        torch.testing.assert_close(regs["kinetic"], ke, rtol=1e-8, atol=0)
        # d^2z/dt^2 = A^2 z and |A^2 z| = (a^2 + w^2) |z|.
        torch.testing.assert_close(regs["acceleration"], (a * a + w * w) * ke, rtol=1e-8, atol=0)
        torch.testing.assert_close(
            regs["jacobian"], torch.full((2,), 2 * (a * a + w * w), dtype=D), rtol=1e-8, atol=0
        )
        out = flow.loss(x)
        want = (
            -logp.mean()
            + 0.5 * ke.mean()
            + 2.0 * 2 * (a * a + w * w)
            + 0.3 * (a * a + w * w) * ke.mean()
        )
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-8)
        assert out.nll.item() == pytest.approx(-logp.mean().item(), rel=1e-10)
        assert out.nfe == flow.nfe_forward > 0


class Forced(nn.Module):
    """f(t, z) = A z + c sin(t): d^2z/dt^2 = A f + c cos(t)."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.3, -1.0], [0.7, 0.2]], dtype=D))
        self.c = nn.Parameter(torch.tensor([0.5, -2.0], dtype=D))

    def forward(self, t, z):
        return z @ self.A.T + self.c * torch.sin(t).to(z.dtype)


def test_acceleration_of_a_forced_linear_flow():
    f = Forced()
    x = torch.tensor([[1.0, -0.5], [0.2, 0.3]], dtype=D)
    with torch.no_grad():
        _, regs = CNF(f, regularizers={"acceleration": 1.0}, **TIGHT).log_prob_and_regularizers(x)

        def acc2(t, z):
            return (f(t, z) @ f.A.T + f.c * torch.cos(t).to(z.dtype)).square().sum(1)

        ref = neuralode.solve(f, x, torch.tensor([1.0, 0.0], dtype=D), integral=acc2, **TIGHT)
    torch.testing.assert_close(regs["acceleration"], -ref.integral[-1], rtol=1e-8, atol=0)


GRADIENTS = [Direct(), Backsolve(), Backsolve(seminorm=True), Checkpointed()]


@pytest.mark.parametrize(
    "gradient", GRADIENTS, ids=["direct", "backsolve", "backsolve-seminorm", "checkpointed"]
)
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_gradients_match_finite_differences(gradient, trace):
    torch.manual_seed(2)
    field = MLPVectorField(2, hidden=4, time_dependent=True).to(D)
    flow = CNF(
        field,
        trace=trace,
        regularizers={"kinetic": 0.1, "jacobian": 0.05, "acceleration": 0.02},
        gradient=gradient,
        rtol=1e-10,
        atol=1e-10,
    )
    x = torch.tensor([[0.5, -0.2], [1.0, 0.3], [-0.7, 0.8]], dtype=D)

    def loss():
        torch.manual_seed(3)  # the same Hutchinson noise for every evaluation
        return flow.loss(x).loss

    loss().backward()
    checked = 0
    for p in field.parameters():
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in range(min(2, flat.numel())):
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + 1e-6
                up = loss().item()
                flat[i] = old - 1e-6
                down = loss().item()
                flat[i] = old
            fd = (up - down) / 2e-6
            assert grad[i].item() == pytest.approx(fd, rel=2e-5, abs=1e-7)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpoint"])
def test_nfe_forward_and_backward(gradient):
    torch.manual_seed(5)
    flow = CNF(MLPVectorField(2, hidden=8, time_dependent=True), gradient=gradient)
    out = flow.loss(torch.randn(16, 2))
    assert out.nfe == flow.nfe_forward >= 8 and flow.nfe_backward is None
    out.loss.backward()
    # Direct: one vector-Jacobian product per evaluation the loss depends on (not the trace's).
    assert 0 < flow.nfe_backward <= (flow.nfe_forward if gradient == "direct" else 10**4)


def test_regularizers_left_out_of_the_error_norm_cost_no_steps():
    torch.manual_seed(6)
    field = MLPVectorField(2, hidden=16, time_dependent=True).to(D)
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(3.0)  # a field with some structure, so that steps are not all the same
    x = torch.randn(64, 2, dtype=D)
    regs = {"kinetic": 0.1, "jacobian": 0.1}
    plain = CNF(field, rtol=1e-6, atol=1e-6)
    excl = CNF(field, regularizers=regs, rtol=1e-6, atol=1e-6)
    incl = CNF(field, regularizers=regs, regularizers_in_error_norm=True, rtol=1e-6, atol=1e-6)
    ctrl = CNF(field, regularizers=regs, controller=neuralode.PIController(rtol=1e-6, atol=1e-6))
    with torch.no_grad():
        lp = plain.log_prob(x)
        le, re_ = excl.log_prob_and_regularizers(x)
        li, ri = incl.log_prob_and_regularizers(x)
        ctrl.log_prob(x)
    assert abs(excl.nfe_forward - plain.nfe_forward) <= 2
    assert abs(ctrl.nfe_forward - plain.nfe_forward) <= 2
    assert incl.nfe_forward > excl.nfe_forward
    torch.testing.assert_close(le, lp, rtol=1e-6, atol=1e-6)
    for k in regs:  # still accurate: the steps resolve z, which the integrands depend on
        torch.testing.assert_close(re_[k], ri[k], rtol=1e-3, atol=0)
    with pytest.raises(TypeError, match="regularizers_in_error_norm must be a bool"):
        CNF(field, regularizers_in_error_norm=1)


def test_cnf_errors():
    f = Linear(torch.eye(2, dtype=D))
    with pytest.raises(ValueError, match="trace must be"):
        CNF(f, trace="brute")
    with pytest.raises(ValueError, match="noise must be"):
        CNF(f, noise="uniform")
    with pytest.raises(ValueError, match="t0 and t1 must be finite and different"):
        CNF(f, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match="unknown regulariser 'l2'"):
        CNF(f, regularizers={"l2": 1.0})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        CNF(f, regularizers={"kinetic": -1.0})
    with pytest.raises(TypeError, match="base must be a torch.distributions"):
        CNF(f, base=3)
    with pytest.raises(TypeError, match="field must be callable"):
        CNF(3)
    with pytest.raises(ValueError, match=r"x must be a floating-point batch \(B, d\)"):
        CNF(f).log_prob(torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="does not know its dimension"):
        CNF(lambda t, z: z).sample(3)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        CNF(f).sample(0)
    with pytest.raises(ValueError, match="one value per sample"):
        CNF(f, base=torch.distributions.Normal(torch.zeros(2, dtype=D), 1.0)).log_prob(
            torch.zeros(3, 2, dtype=D)
        )
    with pytest.raises(ValueError, match="must return dz/dt of the state's shape"):
        CNF(lambda t, z: z[:, :1], dim=2).log_prob(torch.zeros(3, 2, dtype=D))


# -- torchdiffeq's examples/cnf.py formulation through the torchdiffeq face ------------------
class HyperCNF(nn.Module):
    """The structure of torchdiffeq's examples/cnf.py (written here, not copied): a hypernetwork
    gives a width-w planar-flow layer per time, the state is (z, logp_z), the trace comes from
    d autograd calls inside func, and the solve is odeint/odeint_adjoint on the tuple."""

    def __init__(self, in_out_dim=2, hidden_dim=8, width=4):
        super().__init__()
        self.d, self.width = in_out_dim, width
        self.blocksize = width * in_out_dim
        self.fc1 = nn.Linear(1, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, 3 * self.blocksize + width)

    def forward(self, t, states):
        z, _ = states
        with torch.set_grad_enabled(True):
            z.requires_grad_(True)
            p = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(t.reshape(1, 1).to(z)))))).view(-1)
            W = p[: self.blocksize].view(self.width, self.d, 1)
            U = p[self.blocksize : 2 * self.blocksize].view(self.width, 1, self.d)
            G = torch.sigmoid(p[2 * self.blocksize : 3 * self.blocksize]).view(
                self.width, 1, self.d
            )
            U, B = U * G, p[3 * self.blocksize :].view(self.width, 1, 1)
            Z = z.unsqueeze(0).repeat(self.width, 1, 1)
            h = torch.tanh(torch.matmul(Z, W) + B)
            dz_dt = torch.matmul(h, U).mean(0)
            trace = torch.zeros(z.shape[0], dtype=z.dtype)
            for i in range(self.d):
                trace += torch.autograd.grad(dz_dt[:, i].sum(), z, create_graph=True)[0][:, i]
        return dz_dt, -trace.view(-1, 1)


@pytest.mark.parametrize("adjoint", [False, True])
def test_torchdiffeq_cnf_example_formulation_runs(adjoint):
    torch.manual_seed(4)
    func = HyperCNF().to(D)
    opt = torch.optim.Adam(func.parameters(), lr=1e-2)
    x = torch.randn(16, 2, dtype=D)
    t = torch.tensor([1.0, 0.0], dtype=D)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logp0 = torch.zeros(16, 1, dtype=D)
        if adjoint:
            z_t, logp_t = neuralode.odeint_adjoint(
                func, (x, logp0), t, atol=1e-5, rtol=1e-5, method="dopri5"
            )
        else:
            z_t, logp_t = neuralode.odeint(func, (x, logp0), t, atol=1e-5, rtol=1e-5)
        logp_x = std_normal_logpdf(z_t[-1]) - logp_t[-1].view(-1)
        loss = -logp_x.mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)

    # The same field as a CNF with the exact trace gives the same log-density.
    with torch.no_grad():
        logp0 = torch.zeros(16, 1, dtype=D)
        z_t, logp_t = neuralode.odeint(func, (x, logp0), t, atol=1e-9, rtol=1e-9)
        ref = std_normal_logpdf(z_t[-1]) - logp_t[-1].view(-1)
    got = CNF(HyperCNFField(func), rtol=1e-9, atol=1e-9).log_prob(x).detach()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


class WithKinetic(nn.Module):
    """FFJORD-style code with an extra regularisation state: (z, logp, E) -> (dz, -tr, |dz|^2)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, states):
        dz, dlogp = self.inner(t, states[:2])
        return dz, dlogp, dz.square().sum(1, keepdim=True)


def test_torchdiffeq_style_extra_regularisation_state():
    torch.manual_seed(7)
    func = WithKinetic(HyperCNF()).to(D)
    x = torch.randn(8, 2, dtype=D)
    zeros = torch.zeros(8, 1, dtype=D)
    t = torch.tensor([1.0, 0.0], dtype=D)
    grads = []
    for odeint in (neuralode.odeint, neuralode.odeint_adjoint):
        func.zero_grad()
        z_t, logp_t, e_t = odeint(func, (x, zeros, zeros), t, rtol=1e-8, atol=1e-8)
        loss = -(std_normal_logpdf(z_t[-1]) - logp_t[-1].view(-1)).mean() - 0.1 * e_t[-1].mean()
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in func.parameters()]))
    # Integrated from t1 = 1 down to 0, the energy state is minus the kinetic energy integral.
    field = HyperCNFField(func.inner)
    _, regs = CNF(
        field, regularizers={"kinetic": 1.0}, rtol=1e-8, atol=1e-8
    ).log_prob_and_regularizers(x)
    torch.testing.assert_close(-e_t[-1].view(-1), regs["kinetic"].detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


class HyperCNFField(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, z):
        return self.inner(t, (z, None))[0]
