"""The fused scaled error norm of the loop against the plain per-component definition."""

import math

import numpy as np
import pytest
import torch

from neuralode._loop import Problem
from neuralode._norms import ErrorNormWork
from neuralode._tree import flatten_state
from neuralode.solvers import get_tableau


def _reference(spec, err, y, y_new, rtol, atol, n_components=None):
    """Hairer, Norsett & Wanner I, sec. II.4, eq. (4.11), in numpy from the definition:
    ``sqrt(mean_i (e_i / sc_i)^2)`` with ``sc_i = atol + rtol max(|y_i|, |y_new_i|)``, over the
    whole tensor state, or the maximum of that over the components of a tuple/dict state (only
    the first ``n_components``, skipping empty ones)."""
    e, a, b = (np.abs(x.detach().numpy()).reshape(spec.batch, -1) for x in (err, y, y_new))
    ratio = e / (atol + rtol * np.maximum(a, b))  # (batch, scalars per row)
    if spec.kind == "tensor":
        return math.sqrt(np.sum(ratio**2) / ratio.size)
    bounds = np.cumsum([0, *spec.sizes])
    parts = [ratio[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])][:n_components]
    return max(math.sqrt(np.sum(p**2) / p.size) for p in parts if p.size)


def _prob(spec, rtol, atol):
    return Problem(
        spec=spec,
        tableau=get_tableau("dopri5"),
        controller=None,
        t0=0.0,
        t_end=1.0,
        out_t=[1.0],
        out_sample=None,
        out_order=None,
        n_out_rows=1,
        max_steps=None,
        rtol=rtol,
        atol=atol,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize(
    "state",
    [
        lambda g, dt: torch.randn(5, 3, generator=g, dtype=dt),
        lambda g, dt: (torch.randn(4, generator=g, dtype=dt), 1e-3 * torch.randn(2, 2, dtype=dt)),
        lambda g, dt: {"a": torch.randn(3, dtype=dt), "e": torch.zeros(0, dtype=dt), "b": torch.randn(7, dtype=dt)},
    ],
)  # fmt: skip
@pytest.mark.parametrize("n_components", [None, 1])
def test_fused_norm_matches_definition(dtype, state, n_components):
    g = torch.Generator().manual_seed(0)
    y0 = state(g, dtype)
    spec, y = flatten_state(y0, batched=False)
    if spec.kind == "tensor":
        n_components = None  # a seminorm restricts structured states only
    prob = _prob(spec, 1e-3, 1e-6)
    prob.norm_components = n_components
    work = ErrorNormWork(y, spec, n_components)
    y_new = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    for _ in range(3):  # the carried |y| must not go stale across accepted/rejected steps
        err = 1e-4 * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        want = _reference(spec, err.clone(), y, y_new, 1e-3, 1e-6, n_components)
        got = work(prob, err.clone(), y, y_new)
        assert math.isclose(got, want, rel_tol=1e-12)
        y, y_new = y_new, y_new * 1.5  # accept, then a new trial state
    # A rejected step: the same y again with another trial state.
    y_other = y * 0.5
    err = 1e-4 * torch.ones(y.shape, dtype=dtype)
    want = _reference(spec, err.clone(), y, y_other, 1e-3, 1e-6, n_components)
    assert math.isclose(work(prob, err.clone(), y, y_other), want, rel_tol=1e-12)
