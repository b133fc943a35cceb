"""Sphinx configuration of the neuralode documentation (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The sources of this checkout first (not an installed copy), and the local extension.
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE / "_ext"))

import neuralode  # noqa: E402

project = "neuralode"
author = "the neuralode developers"
copyright = "the neuralode developers"
release = version = neuralode.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "neuralode_docs",
]

# Only the .rst sources; the PNG images beside them belong to the README.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated"]
templates_path = []

autosummary_generate = False
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types
autodoc_class_signature = "mixed"
autodoc_mock_imports = []
# Methods without a docstring of their own (forward, ...) are left out instead of showing
# torch.nn.Module's.
autodoc_inherit_docstrings = False

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

default_role = "code"  # `x` in a docstring is inline code, as most readers of it expect
# `make docs` builds with -n: every reference must resolve. torch has no inventory here (the
# build runs offline, so no intersphinx), and private modules are not part of the reference.
nitpick_ignore_regex = [
    ("py:.*", r"torch(\..*)?"),
    ("py:mod", r"neuralode\._.*"),
]

html_theme = "furo"
html_title = f"neuralode {release}"
html_static_path = []
