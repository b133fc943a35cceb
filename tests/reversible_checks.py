"""Shared check for the Reversible tests: central finite differences of the reversible forward."""

import torch

import neuralode as no


def assert_central_differences(func, y0, t, c, grads, kw, eps=1e-6, rtol=1e-7, atol=1e-9):
    """Assert that ``grads = (dL/dy0, dL/dp)`` of ``L = sum(ys * c)`` (``p`` the first parameter
    of ``func``; the solve ``no.solve(func, y0, t, gradient="reversible", **kw)``) match central
    differences of that same reversible forward at three entries of each."""
    p = next(func.parameters())

    def value(y0_, delta_p=None):
        with torch.no_grad():
            if delta_p is not None:
                p.add_(delta_p)
            out = (no.solve(func, y0_, t, gradient="reversible", **kw).ys * c).sum()
            if delta_p is not None:
                p.sub_(delta_p)
        return float(out)

    for idx in [(0, 0), (2, 1), (3, 2)]:
        e = torch.zeros_like(y0)
        e[idx] = eps
        fd = (value(y0 + e) - value(y0 - e)) / (2 * eps)
        assert abs(fd - float(grads[0][idx])) <= rtol * abs(float(grads[0][idx])) + atol
    for idx in [(0, 0), (5, 1), (15, 2)]:
        e = torch.zeros_like(p)
        e[idx] = eps
        fd = (value(y0, e) - value(y0, -e)) / (2 * eps)
        assert abs(fd - float(grads[1][idx])) <= rtol * abs(float(grads[1][idx])) + atol
