"""The torchdiffeq face's cast of a derivative of another dtype, by retrying the solve.

func runs unwrapped (no per-evaluation cost); only when the engine refuses a derivative's dtype
(``StateDtypeError``) is the solve run again with the cast, which costs one evaluation more.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import neuralode
from neuralode import _compat_hooks, odeint, odeint_adjoint
from neuralode._compat import odeint_dense
from neuralode._tree import StateDtypeError

_K32 = torch.tensor([0.5, 1.0, 2.0])
_K64 = torch.from_numpy(np.array([0.5, 1.0, 2.0]))  # float64, as numpy arrays come
_T = torch.tensor([0.0, 0.5, 1.0])


class _Counted:
    """``-k y`` counting its calls; ``k64_after``: from that time on the derivative is float64."""

    def __init__(self, k64_after=None):
        self.calls, self.k64_after = 0, k64_after
        self.wrapped = False

    def __call__(self, t, y):
        self.calls += 1
        self.wrapped |= sys._getframe(1).f_code.co_name == "cast_func"
        k = _K64 if self.k64_after is not None and float(t) >= self.k64_after else _K32
        return -k * y


def _solve(iface, f, y0):
    if iface == "odeint":
        return odeint(f, y0, _T, rtol=1e-6, atol=1e-8)
    if iface == "odeint_adjoint":
        return odeint_adjoint(f, y0, _T, rtol=1e-6, atol=1e-8, adjoint_params=())
    return odeint_dense(f, y0, 0.0, 1.0, rtol=1e-6, atol=1e-8)(_T)


@pytest.mark.parametrize("iface", ["odeint", "odeint_adjoint", "odeint_dense"])
def test_same_dtype_runs_func_unwrapped(iface):
    f = _Counted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = _solve(iface, f, torch.ones(4, 3))
    assert not f.wrapped
    expected = torch.exp(-_K32 * _T[:, None, None]).expand(3, 4, 3)
    torch.testing.assert_close(ys, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iface", ["odeint", "odeint_adjoint", "odeint_dense"])
def test_another_dtype_costs_one_evaluation_more(iface, monkeypatch):
    monkeypatch.setattr(_compat_hooks, "_WARNED_CASTS", set())
    same, cast = _Counted(), _Counted(k64_after=0.0)
    ref = _solve(iface, same, torch.ones(4, 3))
    with pytest.warns(UserWarning, match=r"torch\.float64 for a state of dtype torch\.float32"):
        ys = _solve(iface, cast, torch.ones(4, 3))
    assert ys.dtype == torch.float32 and cast.wrapped
    # The first try stops at func's first evaluation; the retry takes the same steps (float32
    # products of the same values: the cast float64 products round to the same float32).
    assert cast.calls == same.calls + 1
    torch.testing.assert_close(ys, ref, rtol=1e-6, atol=1e-7)


def test_dtype_changing_inside_the_solve_reruns_the_evaluations_before(monkeypatch):
    monkeypatch.setattr(_compat_hooks, "_WARNED_CASTS", set())
    same, late = _Counted(), _Counted(k64_after=0.4)
    ref = odeint(same, torch.ones(4, 3), _T, rtol=1e-6, atol=1e-8)
    with pytest.warns(UserWarning, match="is cast to"):
        ys = odeint(late, torch.ones(4, 3), _T, rtol=1e-6, atol=1e-8)
    assert same.calls + 1 < late.calls < 2 * same.calls
    torch.testing.assert_close(ys, ref, rtol=1e-6, atol=1e-7)


def test_other_type_errors_are_not_retried():
    calls = []

    def f(t, y):
        calls.append(float(t))
        raise TypeError("func's own error")

    with pytest.raises(TypeError, match="func's own error"):
        odeint(f, torch.ones(3), _T)
    assert len(calls) == 1


def test_complex_derivative_for_a_real_state_still_raises():
    calls = []

    def f(t, y):
        calls.append(1)
        return (-y).to(torch.complex64)

    with pytest.raises(StateDtypeError, match="has dtype torch.complex64 but the state has"):
        odeint(f, torch.ones(3), _T)
    assert len(calls) == 1  # (no retry: the cast would drop the imaginary part)


def test_native_solve_raises_the_typeerror_subclass_with_the_dtypes():
    with pytest.raises(TypeError, match="has dtype torch.float64 but the state has dtype") as e:
        neuralode.solve(lambda t, y: -_K64 * y, torch.ones(4, 3), _T)
    assert isinstance(e.value, StateDtypeError)
    assert (e.value.got, e.value.want) == (torch.float64, torch.float32)
    assert e.value.what == _compat_hooks.FUNC_DERIVATIVE
