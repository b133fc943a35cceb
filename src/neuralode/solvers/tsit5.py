"""Tsitouras 5(4) (``tsit5``).

Coefficients: Ch. Tsitouras, "Runge--Kutta pairs of order 5(4) satisfying only the first column
simplifying assumption", Comput. Math. Appl. 62 (2011) 770--775. Seven stages, FSAL,
order 5 with a 4th-order embedded solution used for the error estimate (local extrapolation).
``c2 = 0.161``, ``c3 = 0.327``, ``c4 = 0.9``, ``a72 = 1/100`` and ``b_hat_7 = 1/66`` are exact; the
other coefficients are irrational and are written here to 25 significant digits, rounded
from the high-precision values of the paper's construction as tabulated in OrdinaryDiffEq.jl
(``Tsit5ConstantCache`` for ``BigFloat``).

Dense output: Tsitouras' own 4th-order continuous extension (the paper's polynomials
``b_i(theta)``, given there in factored form), written in expanded form as the rows of ``P``:
``b_i(theta) = P[i, 0] theta + P[i, 1] theta^2 + P[i, 2] theta^3 + P[i, 3] theta^4``. It needs
no extra stages (FSAL: the last stage is ``f(t_n + h, y_{n+1})``). The leading coefficient of
``b_1`` is exactly 1 (so the interpolant's derivative at ``theta = 0`` is ``f_n``); the product
of the paper's rounded factors gives ``1 - 2.6e-17``.
"""

from fractions import Fraction as F

from .tableau import ButcherTableau

_A7 = [
    F("0.09646076681806522951816731"),
    F(1, 100),
    F("0.4798896504144995747752495"),
    F("1.379008574103741893192275"),
    F("-3.290069515436080679901048"),
    F("2.324710524099773982415356"),
]
_B = [*_A7, 0]
# The 4th-order embedded weights; b_hat - b is OrdinaryDiffEq.jl's ``btilde``, and b_hat_7 = 1/66
# multiplies the FSAL stage f(t_n + h, y_{n+1}).
_B_HAT = [
    F("0.09468075576583945807478876"),
    F("9.183565540343253096776364e-3"),
    F("0.4877705284247615707855643"),
    F("1.234297566930478985655110"),
    F("-2.707712349983525454881110"),
    F("1.866628418170587035753719"),
    F(1, 66),
]

TABLEAU = ButcherTableau(
    name="tsit5",
    c=[0, F("0.161"), F("0.327"), F("0.9"), F("0.9800255409045096857298103"), 1, 1],
    a=[
        [],
        [F("0.161")],
        [F("-8.480655492356988544426874e-3"), F("0.3354806554923569885444269")],
        [
            F("2.897153057105493432130433"),
            F("-6.359448489975074843148160"),
            F("4.362295432869581411017727"),
        ],
        [
            F("5.325864828439256604428878"),
            F("-11.74888356406282787774717"),
            F("7.495539342889836208304605"),
            F("-0.09249506636175524925650208"),
        ],
        [
            F("5.861455442946420028659251"),
            F("-12.92096931784710929170612"),
            F("8.159367898576158643180401"),
            F("-0.07158497328140099722453054"),
            F("-0.02826905039406838290900306"),
        ],
        _A7,
    ],
    b=_B,
    b_hat=_B_HAT,
    order=5,
    embedded_order=4,
    interpolant=[
        [
            1,
            F("-2.763706197274825911336736"),
            F("2.913255461821912743750681"),
            F("-1.0530884977290216"),
        ],
        [0, F("0.13169999999999999727"), F("-0.22339999999999999818"), F("0.1017")],
        [
            0,
            F("3.930296236894751528506874"),
            F("-5.941033872131504734702492"),
            F("2.490627285651252793"),
        ],
        [
            0,
            F("-12.41107716693367698373438"),
            F("30.33818863028232159817299"),
            F("-16.54810288924490272"),
        ],
        [
            0,
            F("37.50931341651103919496904"),
            F("-88.17890489476640110142767"),
            F("47.37952196281928122"),
        ],
        [
            0,
            F("-27.89652628919728780594826"),
            F("65.09189467479367152629022"),
            F("-34.87065786149660974"),
        ],
        [0, F(3, 2), -4, F(5, 2)],
    ],
    interpolant_order=4,
    source="Tsitouras 2011 (Comput. Math. Appl. 62, 770-775), with its 4th-order interpolant",
)
