"""The host-float fast paths of step-size control give what the tensor forms give.

The helpers of ``controllers/base.py`` test for Python floats before tensors, ``pi_update``
forms only the branch of a host accept/reject and ``landing_eps`` remembers the answers for
float landings; each is checked here against the general (tensor) path of the same formula.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from neuralode.controllers import base
from neuralode.controllers.base import isfinite, landing_eps, maximum, minimum, where
from neuralode.controllers.step_size import pi_update

_VALUES = (-2.5, -0.0, 0.0, 1e-300, 0.75, 3.0, math.inf, -math.inf, math.nan)


def _same(a: float, b) -> bool:
    b = float(b)
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize(("a", "b"), list(itertools.product(_VALUES, repeat=2)))
def test_float_helpers_agree_with_torch(a, b):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert type(minimum(a, b)) is float and type(maximum(a, b)) is float
    assert _same(minimum(a, b), torch.minimum(ta, tb))  # NaN propagates, as in torch
    assert _same(maximum(a, b), torch.maximum(ta, tb))
    assert _same(where(a < b, a, b), torch.where(ta < tb, ta, tb))
    assert isfinite(a) == bool(torch.isfinite(ta))


# (safety, ifactor, dfactor, pcoeff, icoeff): I control and PI control
_GAINS = [(0.9, 10.0, 0.2, 0.0, 1.0), (0.8, 5.0, 0.1, 0.2, 0.5)]
_ERRORS = [0.0, 1e-3, 0.4, 1.0, 7.5, math.inf, math.nan]


@pytest.mark.parametrize("gains", _GAINS)
@pytest.mark.parametrize("accept", [True, False])
@pytest.mark.parametrize("clipped", [True, False])
def test_pi_update_host_branch_equals_the_tensor_form(gains, accept, clipped):
    """A host bool ``accept`` forms one branch; a (B,) tensor ``accept`` forms both and selects:
    the same numbers, row by row."""
    h, h_prop, prev, k = 0.125, 0.2, 0.3, 5
    e_rows = torch.tensor(_ERRORS, dtype=torch.float64)
    n = len(_ERRORS)
    rows = pi_update(
        *gains, torch.full((n,), h, dtype=torch.float64), torch.full((n,), h_prop,
        dtype=torch.float64), e_rows, torch.full((n,), prev, dtype=torch.float64), k,
        torch.full((n,), accept), torch.full((n,), clipped),
    )  # fmt: skip
    for j, e in enumerate(_ERRORS):
        h_next, prev_next = pi_update(*gains, h, h_prop, e, prev, k, accept, clipped)
        assert type(h_next) is float
        assert _same(h_next, rows[0][j]) and _same(prev_next, rows[1][j])


def test_landing_eps_remembers_float_answers_within_its_bound():
    assert landing_eps(0.5) == landing_eps(0.5) == base._EPS32  # a float32 value
    assert landing_eps(0.1) == base._EPS64  # 0.1 (double) is no float32
    assert landing_eps(1e300) == base._EPS64  # beyond float32's range
    t = torch.tensor([0.5, 0.1], dtype=torch.float64)
    assert landing_eps(t).tolist() == [base._EPS32, base._EPS64]  # tensors: not remembered
    for i in range(5000):  # many distinct landings: the memo stays bounded
        x = 0.1 + i * 1e-3
        assert landing_eps(x) == (
            base._EPS32 if float(torch.tensor(x).float()) == x else base._EPS64
        )
    assert len(base._EPS_OF) <= 4096
