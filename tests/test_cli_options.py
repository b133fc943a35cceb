"""``--set`` values are validated before anything is written; ``--resume`` takes the run's own
configuration; an identical command on a finished run says so."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from neuralode.cli.main import main  # noqa: E402
from neuralode.cli.tasks import TASKS, get_task  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_option_has_a_rule_that_its_defaults_pass(task):
    cls = get_task(task)
    assert set(cls.option_rules) == set(cls.options)
    for quick in (False, True):
        cls.check_options(cls.resolved_defaults(quick)["options"], cls.datasets[0])


def _csv(tmp: Path) -> Path:
    path = tmp / "series.csv"
    path.write_text(
        textwrap.dedent(
            """\
            id,time,variable,value,death
            a,0,x,1.0,0
            a,1,x,2.0,0
            """
        )
    )
    return path


@pytest.mark.parametrize(
    "task, args, needle",
    [
        ("spiral", ["--set", "hidden=-5"], "--set hidden=-5: must be an integer >= 1."),
        ("latent-ode", ["--set", "latent_dim=0"], "--set latent_dim=0: must be an integer >= 1."),
        ("spiral", ["--set", "steps_per_epoch=0"], "--set steps_per_epoch=0: must be an integer"),
        ("spiral", ["--set", "noise_std=-1"], "--set noise_std=-1.0: must be a number >= 0"),
        ("spiral", ["--set", "window=1"], "must be an integer in [2, 1000]"),
        ("latent-ode", ["--set", "obs_std=0"], "must be 'learned' or a number > 0"),
        ("latent-ode", ["--set", "val_fraction=1.5"], "strictly between 0 and 1"),
        ("ode-rnn", ["--set", "time_scale=-2"], "must be 'max' or a number > 0"),
        ("odenet", ["--set", "field=rnn"], "must be one of 'conv', 'mlp'"),
        (
            "ode-rnn",
            ["--data", "csv", "CSV", "--set", "id_col="],
            "--set id_col=: must be a non-empty string",
        ),  # fmt: skip
        (
            "latent-ode",
            ["--set", "label_col=death"],
            "--set label_col has no effect with --data pbcseq",
        ),  # fmt: skip
        (
            "ode-rnn",
            ["--data", "csv", "CSV", "--set", "label_col=outcome"],
            "missing required column(s) ['outcome']",
        ),  # fmt: skip
    ],
)
def test_bad_set_value_is_one_line_exit_2_nothing_written(capsys, tmp_path, task, args, needle):
    args = [_csv(tmp_path) if a == "CSV" else a for a in args]
    out = tmp_path / "runs" / "x"
    code, stdout, err = run(capsys, "train", task, "--quick", "--out", out, *args, *FAST)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("neuralode: error: "), err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_value_in_a_config_file_is_caught_too(capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"task": "spiral", "data": "spiral", "options": {"hidden": 0}}))
    code, _, err = run(capsys, "train", "--config", cfg, "--out", tmp_path / "x", *FAST)
    assert code == 2 and "--set hidden=0: must be an integer >= 1." in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A finished spiral run made with non-default flags."""
    out = tmp_path_factory.mktemp("resume") / "run"
    args = ["train", "spiral", "--quick", "--out", str(out), "--lr", "0.02", "--seed", "4",
            "--set", "hidden=12", "--gradient", "adjoint", "--epochs", "1", "--no-eval", *FAST]  # fmt: skip
    assert main(args) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_resume_uses_the_runs_own_config(capsys, tmp_path, custom_run):
    out = _copy(custom_run, tmp_path / "run")
    saved = json.loads((out / "config.json").read_text())
    code, _, err = run(capsys, "train", "spiral", "--out", out, "--resume", "--epochs", 2,
                       "--no-eval", *FAST)  # fmt: skip
    assert code == 0, err
    now = json.loads((out / "config.json").read_text())
    assert now == {**saved, "epochs": 2}
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    # Without TASK, and with flags equal to the run's values: accepted.
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 3, "--lr", 0.02,
                       "--gradient", "backsolve", "--set", "hidden=12", "--no-eval", *FAST)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "0.5"], "--lr 0.5 given, 0.02 in the run"),
        (["--set", "hidden=50"], "--set hidden 50 given, 12 in the run"),
        (["--gradient", "direct"], "--gradient 'direct' given, 'adjoint' in the run"),
        (["--config", "CFG"], "with its own config.json; drop --config"),
        (["--quick", "--seed", "0"], "--seed 0 given, 4 in the run"),
        (
            ["--data", "spiral", "--method", "rk4", "--step-size", "0.1"],
            "--method 'rk4' given, 'dopri5' in the run; --step-size 0.1 given, None in the run",
        ),  # fmt: skip
    ],
)
def test_resume_refuses_flags_that_cannot_change(capsys, tmp_path, custom_run, args, needle):
    out = _copy(custom_run, tmp_path / "run")
    args = [str(out / "config.json") if a == "CFG" else a for a in args]
    before = snapshot(out)
    code, _, err = run(capsys, "train", "spiral", "--out", out, "--resume", "--epochs", 2,
                       *args, *FAST)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert needle in err
    if "--config" not in args:
        assert "only --epochs may change when resuming" in err
    assert snapshot(out) == before


def test_resume_names_the_run_and_its_task(capsys, tmp_path, custom_run):
    out = _copy(custom_run, tmp_path / "run")
    code, _, err = run(capsys, "train", "odenet", "--out", out, "--resume", *FAST)
    assert code == 2 and "holds a run of task 'spiral', not 'odenet'" in err
    code, _, err = run(capsys, "train", "spiral", "--resume", *FAST)
    assert code == 2 and "--resume needs --out RUN_DIR (the run to continue)." in err


def test_identical_command_on_a_finished_run_says_so(capsys, tmp_path, custom_run):
    out = _copy(custom_run, tmp_path / "run")
    before = snapshot(out)
    args = ["train", "spiral", "--quick", "--out", out, "--lr", "0.02", "--seed", "4", "--set",
            "hidden=12", "--gradient", "adjoint", "--epochs", "1", "--no-eval", *FAST]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0 and stdout == ""
    assert "already holds this run, finished (1 epochs); nothing to do" in err
    # --no-eval wrote no summary.txt: the message does not point to one.
    assert "It was not evaluated: run 'neuralode evaluate" in err and "summary.txt" not in err
    assert snapshot(out) == before
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 1, *FAST)
    assert code == 0 and "finished (1 epochs)" in err
    assert snapshot(out) == before


def test_cnf_split_fractions_must_leave_training_data(capsys, tmp_path):
    """Each fraction passes its own rule; together they leave nothing to train on."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "cnf", "--quick", "--out", out, "--set",
                       "val_fraction=0.6", "--set", "test_fraction=0.5", *FAST)  # fmt: skip
    assert code == 2 and "val_fraction + test_fraction must be below 1" in err
    assert "got 0.6 + 0.5" in err and not out.exists()
