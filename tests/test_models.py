"""Tests of neuralode.models: NeuralODE, ODENetClassifier, ODERNN, LatentODE."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import neuralode
from neuralode.data import SubjectSeries, collate_series
from neuralode.models import (
    ODERNN,
    LatentODE,
    MLPVectorField,
    NeuralODE,
    ODENetClassifier,
    SolverSettings,
)

TIGHT = dict(rtol=1e-9, atol=1e-11)


class LinearField(nn.Module):
    """dy/dt = y A^T (autonomous, closed-form solution y(t) = y0 expm(A t)^T)."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(A.shape[1], A.shape[0], bias=False).to(A.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(A)

    def forward(self, t, y):
        return self.lin(y)


def linear_flow(A, y0, t):
    """Exact solution of LinearField: (T, *y0.shape)."""
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * float(s)).T for s in t])


def make_batch(n=6, C=2, seed=0, dtype=torch.float32, labels=True):
    """Small irregular batch: own times per series starting at 0, random missingness."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        m = 3 + i % 4
        times = torch.cat([torch.zeros(1), torch.sort(torch.rand(m - 1, generator=g) * 3).values])
        phase = torch.rand(1, generator=g) * 6.0
        values = torch.stack(
            [torch.sin(times + phase), 0.5 * torch.cos(2 * times + phase)][:C]
            + [torch.ones_like(times)] * (C - 2),
            dim=1,
        )
        mask = (torch.rand(m, C, generator=g) < 0.7).float()
        mask[0] = 1.0
        label = (float(i % 2) if i != 1 else None) if labels else None
        records.append(SubjectSeries(i, times, values.to(dtype), mask, label=label))
    return collate_series(records, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# NeuralODE
# ---------------------------------------------------------------------------------------------
A = torch.tensor([[-0.5, 1.0], [-1.0, -0.3]], dtype=torch.float64)


def test_neural_ode_trajectory_matches_closed_form():
    ode = NeuralODE(LinearField(A), **TIGHT)
    y0 = torch.tensor([[1.0, 0.0], [0.5, -2.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    ys = ode(y0, t)
    assert ys.shape == (5, 3, 2)
    torch.testing.assert_close(ys, linear_flow(A, y0, t), rtol=1e-7, atol=1e-8)
    # Without t: the final state at t = 1 (continuous-depth layer); final() with its own span.
    torch.testing.assert_close(ode(y0), linear_flow(A, y0, [1.0])[0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(
        ode.final(y0, 0.5, 2.0), linear_flow(A, y0, [1.5])[0], rtol=1e-7, atol=1e-8
    )


def test_neural_ode_per_sample_grid():
    ode = NeuralODE(LinearField(A), **TIGHT)
    y0 = torch.tensor([[1.0, 0.0], [0.5, -2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.3, 0.3], [0.0, 1.0, 2.0]], dtype=torch.float64)
    ys = ode(y0, t)
    assert ys.shape == (3, 2, 2)
    for b in range(2):
        torch.testing.assert_close(ys[:, b], linear_flow(A, y0[b], t[b]), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("gradient", ["direct", "backsolve", "checkpoint"])
def test_neural_ode_nfe_attributes(gradient):
    torch.manual_seed(0)
    ode = NeuralODE(MLPVectorField(3, 16), gradient=gradient, rtol=1e-5, atol=1e-7)
    assert ode.nfe_forward is None and ode.nfe_backward is None
    y0 = torch.randn(4, 3)
    t = torch.linspace(0, 1, 3)
    with torch.no_grad():
        ref = neuralode.solve(ode.func, y0, t, rtol=1e-5, atol=1e-7)
    ys = ode(y0, t)
    assert ode.nfe_forward == ref.stats["nfe"] > 0
    assert ode.nfe_backward is None  # no backward yet
    ys[-1].square().sum().backward()
    assert ode.nfe_backward is not None and ode.nfe_backward > 0
    if gradient == "direct":  # one vector-Jacobian product per evaluation at most
        assert ode.nfe_backward <= ode.nfe_forward
    assert all(p.grad is not None for p in ode.parameters())
    # A new forward pass starts a new count.
    ode(y0, torch.linspace(0, 3, 3))
    assert ode.nfe_forward > ref.stats["nfe"] and ode.nfe_backward is None


def test_neural_ode_augmentation_strips_extra_dims():
    torch.manual_seed(0)
    func = MLPVectorField(5, 16)
    ode = NeuralODE(func, augment_dim=2, rtol=1e-7, atol=1e-9)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    func.double()
    t = torch.linspace(0, 1, 4, dtype=torch.float64)
    ys = ode(y0, t)
    assert ys.shape == (4, 4, 3)
    full = neuralode.solve(
        func, torch.cat([y0, torch.zeros(4, 2, dtype=y0.dtype)], 1), t, rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(ys, full.ys[..., :3])
    assert full.ys[-1, :, 3:].abs().max() > 1e-3  # the augmented channels did move
    assert ode(y0).shape == (4, 3)
    with pytest.raises(ValueError, match="batched state"):
        ode(torch.zeros(3, dtype=torch.float64), t)


def test_neural_ode_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        NeuralODE(lambda t, y: -y)
    with pytest.raises(ValueError, match="augment_dim"):
        NeuralODE(MLPVectorField(2), augment_dim=-1)
    ode = NeuralODE(MLPVectorField(2))
    with pytest.raises(TypeError, match="floating point"):
        ode(torch.zeros(2, 2, dtype=torch.int64), [0.0, 1.0])
    with pytest.raises(ValueError, match="must differ"):
        ode.final(torch.zeros(1, 2), 1.0, 1.0)


def test_solver_settings_validation():
    s = SolverSettings()
    assert (s.rtol, s.atol) == (1e-3, 1e-4) and isinstance(s.gradient, neuralode.Direct)
    assert SolverSettings(solver="rk4", dt=0.1).solve_kwargs()["dt"] == 0.1
    with pytest.raises(ValueError, match="fixed-step"):
        SolverSettings(solver="rk4")
    with pytest.raises(ValueError, match="no effect with a fixed step"):
        SolverSettings(dt=0.1, rtol=1e-3)
    with pytest.raises(ValueError, match="inside the controller"):
        SolverSettings(controller=neuralode.ConstantStep(0.1), atol=1e-3)
    with pytest.raises(TypeError, match="controller must be"):
        SolverSettings(controller="pi")
    with pytest.raises(ValueError, match="unknown solver"):
        SolverSettings(solver="dopri7")
    with pytest.raises(ValueError, match="unknown gradient"):
        SolverSettings(gradient="magic")
    with pytest.raises(ValueError, match="positive finite"):
        SolverSettings(rtol=-1.0)
    with pytest.raises(TypeError, match="rtol must be a float"):
        SolverSettings(rtol="1e-3")
    with pytest.raises(ValueError, match="max_steps must be positive"):
        SolverSettings(max_steps=0)
    with pytest.raises(TypeError, match="max_steps must be an int"):
        SolverSettings(max_steps=1.5)


def test_mlp_vector_field_time_dependence():
    f = MLPVectorField(3, 8, time_dependent=True)
    y = torch.randn(2, 3)
    assert f(torch.tensor(0.0), y).shape == (2, 3)
    assert not torch.equal(f(torch.tensor(0.0), y), f(torch.tensor(1.0), y))
    g = MLPVectorField(3, 8)
    assert torch.equal(g(torch.tensor(0.0), y), g(torch.tensor(5.0), y))
    with pytest.raises(ValueError, match="unknown activation"):
        MLPVectorField(3, activation="sigmoid")
    with pytest.raises(ValueError, match="dim must be"):
        MLPVectorField(0)


# ---------------------------------------------------------------------------------------------
# ODENetClassifier
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["conv", "mlp"])
def test_odenet_classifier_shapes_and_training_step(field):
    torch.manual_seed(0)
    model = ODENetClassifier((1, 8, 8), 10, width=8, field=field, augment_dim=2)
    x = torch.randn(5, 1, 8, 8)
    y = torch.arange(5)
    logits = model(x)
    assert logits.shape == (5, 10)
    assert model.nfe_forward > 0
    nn.functional.cross_entropy(logits, y).backward()
    assert model.nfe_backward > 0
    assert all(p.grad is not None for p in model.parameters())
    feats = model.features(x)
    assert feats.shape == ((5, 8, 4, 4) if field == "conv" else (5, 8))


def test_odenet_classifier_bad_inputs():
    model = ODENetClassifier((1, 8, 8), 10, width=8)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="in_shape"):
        ODENetClassifier((8, 8))
    with pytest.raises(ValueError, match="field"):
        ODENetClassifier(field="rnn")
    with pytest.raises(ValueError, match="n_classes"):
        ODENetClassifier(n_classes=1)
    with pytest.raises(ValueError, match="downsample=4"):
        ODENetClassifier((1, 8, 8), downsample=4)


# ---------------------------------------------------------------------------------------------
# ODERNN
# ---------------------------------------------------------------------------------------------
def _odernn(C=2, H=5, **kw):
    torch.manual_seed(0)
    return ODERNN(C, H, ode_hidden=8, **{**TIGHT, **kw}).double()


@pytest.mark.parametrize("reverse", [False, True])
def test_odernn_per_sample_times_equal_single_sample_runs(reverse):
    rnn = _odernn()
    batch = make_batch(dtype=torch.float64)
    t_end = 0.0 if reverse else 3.5
    hs, h_last = rnn.forward_batch(batch, reverse=reverse, t_end=t_end)
    B, T = batch.times.shape
    assert hs.shape == (B, T, 5) and h_last.shape == (B, 5)
    for b in range(B):
        n = int(batch.lengths[b])
        hs_b, last_b = rnn(
            batch.times[b : b + 1, :n],
            batch.values[b : b + 1, :n],
            batch.mask[b : b + 1, :n],
            reverse=reverse,
            t_end=t_end,
        )
        torch.testing.assert_close(hs[b, :n], hs_b[0], rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(h_last[b], last_b[0], rtol=1e-7, atol=1e-8)
        if n < T and not reverse:  # padding carries the last state
            torch.testing.assert_close(hs[b, n:], hs[b, n - 1].expand(T - n, -1))
    assert rnn.nfe_forward > 0


def test_odernn_matches_manual_recursion():
    """GRU update on [x*m, m] at each observed point, ODE flow of the gaps in between."""
    rnn = _odernn()
    times = torch.tensor([[0.0, 0.4, 1.0, 1.7]], dtype=torch.float64)
    values = torch.randn(1, 4, 2, dtype=torch.float64)
    mask = torch.tensor([[[1, 0], [0, 0], [1, 1], [0, 1]]], dtype=torch.float64)
    hs, _ = rnn(times, values, mask)
    h = torch.zeros(1, 5, dtype=torch.float64)
    t_prev = 0.0
    for j in range(4):
        h = (
            neuralode.solve(rnn.vector_field, h, [t_prev, float(times[0, j])], **TIGHT).ys[-1]
            if j
            else h
        )
        if mask[0, j].any():
            h = rnn.cell(torch.cat([values[0, j] * mask[0, j], mask[0, j]])[None], h)
        torch.testing.assert_close(hs[0, j], h[0], rtol=1e-7, atol=1e-8)
        t_prev = float(times[0, j])
    # values at missing entries are ignored
    hs2, _ = rnn(times, values + 100 * (1 - mask), mask)
    torch.testing.assert_close(hs, hs2)


def test_odernn_state_depends_on_observed_points_only():
    rnn = _odernn()
    batch = make_batch(dtype=torch.float64)
    # Unobserved trailing points: hide everything after the second point of every sample.
    keep = torch.zeros_like(batch.valid)
    keep[:, :2] = True
    m = batch.mask * keep[..., None]
    _, h1 = rnn.forward_batch(batch, reverse=True, mask=m, t_end=0.0)
    later = batch.times + 5.0 * (~keep)  # move the hidden (unobserved) points in time
    b2 = dataclasses.replace(batch, times=torch.maximum(later, batch.times))
    _, h2 = rnn.forward_batch(b2, reverse=True, mask=m, t_end=0.0)
    torch.testing.assert_close(h1, h2)
    # A sample without any observation keeps h0 = 0.
    _, h3 = rnn.forward_batch(batch, mask=torch.zeros_like(batch.mask))
    assert torch.equal(h3, torch.zeros_like(h3))


def test_odernn_bad_inputs():
    rnn = _odernn()
    batch = make_batch(dtype=torch.float64)
    with pytest.raises(ValueError, match="input_dim=2 channels"):
        rnn(batch.times, batch.values[..., :1], batch.mask[..., :1])
    with pytest.raises(TypeError, match="model's dtype"):
        rnn.forward_batch(batch.to(dtype=torch.float32))
    with pytest.raises(ValueError, match="non-decreasing"):
        rnn(batch.times.flip(1) + 0.1, batch.values, batch.mask)
    with pytest.raises(ValueError, match=r"times must have shape \(B, T\)"):
        rnn(batch.times[0], batch.values, batch.mask)
    with pytest.raises(ValueError, match="mask must have the shape"):
        rnn(batch.times, batch.values, batch.mask[:, :-1])
    with pytest.raises(TypeError, match="valid must be a bool"):
        rnn(batch.times, batch.values, batch.mask, batch.valid.float())
    with pytest.raises(ValueError, match="t_end must lie at or before"):
        rnn.forward_batch(batch, reverse=True, t_end=1.0)
    with pytest.raises(ValueError, match="h0 must be"):
        rnn(batch.times, batch.values, batch.mask, h0=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="values must be a floating"):
        rnn(batch.times, batch.values.long(), batch.mask)
    bad = batch.times.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        rnn(bad, batch.values, batch.mask)
    with pytest.raises(ValueError, match=r"t_end must be a float or have shape \(B,\)"):
        rnn.forward_batch(batch, t_end=torch.zeros(2))
    with pytest.raises(TypeError, match="vector_field must be"):
        ODERNN(2, 4, vector_field=lambda t, h: h)


def test_odernn_and_latent_ode_gradient_methods_agree():
    """Direct, checkpointed (exact, to rounding) and backsolve (to tolerance) gradients."""
    batch = make_batch(dtype=torch.float64)
    grads = {}
    for g in ("direct", "checkpoint", "backsolve"):
        torch.manual_seed(0)
        model = LatentODE(2, 3, rec_hidden=6, ode_hidden=8, gradient=g, **TIGHT).double()
        out = model.loss(batch, n_samples=2, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads[g] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert model.nfe_backward > 0
    torch.testing.assert_close(grads["checkpoint"], grads["direct"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["backsolve"], grads["direct"], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# LatentODE
# ---------------------------------------------------------------------------------------------
def _latent(**kw):
    torch.manual_seed(0)
    base = dict(latent_dim=3, rec_hidden=8, ode_hidden=12)
    return LatentODE(2, **{**base, **kw})


def test_latent_ode_shapes_and_finite_elbo():
    model = _latent()
    batch = make_batch()
    B, T, C = batch.values.shape
    mu, std = model.encode(batch)
    assert mu.shape == std.shape == (B, 3) and bool((std > 0).all())
    x = model.decode(torch.randn(4, B, 3), batch.times)
    assert x.shape == (4, B, T, C)
    out = model.loss(batch, n_samples=2)
    for k in ("loss", "elbo", "log_lik", "kl", "mse"):
        assert out[k].dim() == 0 and torch.isfinite(out[k]), k
    assert out["n_obs"] == batch.mask.sum()
    # KL(q(z0|x) || N(0, I)) per series, averaged: against torch.distributions' closed form
    with torch.no_grad():
        q, prior = torch.distributions.Normal(mu, std), torch.distributions.Normal(0.0, 1.0)
        kl = torch.distributions.kl_divergence(q, prior).sum(-1).mean()
    assert float(kl) > 0
    torch.testing.assert_close(out["kl"], kl, rtol=1e-5, atol=1e-6)
    assert out["loss"].requires_grad and not out["elbo"].requires_grad
    torch.testing.assert_close(out["elbo"], out["log_lik"] - out["kl"])
    torch.testing.assert_close(out["loss"], -out["elbo"] * B / out["n_obs"])
    assert model.nfe_forward > 0
    out["loss"].backward()
    assert model.nfe_backward > 0
    assert model.elbo(batch).requires_grad  # a new call: counts start again
    assert model.nfe_backward is None


def test_latent_ode_decode_per_sample_times():
    """Each sample decoded on its own grid equals decoding it alone."""
    model = _latent(rtol=1e-8, atol=1e-10).double()
    z0 = torch.randn(3, 3, dtype=torch.float64)
    times = torch.tensor([[0.0, 0.5, 2.0], [0.3, 0.3, 0.3], [1.0, 1.5, 4.0]], dtype=torch.float64)
    x = model.decode(z0, times)
    assert x.shape == (3, 3, 2)
    for b in range(3):
        alone = model.decode(z0[b : b + 1], times[b : b + 1])
        torch.testing.assert_close(x[b], alone[0], rtol=1e-6, atol=1e-7)
    # A shared 1-D grid is broadcast to every sample.
    shared = model.decode(z0, times[0])
    torch.testing.assert_close(shared[0], x[0])
    with pytest.raises(ValueError, match=r"times must have shape \(B, Q\)"):
        model.decode(z0, times[:2])


def test_latent_ode_training_decreases_loss():
    model = _latent(obs_std=0.3)
    batch = make_batch(n=8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        before = model.loss(batch, generator=gen(), n_samples=4)
    for _ in range(25):
        out = model.loss(batch, generator=torch.Generator().manual_seed(_))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = model.loss(batch, generator=gen(), n_samples=4)
    assert torch.isfinite(after["elbo"])
    assert float(after["elbo"]) > float(before["elbo"]) + 1.0
    assert float(after["mse"]) < float(before["mse"])


def test_latent_ode_iwae_bound():
    model = _latent()
    batch = make_batch()
    out = model.loss(batch, n_samples=8, iwae=True, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["elbo"])
    # With one sample the IWAE bound is log p(x|z) + log p(z) - log q(z) for that sample,
    # whose expectation is the ELBO: check against a Monte Carlo average.
    with torch.no_grad():
        vals = [
            float(model.loss(batch, iwae=True, generator=torch.Generator().manual_seed(s))["elbo"])
            for s in range(64)
        ]
        elbo = float(
            model.loss(batch, n_samples=64, generator=torch.Generator().manual_seed(1))["elbo"]
        )
    assert abs(sum(vals) / len(vals) - elbo) < 0.1 * abs(elbo)
    with pytest.raises(ValueError, match="kl_weight"):
        model.loss(batch, iwae=True, kl_weight=0.5)


def test_latent_ode_classification_head():
    model = _latent(classify=True)
    batch = make_batch()
    assert bool(torch.isnan(batch.labels).any())  # sample 1 is unlabelled
    out = model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert "bce" in out and float(out["bce"]) > 0
    # The bce averages over labelled series only: labelling the NaN one changes it.
    labelled = dataclasses.replace(batch, labels=torch.nan_to_num(batch.labels, 1.0))
    with torch.no_grad():
        a = model.loss(batch, generator=torch.Generator().manual_seed(0))["bce"]
        b = model.loss(labelled, generator=torch.Generator().manual_seed(0))["bce"]
        # reference: the mean over labelled series of the per-series bce
        mu, std = model.encode(batch)
        eps = torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(0))
        logits = model.classifier(mu + std * eps)[0, :, 0]
        keep = ~torch.isnan(batch.labels)
        ref = nn.functional.binary_cross_entropy_with_logits(logits[keep], batch.labels[keep])
        # accuracy: the fraction of labelled series whose logit has the label's sign
        acc = ((logits[keep] > 0) == (batch.labels[keep] > 0.5)).double().mean()
    torch.testing.assert_close(a, ref)
    assert float(logits[keep].abs().min()) > 1e-6  # no sign decided by rounding
    assert float(out["accuracy"]) == pytest.approx(float(acc), abs=1e-6)  # float32
    assert float(b) != float(a)
    out["loss"].backward()
    assert model.classifier[0].weight.grad.abs().sum() > 0
    torch.testing.assert_close(out["loss"], -out["elbo"] * len(batch) / out["n_obs"] + out["bce"])
    p = model.predict_proba(batch)
    assert p.shape == (len(batch),) and bool(((p > 0) & (p < 1)).all())
    with pytest.raises(ValueError, match="needs batch.labels"):
        model.loss(make_batch(labels=False))
    with pytest.raises(ValueError, match="classify=True"):
        _latent().predict_proba(batch)


def test_latent_ode_extrapolation_uses_only_observed_points():
    model = _latent()
    batch = make_batch()
    t_split = 1.5
    observed, future = batch.split_time(t_split)
    assert future.sum() > 0
    mu, std = model.encode(batch, observed)
    changed = dataclasses.replace(batch, values=batch.values + 10.0 * future)
    mu2, std2 = model.encode(changed, observed)
    assert torch.equal(mu, mu2) and torch.equal(std, std2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        a = model.loss(batch, t_split=t_split, generator=gen())
        b = model.loss(changed, t_split=t_split, generator=gen())
        m1, _ = model.predict(batch, t_split=t_split, generator=gen())
        m2, _ = model.predict(changed, t_split=t_split, generator=gen())
    assert torch.equal(m1, m2)
    assert float(a["n_obs"]) == float(future.sum())  # the future is what is scored
    assert float(b["mse"]) > float(a["mse"]) + 1.0
    with pytest.raises(ValueError, match="either t_split"):
        model.loss(batch, t_split=1.0, target_mask=future)


def test_latent_ode_predict():
    model = _latent()
    batch = make_batch()
    q = torch.linspace(0, 4, 7)
    mean, std = model.predict(batch, q, n_samples=5, generator=torch.Generator().manual_seed(0))
    assert mean.shape == std.shape == (len(batch), 7, 2) and bool((std >= 0).all())
    mean2, std2 = model.predict(
        batch, q, n_samples=5, observation_noise=True, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(std2, (std**2 + model.obs_std**2).sqrt())
    mean3, _ = model.predict(batch, n_samples=3)
    assert mean3.shape == batch.values.shape


def test_latent_ode_bad_inputs():
    model = _latent()
    batch = make_batch()
    with pytest.raises(ValueError, match="3 channels but the model was built with n_channels=2"):
        model.loss(make_batch(C=3))
    with pytest.raises(TypeError, match="IrregularBatch"):
        model.loss(batch.values)
    with pytest.raises(ValueError, match="must be >= t0"):
        model.loss(dataclasses.replace(batch, times=batch.times - 1.0))
    with pytest.raises(ValueError, match="query times must be >= t0"):
        model.predict(batch, torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        model.predict(batch, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="encoder_mask must be a tensor"):
        model.loss(batch, encoder_mask=batch.mask[:, :1])
    with pytest.raises(ValueError, match="z0 must have shape"):
        model.decode(torch.zeros(2, 4), batch.times[:2])
    with pytest.raises(ValueError, match="n_samples"):
        model.loss(batch, n_samples=0)
    with pytest.raises(ValueError, match="obs_std"):
        LatentODE(2, obs_std=-1.0)
    with pytest.raises(ValueError, match="t0"):
        LatentODE(2, t0=float("nan"))
    with pytest.raises(TypeError, match="model's dtype"):
        model.loss(batch.to(dtype=torch.float64))
    with pytest.raises(ValueError, match="either t_split or encoder_mask"):
        model.predict(batch, t_split=1.0, encoder_mask=batch.mask)


def test_models_import_without_pandas():
    code = "import sys, neuralode.models; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
