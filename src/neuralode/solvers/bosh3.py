"""Bogacki--Shampine 3(2) (``bosh3``).

Coefficients: P. Bogacki and L. F. Shampine, "A 3(2) pair of Runge--Kutta formulas",
Appl. Math. Lett. 2 (1989) 321--325. Four stages, FSAL, order 3 with a 2nd-order embedded
solution. Dense output: the cubic Hermite interpolant through the step's end points and
derivatives (free thanks to FSAL), third order.
"""

from fractions import Fraction as F

from .tableau import ButcherTableau

TABLEAU = ButcherTableau(
    name="bosh3",
    c=[0, F(1, 2), F(3, 4), 1],
    a=[[], [F(1, 2)], [0, F(3, 4)], [F(2, 9), F(1, 3), F(4, 9)]],
    b=[F(2, 9), F(1, 3), F(4, 9), 0],
    b_hat=[F(7, 24), F(1, 4), F(1, 3), F(1, 8)],
    order=3,
    embedded_order=2,
    source="Bogacki & Shampine 1989",
)
