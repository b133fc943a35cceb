"""Defects found by trying the command line and ``load_run`` as a new user would (review of the
CLI work of issue 15); one test per defect, each failing before its fix."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from neuralode.cli.main import main  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cnf_task_trains_and_its_options_are_validated(capsys, tmp_path):
    # The cnf task had no option rules: every 'neuralode train cnf' ended in "unknown option
    # 'hidden'", even without --set.
    pytest.importorskip("sklearn")
    out = tmp_path / "cnf"
    code, _, err = run(capsys, "train", "cnf", "--quick", "--data", "8gaussians", "--epochs", 1,
                       "--set", "n_toy=100", "--no-eval", "--out", out, *FAST)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    bad = tmp_path / "bad"
    code, _, err = run(capsys, "train", "cnf", "--quick", "--data", "8gaussians", "--set",
                       "n_layers=0", "--out", bad, *FAST)  # fmt: skip
    assert code == 2 and "--set n_layers=0: must be an integer >= 1" in err
    assert not bad.exists()
