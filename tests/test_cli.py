"""The ``neuralode`` command end to end, on tiny settings (``--quick``).

Most runs call :func:`neuralode.cli.main.main` in-process (fast); one test goes through the
installed console script in a subprocess, one starts two processes for data-parallel training.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from neuralode.cli.main import main  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, task, out, *extra):
    code, stdout, err = run(capsys, "train", task, "--quick", "--out", out, *FAST, *extra)
    assert code == 0, err
    return stdout


def state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_params(a, b):
    sa, sb = state(a)["model"], state(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_plot(path: Path, colour: bool = True) -> None:
    """A readable PNG of at least 150 x 100 pixels with a drawing on it: 2-90 % of the pixels
    unlike the background and (``colour``) some coloured ones (data lines/markers; an empty
    set of axes is black on white)."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(path)[..., :3]
    assert rgb.shape[0] >= 100 and rgb.shape[1] >= 150, (path.name, rgb.shape)
    ink = float((np.abs(rgb - rgb[0, 0]).max(-1) > 0.1).mean())
    assert 0.02 < ink < 0.9, (path.name, ink)
    if colour:
        coloured = float(((rgb.max(-1) - rgb.min(-1)) > 0.3).mean())
        assert coloured > 5e-4, (path.name, coloured)


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- help ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [[], ["train"], ["evaluate"], ["plot"]])
def test_help_has_examples(capsys, cmd):
    code, out, _ = run(capsys, *cmd, "--help")
    assert code == 0
    assert "examples:" in out
    if cmd == ["train"]:
        for task in ("latent-ode", "ode-rnn", "odenet", "spiral"):
            assert task in out


# -- spiral: train, resume, evaluate, plot -----------------------------------------------------
def test_spiral_train_resume_evaluate_plot(capsys, tmp_path):
    out = tmp_path / "spiral"
    text = train(capsys, "spiral", out)
    assert "Spiral" in text and "NFE per epoch" in text and "plots" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"] == "spiral" and cfg["quick"] is True and cfg["epochs"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "nfe_forward", "nfe_backward", "time_s"):
        assert all(key in r for r in rows), key
    assert rows[0]["nfe_forward"] > 0 and rows[0]["nfe_backward"] > 0
    for name in ("checkpoint.pt", "best.pt", "results.json", "summary.txt"):
        assert (out / name).is_file(), name
    for name in ("spiral.png", "training_curves.png", "nfe.png"):
        assert_plot(out / "plots" / name)
    ck = state(out / "checkpoint.pt")
    assert {"torch", "numpy", "python"} <= set(ck["rng"]) and ck["epoch"] == 2

    # Resume to 3 epochs: one more row, same first rows.
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", out, "--epochs", 3,
                       "--resume", *FAST)  # fmt: skip
    assert code == 0, err
    rows3 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows3] == [1, 2, 3] and rows3[:2] == rows

    code, text, err = run(capsys, "evaluate", out, "--threads", 1)
    assert code == 0, err
    assert "MSE vs true trajectory" in text
    assert json.loads((out / "results.json").read_text())["checkpoint"] == "best.pt"
    (out / "plots" / "spiral.png").unlink()
    code, text, err = run(capsys, "plot", out, "--checkpoint", "last")
    assert code == 0, err
    assert "spiral.png" in text
    assert_plot(out / "plots" / "spiral.png")


def test_same_config_restarts_and_config_round_trip(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(capsys, "spiral", a, "--seed", 3, "--gradient", "adjoint", "--no-eval")
    # Re-running the identical command on the finished run says so and changes nothing
    # (more in test_cli_options.py).
    before = snapshot(a)
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", a, "--seed", 3,
                       "--gradient", "adjoint", "--no-eval", *FAST)  # fmt: skip
    assert code == 0 and "already holds this run, finished" in err and snapshot(a) == before
    # --config re-runs the saved configuration elsewhere.
    code, _, err = run(capsys, "train", "--config", a / "config.json", "--out", b, "--no-eval",
                       *FAST)  # fmt: skip
    assert code == 0, err
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    assert_same_params(a / "checkpoint.pt", b / "checkpoint.pt")


def test_resume_is_exact(capsys, tmp_path, monkeypatch):
    """Latent ODE (posterior sampling, shuffling): 4 epochs straight == 2 epochs + resume to 4
    == Ctrl-C in the middle of epoch 2 + resume."""
    common = ["--set", "max_subjects=32", "--batch-size", 8]  # 22 training subjects: 3 steps
    straight, split, ctrlc = tmp_path / "straight", tmp_path / "split", tmp_path / "ctrlc"
    train(capsys, "latent-ode", straight, "--epochs", 4, *common)
    train(capsys, "latent-ode", split, "--epochs", 2, "--no-eval", *common)
    assert not (split / "results.json").exists()
    train(capsys, "latent-ode", split, "--epochs", 4, "--resume", "--no-eval", *common)
    assert_same_params(straight / "checkpoint.pt", split / "checkpoint.pt")
    assert_same_params(straight / "best.pt", split / "best.pt")
    opt_a = state(straight / "checkpoint.pt")["optimizer"]["state"]
    opt_b = state(split / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)

    # A real SIGINT during step 5 (epoch 2, batch 2): checkpoint, exit 130, exact resume.
    from neuralode.cli.tasks.latent_ode import LatentODETask

    original = LatentODETask.train_loss
    calls = {"n": 0}

    def interrupted(self, model, indices, epoch, step):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return original(self, model, indices, epoch, step)

    monkeypatch.setattr(LatentODETask, "train_loss", interrupted)
    code, _, err = run(capsys, "train", "latent-ode", "--quick", "--out", ctrlc, "--epochs", 4,
                       *common, *FAST)  # fmt: skip
    assert code == 130
    assert "checkpoint saved" in err and "Traceback" not in err
    ck = state(ctrlc / "checkpoint.pt")
    assert (ck["epoch"], ck["batch"], ck["step"]) == (1, 2, 5)
    monkeypatch.setattr(LatentODETask, "train_loss", original)
    train(capsys, "latent-ode", ctrlc, "--epochs", 4, "--resume", "--no-eval", *common)
    assert_same_params(straight / "checkpoint.pt", ctrlc / "checkpoint.pt")
    rows = [json.loads(x) for x in (ctrlc / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


# -- latent ODE and ODE-RNN on pbcseq ----------------------------------------------------------
def test_latent_ode_quick_train_evaluate_plot(capsys, tmp_path):
    out = tmp_path / "latent"
    text = train(capsys, "latent-ode", out, "--data", "pbcseq")
    for needle in ("interpolation", "extrapolation", "LOCF", "linear", "AUROC", "logistic",
                   "NFE per epoch", "plots"):  # fmt: skip
        assert needle in text, needle
    res = json.loads((out / "results.json").read_text())
    for setting in ("interpolation", "extrapolation"):
        assert {"model", "locf", "linear", "n_points"} <= set(res[setting])
        assert res[setting]["n_points"] > 0
    # --quick does not train the classification head (its AUROC is any number in [0, 1]), but
    # the evaluation around it is checked: the logistic regression on the static covariates
    # predicts death on PBC (0.83 measured; 0.5 is chance, shuffled labels) and linear
    # interpolation beats carrying the last value forward at held-out interior points.
    assert 0 <= res["auroc_model"] <= 1 and res["auroc_logistic_static"] >= 0.7
    assert res["interpolation"]["linear"] < res["interpolation"]["locf"]
    assert_plot(out / "plots" / "test_subjects.png")
    code, text2, err = run(capsys, "evaluate", out)
    assert code == 0, err
    assert "interpolation" in text2
    code, _, err = run(capsys, "plot", out)
    assert code == 0, err


def test_ode_rnn_quick_on_csv(capsys, tmp_path):
    """ODE-RNN through the CSV loader, with a label column (classification head on)."""
    gen = torch.Generator().manual_seed(0)
    lines = ["id,time,variable,value,death"]
    for i in range(40):
        n = 3 + i % 4
        times = torch.cumsum(0.2 + torch.rand(n, generator=gen), 0).tolist()
        level, death = float(torch.randn((), generator=gen)), i % 2
        for t in times:
            lines.append(f"s{i},{t:.3f},a,{level + 0.1 * t:.4f},{death}")
            lines.append(f"s{i},{t:.3f},b,{(-level + death) * t:.4f},{death}")
    path = _csv(tmp_path / "series.csv", "\n".join(lines) + "\n")
    out = tmp_path / "odernn"
    text = train(capsys, "ode-rnn", out, "--data", "csv", path, "--gradient", "checkpoint",
                 "--set", "label_col=death", "--set", "max_subjects=0", "--epochs", 6)  # fmt: skip
    assert "ODE-RNN on csv: 40 subjects" in text and "extrapolation" in text and "AUROC" in text
    assert "time unit not given (--set time_unit=...)" in text and "time in unspecified" not in text
    # The label is written into channel b, so 6 epochs learn it: AUROC 1.0 on the 6 test
    # subjects with the default seed (also after 10 epochs; 0.75-1.0 with seeds 1-3, whose
    # splits differ); chance is 0.5 (the head after --quick's 2 epochs: 0.2).
    assert json.loads((out / "results.json").read_text())["auroc_model"] >= 0.75
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nfe_forward"] > 0 and rows[-1]["nfe_backward"] > 0


# -- odenet ----------------------------------------------------------------------------------
def test_odenet_quick(capsys, tmp_path):
    # One epoch over the whole training split (23 steps) instead of --quick's 192 images.
    text = train(capsys, "odenet", tmp_path / "odenet", "--data", "digits", "--set", "max_train=0")
    assert "test accuracy" in text and "NFE" in text
    res = json.loads((tmp_path / "odenet" / "results.json").read_text())
    # 10 classes: chance (untrained, or --quick's 3 steps) is 0.10; measured 0.31-0.41 over
    # seeds 0-2 (0.41 with the default seed 0).
    assert res["test_accuracy"] >= 0.2 and res["test_nfe_forward"] > 0
    assert_plot(tmp_path / "odenet" / "plots" / "digits.png", colour=False)


# -- bad input: exit 2, one line, no traceback, nothing lost ---------------------------------
def _csv(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


BAD_INPUT_CASES = [
    "missing data directory",
    "csv without required columns",
    "csv with NaN time",
    "csv with negative time",
    "unknown dataset",
    "unknown option",
    "adaptive method with a step size",
]


def bad_inputs(tmp: Path):
    missing_cols = _csv(tmp / "cols.csv", "id,t,variable,value\np1,0,HR,80\n")
    nan_time = _csv(tmp / "nan.csv", "id,time,variable,value\np1,0,HR,80\np1,nan,HR,81\n")
    negative = _csv(tmp / "negative.csv", "id,time,variable,value\np1,0,HR,80\np1,-1,HR,81\n")
    return {
        "missing data directory": (["--data", "physionet", tmp / "no-such-dir"], "not"),
        "csv without required columns": (["--data", "csv", missing_cols], "missing required"),
        "csv with NaN time": (["--data", "csv", nan_time], "NaN"),
        "csv with negative time": (["--data", "csv", negative], "must be >= 0"),
        "unknown dataset": (["--data", "mnist"], "unknown dataset"),
        "unknown option": (["--set", "nope=1"], "unknown option"),
        "adaptive method with a step size": (["--step-size", "0.1"], "no effect"),
    }


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, case):
    (tmp_path / "runs").mkdir()
    cases = bad_inputs(tmp_path)
    assert sorted(cases) == sorted(BAD_INPUT_CASES)
    args, needle = cases[case]
    out = tmp_path / "runs" / "x"
    code, stdout, err = run(capsys, "train", "latent-ode", "--quick", "--out", out, *args, *FAST)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuralode: error: "), err
    assert needle in lines[0] and "Traceback" not in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train"], "needs a TASK"),
        (["train", "nope"], "unknown task"),
        (["train", "spiral", "--method", "rk4"], "needs --step-size"),
        (
            ["train", "spiral", "--method", "rk4", "--step-size", "0.1", "--rtol", "1e-3"],
            "no effect",
        ),  # fmt: skip
        (["train", "spiral", "--method", "nope"], "unknown --method"),
        (["train", "spiral", "--gradient", "magic"], "--gradient must be one of"),
        (["train", "spiral", "--epochs", "0"], "--epochs must be an integer >= 1"),
        (["train", "spiral", "--set", "hidden"], "KEY=VALUE"),
        (["train", "spiral", "--set", "hidden=wide"], "expected a value like"),
        (["train", "spiral", "--data", "csv"], "cannot use --data csv"),
        (["train", "latent-ode", "--data", "csv"], "needs one PATH"),
        (["train", "latent-ode", "--data", "pbcseq", "extra"], "takes no path"),
        (["train", "spiral", "--config", "missing.json"], "--config file not found"),
        (["train", "spiral", "--threads", "0"], "--threads must be a positive integer"),
        (["train", "spiral", "--epochs", "many"], "invalid int value"),
        (["evaluate"], "required: RUN_DIR"),
    ],
)
def test_argument_errors(capsys, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("neuralode: error: "), err
    assert needle in err
    assert not any(tmp_path.iterdir())


def test_config_file_errors(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "train", "--config", bad, "--out", tmp_path / "x")
    assert code == 2 and "not a valid JSON file" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"task": "odenet", "data": "digits", "colour": "red"}))
    code, _, err = run(capsys, "train", "--config", other, "--out", tmp_path / "x")
    assert code == 2 and "unknown setting(s) ['colour']" in err
    other.write_text(json.dumps({"task": "odenet", "data": "digits"}))
    code, _, err = run(capsys, "train", "spiral", "--config", other, "--out", tmp_path / "x")
    assert code == 2 and "differs from the task 'odenet'" in err


def test_failed_solve_is_one_line_exit_1(capsys, tmp_path, monkeypatch):
    import neuralode
    from neuralode.cli.tasks.spiral import SpiralTask

    def fail(self, model, indices, epoch, step):
        raise neuralode.StepSizeUnderflowError("step size underflow at t=0.3.", t=0.3, step=9,
                                               h=1e-16)  # fmt: skip

    monkeypatch.setattr(SpiralTask, "train_loss", fail)
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", tmp_path / "r", *FAST)
    assert code == 1
    assert err.count("\n") == 1 and "training failed in epoch 1" in err, err
    assert (tmp_path / "r" / "config.json").is_file()


def test_existing_run_is_never_clobbered(capsys, tmp_path):
    out = tmp_path / "run"
    train(capsys, "spiral", out, "--no-eval")
    before = snapshot(out)
    for args, needle in [
        (["spiral", "--quick", "--out", out, "--lr", "0.5"], "holds a different run"),
        (["spiral", "--quick", "--out", out, "--lr", "0.5", "--resume"], "different config"),
        (["odenet", "--quick", "--out", out], "holds a different run"),
    ]:
        code, _, err = run(capsys, "train", *args, *FAST)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert snapshot(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", other, *FAST)
    assert code == 2 and "holds no neuralode run" in err
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", tmp_path / "new",
                       "--resume", *FAST)  # fmt: skip
    assert code == 2 and "nothing to resume" in err
    code, _, err = run(capsys, "evaluate", tmp_path / "nowhere")
    assert code == 2 and "not found" in err
    assert (other / "notes.txt").read_text() == "mine"


def test_console_script_exit_codes(tmp_path):
    exe = Path(sys.executable).with_name("neuralode")
    assert exe.exists(), "the console script is installed with the package (pip install -e .)"
    r = subprocess.run(
        [exe, "train", "spiral", "--data", "mnist", "--out", tmp_path / "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("neuralode: error: unknown dataset 'mnist'")


# -- two processes (DDP, gloo) == one process on the same global batch -----------------------
DDP_WORKER = """
import os, sys
import torch.multiprocessing as mp

def worker(rank, ports, jobs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    from neuralode.cli.main import main
    for port, args in zip(ports, jobs):
        os.environ["MASTER_PORT"] = str(port)
        code = main(args)
        if code != 0:
            sys.exit(code)

if __name__ == "__main__":
    import json
    ports, jobs = json.loads(sys.argv[1])
    mp.spawn(worker, args=(ports, jobs), nprocs=2)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(capsys, tmp_path):
    # Fixed-step rk4 so that both processes and the single one take identical steps; SGD so
    # that the parameters after the step are proportional to the averaged gradient.
    cfg = {
        "task": "spiral",
        "data": "spiral",
        "epochs": 1,
        "batch_size": 8,
        "lr": 0.05,
        "optimizer": "sgd",
        "method": "rk4",
        "rtol": None,
        "atol": None,
        "step_size": 0.05,
        "dtype": "float64",
        "quick": True,
        "options": {"steps_per_epoch": 1, "hidden": 8, "window": 6},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    jobs = []
    for g in ("direct", "adjoint"):
        args = ["train", "--config", str(path), "--gradient", g, "--no-eval", *FAST]
        code, _, err = run(capsys, *args, "--out", tmp_path / f"one-{g}")
        assert code == 0, err
        jobs.append([*args, "--out", str(tmp_path / f"two-{g}")])
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, script, json.dumps([[_free_port(), _free_port()], jobs])],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for g in ("direct", "adjoint"):
        one = state(tmp_path / f"one-{g}" / "checkpoint.pt")["model"]
        two = state(tmp_path / f"two-{g}" / "checkpoint.pt")["model"]
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-10, atol=1e-12, msg=k)
