"""Validation of the task options (``--set KEY=VALUE``), before anything is written.

Each task lists a rule per option (:attr:`Task.option_rules`): what values are allowed and a
description for the error message. :func:`check_options` runs them all on the resolved options,
so that ``--set hidden=-5`` or ``--set steps_per_epoch=0`` ends in one line
``neuralode: error: --set hidden=-5: must be an integer >= 1.`` with exit status 2 and no run
directory, instead of a traceback during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CLIError

__all__ = ["Rule", "check_options", "integer", "number", "fraction", "choice", "text", "either"]


@dataclass(frozen=True)
class Rule:
    """``ok(value) -> bool`` and the description of the allowed values (``"an integer >= 1"``)."""

    ok: Callable[[object], bool]
    description: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int, maximum: int | None = None) -> Rule:
    """An integer in ``[minimum, maximum]``."""
    desc = (
        f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    )
    return Rule(lambda v: _is_int(v) and v >= minimum and (maximum is None or v <= maximum), desc)


def number(minimum: float = 0.0, *, strict: bool = True, maximum: float | None = None) -> Rule:
    """A finite number ``> minimum`` (``>=`` when not ``strict``), ``<= maximum`` if given."""
    op = ">" if strict else ">="
    desc = f"a number {op} {minimum:g}" + ("" if maximum is None else f" and <= {maximum:g}")
    return Rule(
        lambda v: (
            _is_num(v)
            and (v > minimum if strict else v >= minimum)
            and (maximum is None or v <= maximum)
        ),
        desc,
    )


def fraction() -> Rule:
    """A number strictly between 0 and 1."""
    return Rule(lambda v: _is_num(v) and 0 < v < 1, "a number strictly between 0 and 1")


def choice(*values) -> Rule:
    """One of ``values``."""
    desc = repr(values[0]) if len(values) == 1 else "one of " + ", ".join(map(repr, values))
    return Rule(lambda v: any(v == x and type(v) is type(x) for x in values), desc)


def text(optional: bool = False) -> Rule:
    """A non-empty string (or ``null`` when ``optional``)."""
    desc = "a non-empty string" + (" or null" if optional else "")
    return Rule(
        lambda v: (optional and v is None) or (isinstance(v, str) and v.strip() != ""), desc
    )


def either(*rules: Rule) -> Rule:
    """Any of ``rules``."""
    return Rule(lambda v: any(r.ok(v) for r in rules), " or ".join(r.description for r in rules))


def check_options(options: dict, rules: dict[str, Rule], task: str) -> None:
    """Raise :class:`CLIError` for the first option that breaks its rule.

    Raises
    ------
    CLIError
        ``--set KEY=VALUE: must be DESCRIPTION.``, naming the task's option and the value.
    """
    for key, value in options.items():
        rule = rules.get(key)
        if rule is None:  # every option has a rule (tested); an unknown key is a parse error
            raise CLIError(f"--set: unknown option {key!r} for task {task!r}.")
        if not rule.ok(value):
            shown = "null" if value is None else value
            raise CLIError(f"--set {key}={shown}: must be {rule.description}.")
