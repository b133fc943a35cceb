"""Multistep methods: variable-step Adams (see ``neuralode.solvers.multistep.adams``).

==================  =================  ========  ====================================
name                order              adaptive  kind
==================  =================  ========  ====================================
``explicit_adams``  4 (``max_order``)  no        Adams--Bashforth
``implicit_adams``  4 (``max_order``)  yes       Adams--Bashforth--Moulton, P(EC)^m E
``fixed_adams``     4 (``max_order``)  no        Adams--Bashforth--Moulton, P(EC)^m E
==================  =================  ========  ====================================
"""

from __future__ import annotations

from .adams import EXPLICIT_ADAMS, FIXED_ADAMS, IMPLICIT_ADAMS, Adams, adams_weights

__all__ = ["Adams", "adams_weights", "METHODS"]

#: The registered multistep methods with their default settings, by name.
METHODS = {m.name: m for m in (EXPLICIT_ADAMS, IMPLICIT_ADAMS, FIXED_ADAMS)}
