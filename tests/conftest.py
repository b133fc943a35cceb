"""Settings shared by every test process, and how pytest-xdist shares the work out.

One intra-op thread per process: ``make test`` runs two pytest-xdist workers on two cores, and
torch's default (one thread per core in each worker) oversubscribes them, which on a loaded
machine slows the suite several times over. It also makes every result independent of the
machine's core count (reductions and matrix products split their work by thread count).
Tests that need another thread count set it themselves.
"""

import pytest
import torch

torch.set_num_threads(1)

# Test files whose tests share work inside one process, so one worker runs each of them whole:
# test_compiled.py (compiled code is reused across tests with the same field, settings and
# shapes; the first compilation also loads Inductor), and the files with module-scoped fixtures
# (the benchmark pipeline, the pbcseq data, a stiff reference solution). Every other test is
# its own unit of work. (pytest-xdist's own ``xdist_group`` mark does not group under pytest 9:
# xdist 3.8 renames the items' ``_nodeid``, which pytest 9 no longer reads.)
WHOLE_FILES = (
    "tests/test_compiled.py",
    "tests/test_compiled_rows.py",
    "tests/test_compiled_drift.py",
    "tests/test_benchmarks.py",
    "tests/test_data.py",
    "tests/test_stiff_problems.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """For ``-n N`` with ``--dist load`` (the default) or ``loadgroup``: the files above as one
    unit each, sent first (xdist orders units by size: the longest work starts first and the
    single tests fill in around it), every other test alone."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeFilesScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in WHOLE_FILES else nodeid

    return WholeFilesScheduling(config, log)
