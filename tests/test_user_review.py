"""Fixes from a new-user review of the README (event-time shape, ``python -m neuralode``, ...)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuralode

ROOT = Path(__file__).resolve().parents[1]


def _fall(t, y):
    return -torch.ones_like(y)


@pytest.mark.parametrize(
    "y0, event_fn, shape",
    [
        # torchdiffeq 0.2.5 gives a 0-d event_t for a one-element (1,) event output (its
        # bouncing_ball.py does this) as well as for a 0-d one.
        (torch.tensor([1.0]), lambda t, y: y - 0.5, ()),
        (torch.tensor([1.0]), lambda t, y: (y - 0.5).sum(), ()),
        (torch.tensor(1.0), lambda t, y: y - 0.5, ()),
        # (B,) with B > 1 keeps neuralode's one event per sample.
        (torch.tensor([[1.0], [2.0]]), lambda t, y: y[:, 0] - 0.5, (2,)),
    ],
)
def test_odeint_event_time_shape_matches_torchdiffeq(y0, event_fn, shape):
    event_t, sol = neuralode.odeint_event(_fall, y0, torch.tensor(0.0), event_fn=event_fn)
    assert tuple(event_t.shape) == shape
    assert sol.shape == (2, *y0.shape)
    expected = torch.tensor([0.5, 1.5])[: max(1, event_t.numel())].reshape(shape)
    torch.testing.assert_close(event_t, expected, rtol=1e-5, atol=1e-6)


def test_odeint_event_zero_d_time_is_differentiable():
    y0 = torch.tensor([1.0], requires_grad=True)
    event_t, _ = neuralode.odeint_event(_fall, y0, torch.tensor(0.0), event_fn=lambda t, y: y - 0.5)
    assert event_t.shape == ()
    event_t.backward()
    # y(t) = y0 - t hits 0.5 at t = y0 - 0.5: d event_t / d y0 = 1.
    torch.testing.assert_close(y0.grad, torch.tensor([1.0]), rtol=1e-4, atol=1e-5)


def test_odeint_event_stacks_like_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = torch.tensor([1.0])
    ours = [
        neuralode.odeint_event(_fall, y0, torch.tensor(0.0), event_fn=lambda t, y, c=c: y - c)[0]
        for c in (0.5, 0.25)
    ]
    theirs = [
        torchdiffeq.odeint_event(_fall, y0, torch.tensor(0.0), event_fn=lambda t, y, c=c: y - c)[0]
        for c in (0.5, 0.25)
    ]
    assert torch.stack(ours).shape == torch.stack(theirs).shape == (2,)
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=1e-4, atol=1e-5)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPLBACKEND": "Agg"}


def test_python_m_neuralode_runs_the_cli():
    r = subprocess.run(
        [sys.executable, "-m", "neuralode", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "usage: neuralode" in r.stdout
    assert "train" in r.stdout


def _readme_section(title):
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    return text[start : text.index("\n## ", start)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_refused_and_documented(dtype):
    with pytest.raises(TypeError, match="half precision"):
        neuralode.odeint(lambda t, y: -y, torch.ones(2, dtype=dtype), torch.linspace(0, 1, 3))
    differs = _readme_section("What differs, on purpose")
    assert "Half-precision states" in differs and "TypeError" in differs


def test_per_sample_time_shape_idiom_is_documented_and_correct():
    row = next(
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if "Step-size control" in line
    )
    assert "t[:, None]" in row and "`(A,)`" in row
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    sol = neuralode.solve(
        lambda t, y: -y * (1 + t[:, None]), y0, t, batch_control="per_sample", rtol=1e-9, atol=1e-11
    )
    sol.ys[-1].sum().backward()
    # y(t1) = y0 exp(-(t1 + t1^2/2) + (t0 + t0^2/2)): d/dt1 = -(1 + t1) y(t1), d/dt0 = (1 + t0) y(t1).
    y1 = 3.0 * torch.exp(torch.tensor(-1.5, dtype=torch.float64))
    expected = torch.stack([y1, torch.zeros((), dtype=torch.float64), -2.0 * y1])
    torch.testing.assert_close(t.grad, expected, rtol=1e-6, atol=1e-8)


def _labelled_csv(path, label):
    rows = [f"s{i},{t},{v},{(i % 3) + t * 0.1 + (v == 'b'):.2f},{label(i)}"
            for i in range(20) for t in range(4) for v in "ab"]  # fmt: skip
    path.write_text("id,time,variable,value,outcome\n" + "\n".join(rows) + "\n")


def test_csv_auroc_says_why_it_is_undefined_and_has_no_empty_baseline_row(capsys, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from neuralode.cli.main import build_parser, main, resolve_config
    from neuralode.cli.train import build

    path = tmp_path / "series.csv"
    _labelled_csv(path, lambda i: i % 2)
    common = ["ode-rnn", "--quick", "--data", "csv", str(path), "--set", "label_col=outcome"]
    task = build(resolve_config(build_parser().parse_args(["train", *common])))[0]
    test_ids = {int(r.id[1:]) if isinstance(r.id, str) else None for r in task.parts["test"]}
    assert test_ids and None not in test_ids
    # The split is by subject and does not depend on the labels: make the test subjects one class.
    _labelled_csv(path, lambda i: 0 if i in test_ids else i % 2)
    out = tmp_path / "run"
    code = main(["train", *common, "--out", str(out), "--no-progress", "--threads", "1"])
    text = capsys.readouterr().out
    assert code == 0
    head = next(line for line in text.splitlines() if "classification head" in line)
    assert head.rstrip().endswith("undefined: test split has one class")
    assert "baseline covariates" not in text


def test_bouncing_ball_example_default_output_does_not_create_dirs_in_the_cwd(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("bb", ROOT / "examples" / "bouncing_ball.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.default_out() == ROOT / "docs" / "bouncing_ball.png"
    # A copy outside a checkout, run from another directory: the plot lands in the cwd, and
    # no docs/ appears there (it used to create ./docs wherever it ran).
    copy = tmp_path / "examples" / "bouncing_ball.py"
    copy.parent.mkdir()
    shutil.copy(ROOT / "examples" / "bouncing_ball.py", copy)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(
        [sys.executable, str(copy), "--t-end", "1.0"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["bouncing_ball.png"]
    assert not (tmp_path / "docs").exists()
    assert r.stdout.strip().splitlines()[-1] == "saved bouncing_ball.png"


def test_readme_robertson_figures_state_their_settings_and_hold():
    import re

    text = (ROOT / "README.md").read_text()
    m = re.search(
        r"Robertson's kinetics to t = 1e5 \(float64, outputs at t = 1, 1e2, 1e4, 1e5, "
        r"rtol = 1e-6, atol = \(1e-8, 1e-12, 1e-8\)\) `kvaerno5` uses ([\d,]+) evaluations and "
        r"(\d+) Jacobians",
        text,
    )
    assert m, "README's Robertson figures must state the tolerances and outputs"
    nfe, n_jac = int(m.group(1).replace(",", "")), int(m.group(2))

    def robertson(t, y):
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        r1, r2, r3 = 0.04 * y1, 1e4 * y2 * y3, 3e7 * y2**2
        return torch.stack([-r1 + r2, r1 - r2 - r3, r3], -1)

    f64 = torch.float64
    sol = neuralode.solve(
        robertson,
        torch.tensor([1.0, 0.0, 0.0], dtype=f64),
        torch.tensor([0.0, 1.0, 1e2, 1e4, 1e5], dtype=f64),
        solver="kvaerno5",
        rtol=1e-6,
        atol=torch.tensor([1e-8, 1e-12, 1e-8], dtype=f64),
    )
    # Step counts may move by a few steps with rounding on another CPU: 10% bounds.
    assert abs(sol.stats["nfe"] - nfe) <= 0.1 * nfe, sol.stats
    assert abs(sol.stats["n_jac"] - n_jac) <= 0.1 * n_jac + 1, sol.stats


def test_readme_cnf_linear_flow_claim_holds_at_its_stated_tolerance():
    import math

    from neuralode.models import CNF

    text = " ".join((ROOT / "README.md").read_text().split())
    assert "`log N(e^{-A} x) - tr A` to about 1e-10 at `rtol = atol = 1e-10`" in text
    A = torch.tensor([[0.2, -0.7, 0.1], [0.5, -0.3, 0.4], [0.0, 0.6, 0.1]], dtype=torch.float64)
    field = torch.nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        field.weight.copy_(A)
    field.dim = 3
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z0 = x @ torch.linalg.matrix_exp(-A).T
    want = -0.5 * (z0.square().sum(1) + 3 * math.log(2 * math.pi)) - torch.trace(A)
    flow = CNF(lambda t, z: field(z), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        err = (flow.log_prob(x) - want).abs().max()
    assert err < 1e-9, float(err)


def test_readme_gives_long_compile_times_and_the_suite_duration():
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| **Compiled stepping**"))
    assert "larger graphs can take minutes" in row and "225 s" in row
    test_lines = [line for line in text.splitlines() if line.startswith("make test")]
    assert len(test_lines) == 2 and all("~5-15 min on 2 cores" in line for line in test_lines)


def test_per_sample_t_broadcast_mistake_gets_a_note_naming_the_idiom():
    # `-y * (1 + t)` runs at batch 1 until t requires grad (all outputs' rows in one call);
    # then it failed with only torch's raw broadcasting message.
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError) as info:
        neuralode.solve(lambda t, y: -y * (1 + t), y0, t, batch_control="per_sample")
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "t[:, None]" in notes and "shape (3,)" in notes
