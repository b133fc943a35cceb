"""How many steps each compiled call unrolls (see :mod:`neuralode._compiled`).

A compiled chunk always computes all of its ``steps`` (the rows that have finished take masked
steps of length zero), and under autograd its backward pass runs through all of them too. A
training loop repeats the same solve (same vector field, tolerances and shapes) with slowly
changing parameters, so the previous solve's number of step attempts predicts the next one's:
the first call unrolls the smallest length of :func:`lengths` that covers the expected attempts,
instead of always ``STEPS_PER_CALL`` (e.g. 4 steps instead of 8 for a solve of 3 attempts, which
halves the forward and backward work). The lengths are powers of two, so at most
``log2(STEPS_PER_CALL) + 1`` versions are compiled per solve signature, each lazily on first
use. Fixed steps (every step accepted, their number known before the solve) unroll exactly the
steps left, up to a larger maximum: a 50-step sampling loop is two calls, of 32 and 18 steps.
The steps taken, and so the results, do not depend on the lengths: a masked step changes
nothing.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["lengths", "pick", "expected", "remember", "note_run", "stale_sibling"]

_MAX_REMEMBERED = 64
_lock = threading.Lock()
_attempts: dict = {}  # solve signature -> step attempts (of the busiest row) of its last solve
_last_run: dict = {}  # (signature, inputs with a graph) -> (weakref to the entry last run, its C)


def lengths(n_max: int) -> list[int]:
    """The chunk lengths used with at most ``n_max`` steps per call: the powers of two below
    ``n_max``, and ``n_max``."""
    out, n = [], 1
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def pick(expected: int | None, done: int, n_max: int, exact: bool = False) -> int:
    """The length of the next call after ``done`` steps of every row, when the solve is
    expected to take ``expected`` attempts (None: unknown): the smallest length covering the
    expected rest, or ``n_max`` when there is no prediction or it has been passed. With
    ``exact`` (fixed steps: the count is known, and the same at every solve) the rest itself,
    up to ``n_max``: one call, no masked step, and one compiled version per count."""
    left = -1 if expected is None else expected - done
    if left <= 0:
        return n_max
    if exact:
        return min(left, n_max)
    return next(n for n in lengths(n_max) if n >= left or n == n_max)


def expected(key, default=None) -> int | None:
    """The step attempts of the last solve with signature ``key``, or ``default`` (an int,
    None, or a function returning one: called only when there is no last solve)."""
    with _lock:
        n = _attempts.get(key)
    return n if n is not None else default() if callable(default) else default


def _put(table: dict, key, value) -> None:
    with _lock:
        table.pop(key, None)
        table[key] = value  # the most recent last
        while len(table) > _MAX_REMEMBERED:
            table.pop(next(iter(table)))


def remember(key, attempts: int) -> None:
    """Record the step attempts of a solve with signature ``key``."""
    _put(_attempts, key, int(attempts))


def note_run(key, entry, C) -> None:
    """Record that ``entry`` (a ``neuralode._compiled._Entry``) just ran with constants ``C``
    for the solve signature and graph inputs ``key``."""
    _put(_last_run, key, (weakref.ref(entry), C))


def stale_sibling(key, entry, func, s: dict, k: dict) -> int | None:
    """Before ``entry`` (another length for ``key``) is compiled: the steps per call of the
    length that ran last for ``key`` when func no longer passes its guards (func's Python state
    changed since), else None."""
    with _lock:
        last = _last_run.get(key)
    old, C_old = (None, None) if last is None else (last[0](), last[1])
    if old is None or old is entry or not old.compiled:  # (None: dropped from the cache)
        return None
    return None if guards_pass(old.code, dict(f=func, C=C_old, s=s, k=k)) else C_old.steps


def guards_pass(code, scope: dict) -> bool:
    """Whether one of torch.compile's compiled versions of ``code`` accepts the arguments
    ``scope`` (its local variables by name): a func whose Python state has changed since it was
    compiled fails them. Used before compiling another chunk length for a func that already has
    one, so that the change is reported (:class:`~neuralode._compiled.CompiledCodeMismatch`)
    instead of silently compiled into the new length only. True when this torch does not
    expose the check (private API): the new length is then compiled."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(code)
        return any(e.guard_manager.check(scope) for e in entries)
    except (ImportError, AttributeError, TypeError):
        return True
