"""Classical fixed-step Runge--Kutta methods (no error estimate; use a fixed-step controller).

Dense output for all of them: the cubic Hermite interpolant (third order, or the method's order
if lower). Coefficients from J. C. Butcher, *Numerical Methods for Ordinary Differential
Equations*, 3rd ed. (2016), ch. 2, and Hairer, Norsett & Wanner I (1993), sec. II.1:

- ``euler``: explicit Euler, order 1.
- ``midpoint``: explicit midpoint rule (Runge 1895), order 2.
- ``heun2``: Heun's method / explicit trapezoidal rule, order 2.
- ``heun3``: Heun's third-order method (Heun 1900), order 3.
- ``rk4``: the classical Runge--Kutta method (Kutta 1901), order 4.
- ``rk38``: Kutta's 3/8 rule (Kutta 1901), order 4 (torchdiffeq's ``rk4`` is this rule).
"""

from fractions import Fraction as F

from .tableau import ButcherTableau

EULER = ButcherTableau(name="euler", c=[0], a=[[]], b=[1], order=1, source="Euler 1768")
MIDPOINT = ButcherTableau(
    name="midpoint", c=[0, F(1, 2)], a=[[], [F(1, 2)]], b=[0, 1], order=2, source="Runge 1895"
)
HEUN2 = ButcherTableau(
    name="heun2", c=[0, 1], a=[[], [1]], b=[F(1, 2), F(1, 2)], order=2, source="Heun 1900"
)
HEUN3 = ButcherTableau(
    name="heun3",
    c=[0, F(1, 3), F(2, 3)],
    a=[[], [F(1, 3)], [0, F(2, 3)]],
    b=[F(1, 4), 0, F(3, 4)],
    order=3,
    source="Heun 1900",
)
RK4 = ButcherTableau(
    name="rk4",
    c=[0, F(1, 2), F(1, 2), 1],
    a=[[], [F(1, 2)], [0, F(1, 2)], [0, 0, 1]],
    b=[F(1, 6), F(1, 3), F(1, 3), F(1, 6)],
    order=4,
    source="Kutta 1901 (classical RK4)",
)
RK38 = ButcherTableau(
    name="rk38",
    c=[0, F(1, 3), F(2, 3), 1],
    a=[[], [F(1, 3)], [F(-1, 3), 1], [1, -1, 1]],
    b=[F(1, 8), F(3, 8), F(3, 8), F(1, 8)],
    order=4,
    source="Kutta 1901 (3/8 rule)",
)
