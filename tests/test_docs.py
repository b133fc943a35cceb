"""The documentation sources keep up with the code.

- Every public name (``__all__`` of ``neuralode``, of each public subpackage and of each public
  top-level module) is documented by an ``.. auto*::`` directive in ``docs/*.rst``, under that
  name or another one for the same object (re-exports are documented once).
- Every ``--set`` option of every ``neuralode train`` task is described in
  :data:`neuralode.cli.option_help.OPTION_HELP`, and nothing else is.
- Every example script has the module docstring the examples page is generated from.

The Sphinx build itself (``make docs``, warnings as errors) runs in CI.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import neuralode

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^\.\. auto(?:function|class|exception|data|attribute|method)::\s+(\S+)")


def _import(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def documented_names() -> list[str]:
    names = []
    for rst in sorted(DOCS.glob("*.rst")):
        for line in rst.read_text().splitlines():
            m = DIRECTIVE.match(line)
            if m:
                names.append(m.group(1))
    return names


def public_modules() -> list[str]:
    """``neuralode``, its public subpackages at any depth and its public top-level modules."""
    out = ["neuralode"]
    for info in pkgutil.walk_packages(neuralode.__path__, "neuralode."):
        parts = info.name.split(".")[1:]
        if any(p.startswith("_") for p in parts):
            continue
        if info.ispkg or len(parts) == 1:
            out.append(info.name)
    return out


def test_public_modules_are_found():
    mods = public_modules()
    for expected in ("neuralode.solvers.implicit", "neuralode.models", "neuralode.events"):
        assert expected in mods
    assert "neuralode.solvers.dopri5" not in mods  # implementation modules are not API


def test_every_documented_name_imports():
    names = documented_names()
    assert len(names) > 50
    for name in names:
        try:
            _import(name)
        except (ImportError, AttributeError) as exc:
            pytest.fail(f"docs name {name!r} does not import ({exc}); use the full dotted path")


@pytest.mark.parametrize("module", public_modules())
def test_every_public_name_is_in_the_api_reference(module):
    mod = importlib.import_module(module)
    public = [n for n in getattr(mod, "__all__", ()) if n != "__version__"]
    documented = {id(_import(name)) for name in documented_names()}
    missing = [n for n in public if id(getattr(mod, n)) not in documented]
    assert not missing, (
        f"{module}: public names {missing} are not documented; add an '.. autoclass::' / "
        "'.. autofunction::' / '.. autodata::' entry for them to the topic page in docs/"
    )


def _tasks():
    from neuralode.cli.tasks import TASKS, get_task

    return {name: get_task(name) for name in TASKS}


def test_every_set_option_is_described():
    from neuralode.cli.option_help import option_help

    n = 0
    for name, cls in _tasks().items():
        for key in cls.options:
            unit, text = option_help(name, key)
            assert unit.strip() and len(text) > 20, (name, key)
            n += 1
    assert n >= 40  # four tasks, about 55 options in all


def test_option_help_has_no_stale_entries():
    from neuralode.cli.option_help import OPTION_HELP

    tasks = _tasks()
    every = {k for cls in tasks.values() for k in cls.options}
    for key in OPTION_HELP:
        task, dot, opt = key.rpartition(".")
        if dot:
            assert task in tasks, f"OPTION_HELP[{key!r}]: no task {task!r}"
            assert opt in tasks[task].options, f"OPTION_HELP[{key!r}]: {task} has no {opt!r}"
        else:
            assert key in every, f"OPTION_HELP[{key!r}]: no task has this option"


def test_undescribed_option_names_the_fix():
    from neuralode.cli.option_help import option_help

    assert option_help("spiral", "hidden") != option_help("ode-rnn", "hidden")  # task override
    with pytest.raises(KeyError, match=r"'no_such'.*'spiral'.*OPTION_HELP"):
        option_help("spiral", "no_such")


def test_every_example_has_a_docstring():
    scripts = sorted((ROOT / "examples").glob("*.py"))
    assert scripts
    for path in scripts:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 40, f"{path.name}: the examples page needs a module docstring"
