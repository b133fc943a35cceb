"""Solvers: Butcher tableaux as validated data, run by one generic explicit RK engine.

=================  ================  ======  ====  =========================  =========================================
name               order (embedded)  stages  FSAL  dense output               source
=================  ================  ======  ====  =========================  =========================================
``euler``          1                 1       no    cubic Hermite              Euler 1768
``midpoint``       2                 2       no    cubic Hermite              Runge 1895
``heun2``          2                 2       no    cubic Hermite              Heun 1900
``heun3``          3                 3       no    cubic Hermite              Heun 1900
``rk4``            4                 4       no    cubic Hermite              Kutta 1901
``rk38``           4                 4       no    cubic Hermite              Kutta 1901 (3/8 rule)
``adaptive_heun``  2 (1)             2       no    cubic Hermite              Heun--Euler
``fehlberg2``      2 (1)             3       no    cubic Hermite              Fehlberg 1969
``bosh3``          3 (2)             4       yes   cubic Hermite              Bogacki & Shampine 1989
``dopri5``         5 (4)             7       yes   4th order (Shampine 1986)  Dormand & Prince 1980
``tsit5``          5 (4)             7       yes   4th order (Tsitouras)      Tsitouras 2011
``dopri8``         8 (5)             12      no    7th order (DOP853)         Prince & Dormand 1981; Hairer et al. 1993
=================  ================  ======  ====  =========================  =========================================

Methods without an embedded error estimate need a fixed-step controller
(:class:`~neuralode.ConstantStep` or :class:`~neuralode.StepToGrid`).

Implicit methods for stiff problems (``implicit_euler``, ``implicit_midpoint``, ``trapezoid``,
``sdirk2``, ``trbdf2``, ``radauIIA3``, ``radauIIA5``, ``gl4``, ``gl6``, ``kvaerno5``, ``rodas4``)
live in :mod:`neuralode.solvers.implicit`, Adams methods (``explicit_adams``, ``implicit_adams``,
``fixed_adams``) in :mod:`neuralode.solvers.multistep`; :func:`get_tableau` resolves their names
too (to method objects with their own stepper, not Butcher tableaux).
"""

from __future__ import annotations

from . import bosh3, classic, dopri5, low_order
from .tableau import ButcherTableau

__all__ = [
    "ButcherTableau",
    "get_tableau",
    "available",
    "FIXED_STEP",
    "ADAPTIVE",
    "IMPLICIT",
    "MULTISTEP",
]

_REGISTRY: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        classic.EULER,
        classic.MIDPOINT,
        classic.HEUN2,
        classic.HEUN3,
        classic.RK4,
        classic.RK38,
        low_order.ADAPTIVE_HEUN,
        low_order.FEHLBERG2,
        bosh3.TABLEAU,
        dopri5.TABLEAU,
    )
}
try:  # high-order tables live in their own modules
    from . import dopri8, tsit5

    _REGISTRY["tsit5"] = tsit5.TABLEAU
    _REGISTRY["dopri8"] = dopri8.TABLEAU
except ImportError:  # pragma: no cover - during development only
    pass

#: Names of the explicit methods without an error estimate (they need a fixed-step controller).
FIXED_STEP = tuple(n for n, t in _REGISTRY.items() if not t.adaptive)
#: Names of the explicit methods with an embedded error estimate (adaptive steps).
ADAPTIVE = tuple(n for n, t in _REGISTRY.items() if t.adaptive)

# Methods that are not explicit Butcher tableaux: they bring their own stepper (make_stepper).
from . import implicit, multistep  # noqa: E402

_METHODS: dict = {**implicit.METHODS, **multistep.METHODS}
#: Names of the implicit (stiff) methods of :mod:`neuralode.solvers.implicit`.
IMPLICIT = tuple(implicit.METHODS)
#: Names of the Adams methods of :mod:`neuralode.solvers.multistep`.
MULTISTEP = tuple(multistep.METHODS)


def available(kind: str = "explicit") -> tuple[str, ...]:
    """Names of the built-in methods.

    Parameters
    ----------
    kind : {"explicit", "implicit", "multistep", "all"}, default "explicit"
        Explicit Runge--Kutta tableaux; implicit (stiff) methods; Adams methods; or all.
    """
    groups = {
        "explicit": tuple(_REGISTRY),
        "implicit": tuple(IMPLICIT),
        "multistep": tuple(MULTISTEP),
    }
    if kind == "all":
        return groups["explicit"] + groups["implicit"] + groups["multistep"]
    if kind not in groups:
        raise ValueError(f"kind must be 'explicit', 'implicit', 'multistep' or 'all', got {kind!r}")
    return groups[kind]


def get_tableau(solver) -> ButcherTableau:
    """Resolve a solver given by name, as a :class:`ButcherTableau` or as a method object.

    Names of implicit and multistep methods resolve to method objects
    (:class:`~neuralode.solvers.implicit.ImplicitRK`,
    :class:`~neuralode.solvers.implicit.Rosenbrock`, :class:`~neuralode.solvers.multistep.Adams`)
    that the engine drives through their own stepper.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    TypeError
        For anything that is neither a string nor a tableau.
    """
    if isinstance(solver, ButcherTableau) or callable(getattr(solver, "make_stepper", None)):
        return solver
    if isinstance(solver, str):
        found = _REGISTRY.get(solver) or _METHODS.get(solver)
        if found is None:
            raise ValueError(
                f"unknown solver {solver!r}; choose one of {sorted(_REGISTRY) + sorted(_METHODS)} "
                "or pass a ButcherTableau"
            )
        return found
    raise TypeError(
        f"solver must be a method name, a ButcherTableau or a method object (e.g. "
        f"neuralode.solvers.implicit.ImplicitRK), got {type(solver).__name__}"
    )
