"""The README's quickstart runs exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # "Use a trained model" needs a run directory: tests/test_cli_load_run.py runs it.
    return [b for b in blocks if "load_run(" not in b]


def test_readme_has_quickstart():
    assert _python_blocks(), "README.md lost its python quickstart"


def test_readme_quickstart_runs(capsys):
    """Every python block, in order, in one namespace (as a reader pasting them would)."""
    namespace = {"__name__": "__readme__"}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([5, 16, 2])" in out
    assert "torch.Size([2, 16, 2])" in out
    assert "torch.Size([7, 16, 2])" in out
    assert "tensor([0.4515, 0.9030]" in out
