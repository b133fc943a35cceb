"""The README's quickstart runs exactly as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_quickstart():
    assert _python_blocks(), "README.md lost its python quickstart"


def test_readme_quickstart_runs(capsys):
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "torch.Size([5, 16, 2])" in out
    assert "torch.Size([2, 16, 2])" in out
    assert "torch.Size([7, 16, 2])" in out
