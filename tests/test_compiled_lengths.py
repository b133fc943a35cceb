"""compile=True: the steps unrolled per compiled call follow the previous solve's step count.

A repeated solve (a training loop) unrolls just enough steps per call; the results do not
depend on the lengths, a solve of several calls from a ``y0`` without a graph stays compiled
under autograd, and a func whose Python state changed is still caught before a new length is
compiled for it. Small fields, at most 4 steps per call (a minute or two of compilation on 2
cores).
"""

import warnings

import pytest
import torch

import neuralode
import neuralode._compiled as compiled
from neuralode import _compiled_lengths as lengths

F64 = torch.float64


def test_lengths_are_powers_of_two_up_to_the_maximum():
    assert lengths.lengths(8) == [1, 2, 4, 8]
    assert lengths.lengths(6) == [1, 2, 4, 6]
    assert lengths.lengths(1) == [1]


@pytest.mark.parametrize(
    ("expected", "done", "n_max", "want"),
    [
        (None, 0, 8, 8),  # no earlier solve: the maximum
        (3, 0, 8, 4),  # the smallest length covering the expected attempts
        (4, 0, 8, 4),
        (3, 2, 8, 1),  # the expected rest
        (3, 3, 8, 8),  # past the prediction: the maximum
        (20, 0, 8, 8),
        (5, 0, 6, 6),
        (5, 4, 6, 1),
    ],
)
def test_pick_covers_the_expected_rest(expected, done, n_max, want):
    assert lengths.pick(expected, done, n_max) == want


@pytest.mark.parametrize(
    ("expected", "done", "n_max", "want"),
    [
        (None, 0, 64, 64),  # no prediction: the maximum
        (50, 0, 64, 50),  # 50 fixed steps: one call of 50, no masked step
        (50, 0, 32, 32),  # more than the maximum: calls of 32 and 18
        (50, 32, 32, 18),
        (50, 50, 32, 32),  # past the prediction: the maximum
    ],
)
def test_pick_with_exact_counts_takes_no_masked_step(expected, done, n_max, want):
    assert lengths.pick(expected, done, n_max, exact=True) == want


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g, dtype=F64) - torch.eye(2))
        self.scale = 1.0  # a Python number: changing it invalidates the compiled code

    def forward(self, t, y):
        return self.scale * torch.tanh(y @ self.w)


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=F64)  # no graph
T = torch.linspace(0.0, 1.0, 4, dtype=F64)  # 6 steps at 1e-7


@pytest.fixture
def spy(monkeypatch):
    """At most 4 steps per call; records each call's length."""
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 4)
    calls = []
    pick = lengths.pick

    def spy_pick(*args, **kw):
        calls.append(pick(*args, **kw))
        return calls[-1]

    monkeypatch.setattr(lengths, "pick", spy_pick)
    return calls


def _step(func, compile):
    func.zero_grad()
    sol = neuralode.solve(func, Y0, T, compile=compile, rtol=1e-7, atol=1e-7, dense_output=False)
    sol.ys.square().sum().backward()
    return sol, [p.grad.clone() for p in func.parameters()]


def test_repeated_training_steps_match_eager_and_each_other(spy):
    func = Linear()
    ref, ref_grads = _step(func, False)
    n = ref.stats["n_steps"]
    assert n % 4 in (1, 2)  # the second solve uses a shorter last call than the first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, first_grads = _step(func, True)
        first_calls = list(spy)
        spy.clear()
        second, second_grads = _step(func, True)
    assert not [w for w in caught if "no longer matches" in str(w.message)]
    # Several calls, the later ones from states with a graph: still compiled.
    assert first.stats["compiled"] is True and second.stats["compiled"] is True
    assert first_calls == [4] * (n // 4 + 1)
    rest = n % 4
    assert spy == [4] * (n // 4) + [next(k for k in (1, 2, 4) if k >= rest)]
    for sol, grads in ((first, first_grads), (second, second_grads)):
        assert sol.stats["n_accepted"] == ref.stats["n_accepted"]
        assert sol.stats["n_rejected"] == ref.stats["n_rejected"]
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, ref_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_changed_attribute_is_caught_before_a_new_length_compiles(spy):
    func = Linear()
    t = torch.tensor([0.0, 0.1], dtype=F64)  # a single step
    try:
        with torch.no_grad():
            first = neuralode.solve(func, Y0, t, compile=True, rtol=1e-3, atol=1e-3)
            assert first.stats["compiled"] is True and first.stats["n_steps"] == 1
            assert spy == [4]
            func.scale = 2.0
            with pytest.warns(RuntimeWarning, match="no longer matches.*4 steps"):
                second = neuralode.solve(func, Y0, t, compile=True, rtol=1e-3, atol=1e-3)
            ref = neuralode.solve(func, Y0, t, compile=False, rtol=1e-3, atol=1e-3)
    finally:
        func.scale = 1.0
    assert spy == [4, 1]  # the second solve would have compiled 1 step per call
    assert second.stats["compiled"] is False
    torch.testing.assert_close(second.ys, ref.ys, rtol=1e-14, atol=0.0)
