"""Low-order embedded pairs: ``adaptive_heun`` (Heun--Euler 2(1)) and ``fehlberg2`` (RKF 2(1)).

Neither is FSAL: every step evaluates f afresh at its starting point (the derivative at the end of
the previous step's *embedded* stage is not reused). Dense output: cubic Hermite (the derivative
at the step end is the next step's first stage, so it costs nothing extra in a run of steps).

Sources:
- Heun--Euler: K. Heun, "Neue Methoden zur approximativen Integration der
  Differentialgleichungen einer unabhängigen Veränderlichen", Z. Math. Phys. 45 (1900); the
  embedded Euler solution gives the error estimate (Hairer, Norsett & Wanner I, sec. II.4).
- RKF 2(1): E. Fehlberg, "Low-order classical Runge--Kutta formulas with stepsize control and
  their application to some heat transfer problems", NASA TR R-315 (1969), Table XIII (2(1)).
"""

from fractions import Fraction as F

from .tableau import ButcherTableau

ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    c=[0, 1],
    a=[[], [1]],
    b=[F(1, 2), F(1, 2)],
    b_hat=[1, 0],
    order=2,
    embedded_order=1,
    source="Heun 1900 with embedded Euler (Hairer, Norsett & Wanner I, II.4)",
)

FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    c=[0, F(1, 2), 1],
    a=[[], [F(1, 2)], [F(1, 256), F(255, 256)]],
    b=[F(1, 512), F(255, 256), F(1, 512)],
    b_hat=[F(1, 256), F(255, 256), 0],
    order=2,
    embedded_order=1,
    source="Fehlberg 1969, NASA TR R-315, RKF 2(1)",
)
