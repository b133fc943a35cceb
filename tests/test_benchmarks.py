"""``benchmarks/run_all.py --tiny``: the whole benchmark pipeline runs and reports every target of
issue #6 (a smoke test of the code path: the tiny numbers are not measurements, only their
presence and sanity are checked)."""

from __future__ import annotations

import contextlib
import io
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
# Imported at collection: the scripts bind ``out=sys.stdout`` defaults at import time.
import run_all  # noqa: E402

# The targets of issue #6 that need a measured number: key -> workloads that must be present.
REQUIRED = {
    "forward_torchdiffeq": ("mlp_d2, float64", "mlp_d64, float64", "mlp_d2, float32", "mlp_d64, float32"),
    "forward_torchode": ("mlp_d2, float64", "mlp_d64, float64", "mlp_d2, float32", "mlp_d64, float32"),
    "overhead": ("mlp_d2, float64", "mlp_d64, float64", "mlp_d2, float32", "mlp_d64, float32"),
    "backsolve": ("mlp_d2",),
    "direct": ("mlp_d2",),
    "lorenz": ("dopri5 vs scipy RK45", "dopri8 vs scipy DOP853"),
    "arenstorf": ("dopri5 vs scipy RK45", "dopri8 vs scipy DOP853"),
    "per_sample": ("d=2",),
}  # fmt: skip


# One process runs this file's tests under pytest-xdist (tests/conftest.py): the pipeline once.
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("bench") / "latest.md"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rows = run_all.main(["--tiny", "--out", str(out_file)])
    return rows, buffer.getvalue(), out_file.read_text()


def test_peers_installed():
    """The test extra installs every peer: no target may fall back to n/a in CI."""
    assert run_all.wp.torchdiffeq is not None, "torchdiffeq missing: pip install -e '.[test]'"
    assert run_all.wp.torchode is not None, "torchode missing: pip install -e '.[test]'"


def test_every_target_reported(tiny):
    rows, _, _ = tiny
    for key, workloads in REQUIRED.items():
        found = [r for r in rows if r["key"] == key]
        assert found, f"target {key} missing"
        for workload in workloads:
            assert any(workload in r["workload"] for r in found), (key, workload)
    assert {r["key"] for r in rows} >= set(run_all.TARGETS)
    for r in rows:
        assert set(r) >= {"target", "workload", "measured", "goal", "met"}
        assert r["met"] in {"yes", "no", "n/a"}


def test_measured_values_are_sane(tiny):
    rows, _, _ = tiny
    for r in rows:
        if r["key"] not in REQUIRED:
            continue  # torch.compile: skipped in --tiny
        v = r["measured"]
        assert v is not None and math.isfinite(v), r
        if r["key"] == "per_sample":
            assert 0.0 <= v <= 1.0, r  # a share of the evaluations: may be exactly 0
        else:
            assert v > 0, r
        assert r["met"] in {"yes", "no"}, r


def test_header_and_table(tiny):
    rows, printed, written = tiny
    cpu = run_all.cpu_model()
    for text in (printed, written):
        assert "Targets of issue #6" in text
        assert cpu in text and "logical cores" in text and "load average" in text
        assert "torchdiffeq 0.2.5" in text and "torchode 1.0.1" in text
        assert "not measurements" in text  # --tiny says its numbers mean nothing
        assert "| target | workload | measured | target value | met? |" in text
        assert "Total runtime" in text
    # the sub-reports were printed before the table
    assert printed.index("## gradients") < printed.index("## Targets of issue #6")
    table = [line for line in written.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1  # header row + one line per target row
