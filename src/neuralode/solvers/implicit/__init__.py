"""Implicit solvers for stiff problems: implicit Runge--Kutta methods and Rosenbrock methods.

=====================  ================  ========  ============================  =======================================
name                   order (embedded)  adaptive  kind                          source
=====================  ================  ========  ============================  =======================================
``implicit_euler``     1                 no        DIRK (Radau IIA, s = 1)       Hairer & Wanner II, IV.5
``implicit_midpoint``  2                 no        DIRK (Gauss, s = 1)           Hairer & Wanner II, IV.5
``trapezoid``          2                 no        ESDIRK (Lobatto IIIA, s = 2)  Hairer & Wanner II, IV.5
``sdirk2``             2                 no        SDIRK, L-stable               Alexander 1977
``trbdf2``             2 (3)             yes       ESDIRK, L-stable              Bank et al. 1985; Hosea & Shampine 1996
``radauIIA3``          3                 no        fully implicit, L-stable      Hairer & Wanner II, IV.5
``radauIIA5``          5                 no        fully implicit, L-stable      Hairer & Wanner II, IV.5
``gl4``                4                 no        fully implicit, A-stable      Hairer & Wanner II, IV.5
``gl6``                6                 no        fully implicit, A-stable      Hairer & Wanner II, IV.5
``kvaerno5``           5 (4)             yes       ESDIRK, L-stable              Kværnø 2004
``rodas4``             4 (3)             yes       Rosenbrock, L-stable          Hairer & Wanner II, IV.7
=====================  ================  ========  ============================  =======================================

Dense output: a fourth-order quartic built from the step's stages for ``kvaerno5`` and
``radauIIA5``, the method's own for ``rodas4``, the cubic Hermite (third order) for the others.
The implicit Runge--Kutta methods (:class:`ImplicitRK`) solve their stage equations by a simplified Newton iteration with Jacobian
reuse, on dense factorisations (``linear_solver="dense"``) or matrix-free with GMRES on
Jacobian-vector products (``linear_solver="krylov"``); their gradients use the implicit function
theorem. ``Solution.stats`` reports ``n_jac`` (Jacobian evaluations), ``n_lu`` (LU
factorisations), ``n_newton`` (Newton iterations) and ``n_newton_fail`` besides ``nfe``; the
matrix-free path also ``n_jvp`` and ``n_krylov`` (GMRES iterations).

``kvaerno5`` evaluates func at up to ``t_n + 1.23 h`` inside a step (its third node), so on the
last step slightly past the final time.

Per-sample control (``batch_control="per_sample"``, each sample its own step size) runs
``rodas4`` and the adaptive diagonally implicit methods (``kvaerno5``, ``trbdf2``) with one
``M x M`` Jacobian block, factorisation and Newton iteration per sample (``neuralode.solvers.implicit.rows``): each
sample takes the steps it would take alone. Fully implicit methods, ``linear_solver="krylov"``
and Newton methods on fixed steps are refused there (ValueError naming the reason).

Examples
--------
>>> import torch, neuralode
>>> from neuralode.solvers import get_tableau
>>> mf = get_tableau("kvaerno5").with_options(linear_solver="krylov")
>>> sol = neuralode.solve(lambda t, y: -1e4 * (y - torch.cos(t)), torch.tensor([0.0]),
...                       torch.tensor([0.0, 1.0]), solver=mf, rtol=1e-6, atol=1e-9)
>>> round(float(sol.ys[-1]), 5)
0.5403
"""

from __future__ import annotations

from .irk import ImplicitRK
from .rosenbrock import RODAS4, Rosenbrock, RosenbrockTableau
from .tableaux import TABLEAUX, ImplicitTableau

__all__ = [
    "ImplicitRK",
    "ImplicitTableau",
    "Rosenbrock",
    "RosenbrockTableau",
    "METHODS",
]

#: The registered implicit methods with their default settings, by name.
METHODS = {name: ImplicitRK(tab) for name, tab in TABLEAUX.items()}
METHODS[RODAS4.name] = RODAS4
