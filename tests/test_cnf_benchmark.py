"""``benchmarks/cnf.py --tiny`` runs and reports both parts."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cnf.py"


def test_cnf_benchmark_tiny(capsys):
    pytest.importorskip("torchdiffeq")
    spec = importlib.util.spec_from_file_location("bench_cnf", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--tiny"])
    text = capsys.readouterr().out
    assert {r["lib"] for r in out["speed"]} == {
        "neuralode CNF",
        "neuralode odeint",
        "torchdiffeq odeint",
    }
    # The same field, batches and tolerances: the three take (nearly) the same steps.
    for data in ("8gaussians", "digits"):
        nfes = [r["nfe_forward"] for r in out["speed"] if r["data"] == data]
        assert len(nfes) == 3 and max(nfes) - min(nfes) <= 2 and min(nfes) >= 8
    assert [r["run"] for r in out["rnode"]] == ["unregularised", "RNODE"]
    assert all(r["nfe_mean"] > 0 and r["curve"] for r in out["rnode"])
    assert "vs torchdiffeq" in text and "fewer" in text
