"""The command's default thread count: one intra-op thread unless asked."""

from __future__ import annotations

import pytest
import torch

from neuralode.cli import main as cli_main


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    saved = list(cli_main._TORCH_DEFAULT_THREADS)
    yield
    torch.set_num_threads(before)
    cli_main._TORCH_DEFAULT_THREADS[:] = saved


def _evaluate_nowhere(capsys, tmp_path, *extra):
    code = cli_main.main(["evaluate", str(tmp_path / "nowhere"), *extra])
    assert code == 2 and "run directory not found" in capsys.readouterr().err


def test_default_is_one_thread(capsys, tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cli_main._TORCH_DEFAULT_THREADS[:] = [None]
    torch.set_num_threads(2)  # what torch picks on a 2-core machine
    _evaluate_nowhere(capsys, tmp_path)
    assert torch.get_num_threads() == 1
    _evaluate_nowhere(capsys, tmp_path, "--threads", "auto")  # back to torch's own choice
    assert torch.get_num_threads() == 2
    _evaluate_nowhere(capsys, tmp_path, "--threads", "3")
    assert torch.get_num_threads() == 3


def test_omp_num_threads_is_respected(capsys, tmp_path, monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    _evaluate_nowhere(capsys, tmp_path)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_thread_counts(capsys, value, restore_threads):
    assert cli_main.main(["evaluate", "x", "--threads", value]) == 2
    err = capsys.readouterr().err
    assert f"--threads must be a positive integer or 'auto'; got {value!r}." in err
