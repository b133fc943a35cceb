"""Checkpoints: opening a run never executes code from it; damaged files give a clear message."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

from neuralode.cli.checkpoint import load_checkpoint, rng_states, set_rng_states  # noqa: E402
from neuralode.cli.errors import CLIError  # noqa: E402
from neuralode.cli.main import main  # noqa: E402

FAST = ["--no-progress", "--threads", "1"]


class _WritesMarker:
    """Unpickling this object writes a file: stands for any code a malicious pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def spiral_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "spiral"
    assert main(["train", "spiral", "--quick", "--out", str(out), "--no-eval", *FAST]) == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_checkpoints_hold_only_tensors_and_plain_data(spiral_run):
    for name in ("checkpoint.pt", "best.pt"):
        ck = torch.load(spiral_run / name, map_location="cpu", weights_only=True)
        assert ck["format"] == 2 and ck["epoch"] >= 1
    ck = load_checkpoint(spiral_run / "checkpoint.pt")
    assert set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert ck["rng"]["numpy"]["state"].dtype == torch.int64


def test_rng_states_round_trip_through_a_safe_file(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)
    path = tmp_path / "rng.pt"
    torch.save({"model": {}, "rng": rng_states(gen)}, path)
    expected = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1),
                torch.rand(2, generator=gen))  # fmt: skip
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_states(load_checkpoint(path)["rng"], gen)
    got = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1),
           torch.rand(2, generator=gen))  # fmt: skip
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_a_checkpoint_that_would_run_code_is_refused(capsys, tmp_path, spiral_run):
    run = _copy_run(spiral_run, tmp_path / "shared")
    marker = tmp_path / "marker.txt"
    ck = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    ck["note"] = _WritesMarker(marker)
    torch.save(ck, run / "best.pt")

    code, out, err = _run(capsys, "evaluate", run, "--threads", 1)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("neuralode: error: refusing to load"), err
    assert str(run / "best.pt") in err and "could execute code" in err
    assert not marker.exists()
    code, _, err = _run(capsys, "plot", run)
    assert code == 2 and "refusing to load" in err and not marker.exists()
    with pytest.raises(CLIError, match="refusing to load"):
        load_checkpoint(run / "best.pt")
    assert not marker.exists()

    # Control: the file really runs code when unpickled without the guard.
    torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("size", ["truncated", "empty"])
def test_damaged_best_checkpoint_names_the_file_and_the_way_out(capsys, tmp_path, spiral_run,
                                                                size):  # fmt: skip
    run = _copy_run(spiral_run, tmp_path / "run")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2] if size == "truncated" else b"")
    code, _, err = _run(capsys, "evaluate", run, "--threads", 1)
    assert code == 2 and err.count("\n") == 1, err
    assert f"checkpoint {run / 'best.pt'} is damaged" in err and "--checkpoint last" in err
    assert "PytorchStreamReader" not in err and "Traceback" not in err
    code, text, err = _run(capsys, "evaluate", run, "--checkpoint", "last", "--threads", 1)
    assert code == 0, err
    assert "checkpoint.pt" in text


def test_damaged_resume_checkpoint_says_start_again(capsys, tmp_path, spiral_run):
    run = _copy_run(spiral_run, tmp_path / "run")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) - 200])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, _, err = _run(capsys, "train", "spiral", "--quick", "--out", run, "--epochs", 3,
                        "--resume", *FAST)  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert f"checkpoint {run / 'checkpoint.pt'} is damaged" in err
    assert "start the run again" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_foreign_and_old_files_are_named(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CLIError, match="is not a neuralode checkpoint \\(no model state\\)"):
        load_checkpoint(path)
    # Format 1 kept numpy's RNG state as numpy objects: refused, with what to do.
    old = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(CLIError, match="it would import numpy.*earlier version of neuralode"):
        load_checkpoint(old)


def test_identical_command_restarts_a_run_whose_checkpoint_is_damaged(capsys, tmp_path,
                                                                      spiral_run):  # fmt: skip
    run = _copy_run(spiral_run, tmp_path / "run")
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, err = _run(capsys, "train", "spiral", "--quick", "--out", run, "--no-eval", *FAST)
    assert code == 0 and "starting it over" in err, err
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
