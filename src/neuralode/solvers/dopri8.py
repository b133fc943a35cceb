"""Dormand--Prince 8(5,3) (``dopri8``): Hairer & Wanner's DOP853.

Coefficients: the explicit Runge--Kutta pair "of order 8(5,3) due to Dormand & Prince" of
E. Hairer, S. P. Norsett and G. Wanner, *Solving Ordinary Differential Equations I*, 2nd ed.
(1993), sec. II.10, and of their code DOP853 (coefficients ``c*``, ``a*``, ``b*``, ``er*``,
``bhh*``, ``d*``, written into the tables below with the published digits and Hairer's 1-based
stage numbering); the construction goes back to P. J. Prince and J. R. Dormand, "High order
embedded Runge--Kutta formulae", J. Comput. Appl. Math. 7 (1981) 67--75.

Twelve stages, order 8, not FSAL.

Error estimate
--------------
DOP853 carries two embedded error estimators: ``err5 = h sum er_i k_i`` (the difference to a
5th-order solution) and ``err3 = h sum (b_i - bhh_i) k_i`` (to a 3rd-order solution), combined
as ``err5^2 / sqrt(err5^2 + 0.01 err3^2)``, an ``O(h^8)`` quantity that DOP853 controls with the
exponent 1/8. Our engine takes a single ``b_hat``, so this table encodes the 5th-order embedded
solution ``b_hat = b - er`` with ``embedded_order=5`` (``b - b_hat`` are exactly DOP853's ``er``
weights), and the step-size controller works with the exponent ``1/(5 + 1)``. Because
``|err5| >= err5^2 / sqrt(err5^2 + 0.01 err3^2)``, this estimate is never smaller than DOP853's:
the acceptance test is more conservative, so expect somewhat shorter steps than DOP853 at the
same tolerance. The 3rd-order weights are kept as :data:`B_HAT_3` (not used by the engine) so
that the combined estimator can be added later.

Dense output
------------
DOP853's 7th-order continuous extension (``CONTD8``) evaluates, once per step on demand, the
stage ``f(t_n + h, y_{n+1})`` (row ``b``, node 1; DOP853 reuses it as the next step's first
stage, and so does our engine because it is dense stage 0 here) and three further stages,
stages 14--16 of the code (nodes 0.1, 0.2 and 7/9). Hairer writes the interpolant in nested
form::

    y(t_n + theta h) = r1 + theta (r2 + (1-theta) (r3 + theta (r4 + (1-theta) (r5
                       + theta (r6 + (1-theta) (r7 + theta r8))))))

with ``r1 = y_n``, ``r2 = dy = y_{n+1} - y_n``, ``r3 = h k_1 - dy``, ``r4 = dy - h k_13 - r3``
and ``r5..r8 = h sum_j d_{4..7,j} k_j``. Every ``r`` except ``r1`` is ``h`` times a linear
combination of the stages, so expanding the nested form gives the polynomial weights
``b_i(theta) = sum_p P[i, p] theta^(p+1)`` of :class:`~neuralode.solvers.tableau.ButcherTableau`
exactly (7 powers). :func:`_contd8_polynomials` does that expansion at import, in rational
arithmetic on the published decimals, before one rounding to float.
"""

from __future__ import annotations

from fractions import Fraction

from .tableau import ButcherTableau

__all__ = ["TABLEAU", "B_HAT_3"]

N_STAGES = 12  # stages of a step
N_DENSE = 4  # dense stages: f(t_n + h, y_{n+1}) (Hairer's stage 13) and stages 14--16

# Hairer's 1-based numbering: ``i value`` is c_i; ``i j value`` is a_ij (row i, column j).
# c_1 = 0; stage 13 is f(t_n + h, y_{n+1}) with row b and c_13 = 1 (filled in below).
_C_TEXT = """
2   0.526001519587677318785587544488e-01
3   0.789002279381515978178381316732e-01
4   0.118350341907227396726757197510
5   0.281649658092772603273242802490
6   0.333333333333333333333333333333
7   0.25
8   0.307692307692307692307692307692
9   0.651282051282051282051282051282
10  0.6
11  0.857142857142857142857142857142
12  1.0
14  0.1
15  0.2
16  0.777777777777777777777777777778
"""
_A_TEXT = """
2  1   5.26001519587677318785587544488e-2
3  1   1.97250569845378994544595329183e-2
3  2   5.91751709536136983633785987549e-2
4  1   2.95875854768068491816892993775e-2
4  3   8.87627564304205475450678981324e-2
5  1   2.41365134159266685502369798665e-1
5  3  -8.84549479328286085344864962717e-1
5  4   9.24834003261792003115737966543e-1
6  1   3.7037037037037037037037037037e-2
6  4   1.70828608729473871279604482173e-1
6  5   1.25467687566822425016691814123e-1
7  1   3.7109375e-2
7  4   1.70252211019544039314978060272e-1
7  5   6.02165389804559606850219397283e-2
7  6  -1.7578125e-2
8  1   3.70920001185047927108779319836e-2
8  4   1.70383925712239993810214054705e-1
8  5   1.07262030446373284651809199168e-1
8  6  -1.53194377486244017527936158236e-2
8  7   8.27378916381402288758473766002e-3
9  1   6.24110958716075717114429577812e-1
9  4  -3.36089262944694129406857109825
9  5  -8.68219346841726006818189891453e-1
9  6   2.75920996994467083049415600797e1
9  7   2.01540675504778934086186788979e1
9  8  -4.34898841810699588477366255144e1
10 1   4.77662536438264365890433908527e-1
10 4  -2.48811461997166764192642586468
10 5  -5.90290826836842996371446475743e-1
10 6   2.12300514481811942347288949897e1
10 7   1.52792336328824235832596922938e1
10 8  -3.32882109689848629194453265587e1
10 9  -2.03312017085086261358222928593e-2
11 1  -9.3714243008598732571704021658e-1
11 4   5.18637242884406370830023853209
11 5   1.09143734899672957818500254654
11 6  -8.14978701074692612513997267357
11 7  -1.85200656599969598641566180701e1
11 8   2.27394870993505042818970056734e1
11 9   2.49360555267965238987089396762
11 10 -3.0467644718982195003823669022
12 1   2.27331014751653820792359768449
12 4  -1.05344954667372501984066689879e1
12 5  -2.00087205822486249909675718444
12 6  -1.79589318631187989172765950534e1
12 7   2.79488845294199600508499808837e1
12 8  -2.85899827713502369474065508674
12 9  -8.87285693353062954433549289258
12 10  1.23605671757943030647266201528e1
12 11  6.43392746015763530355970484046e-1
14 1   5.61675022830479523392909219681e-2
14 7   2.53500210216624811088794765333e-1
14 8  -2.46239037470802489917441475441e-1
14 9  -1.24191423263816360469010140626e-1
14 10  1.5329179827876569731206322685e-1
14 11  8.20105229563468988491666602057e-3
14 12  7.56789766054569976138603589584e-3
14 13 -8.298e-3
15 1   3.18346481635021405060768473261e-2
15 6   2.83009096723667755288322961402e-2
15 7   5.35419883074385676223797384372e-2
15 8  -5.49237485713909884646569340306e-2
15 11 -1.08347328697249322858509316994e-4
15 12  3.82571090835658412954920192323e-4
15 13 -3.40465008687404560802977114492e-4
15 14  1.41312443674632500278074618366e-1
16 1  -4.28896301583791923408573538692e-1
16 6  -4.69762141536116384314449447206
16 7   7.68342119606259904184240953878
16 8   4.06898981839711007970213554331
16 9   3.56727187455281109270669543021e-1
16 13 -1.39902416515901462129418009734e-3
16 14  2.9475147891527723389556272149
16 15 -9.15095847217987001081870187138
"""
# Weights b_i of the 8th-order solution (zero for stages 2--5).
_B_TEXT = """
1   5.42937341165687622380535766363e-2
6   4.45031289275240888144113950566
7   1.89151789931450038304281599044
8  -5.8012039600105847814672114227
9   3.1116436695781989440891606237e-1
10 -1.52160949662516078556178806805e-1
11  2.01365400804030348374776537501e-1
12  4.47106157277725905176885569043e-2
"""
# Error weights er_i = b_i - b_hat_i of the 5th-order estimator.
_ER_TEXT = """
1   0.1312004499419488073250102996e-1
6  -0.1225156446376204440720569753e+1
7  -0.4957589496572501915214079952
8   0.1664377182454986536961530415e+1
9  -0.3503288487499736816886487290
10  0.3341791187130174790297318841
11  0.8192320648511571246570742613e-1
12 -0.2235530786388629525884427845e-1
"""
# Dense-output coefficients d_ij, i = 4..7 (rows of rcont5..rcont8), j = stage 1..16.
_D_TEXT = """
4  1  -0.84289382761090128651353491142e+1
4  6   0.56671495351937776962531783590
4  7  -0.30689499459498916912797304727e+1
4  8   0.23846676565120698287728149680e+1
4  9   0.21170345824450282767155149946e+1
4  10 -0.87139158377797299206789907490
4  11  0.22404374302607882758541771650e+1
4  12  0.63157877876946881815570249290
4  13 -0.88990336451333310820698117400e-1
4  14  0.18148505520854727256656404962e+2
4  15 -0.91946323924783554000451984436e+1
4  16 -0.44360363875948939664310572000e+1
5  1   0.10427508642579134603413151009e+2
5  6   0.24228349177525818288430175319e+3
5  7   0.16520045171727028198505394887e+3
5  8  -0.37454675472269020279518312152e+3
5  9  -0.22113666853125306036270938578e+2
5  10  0.77334326684722638389603898808e+1
5  11 -0.30674084731089398182061213626e+2
5  12 -0.93321305264302278729567221706e+1
5  13  0.15697238121770843886131091075e+2
5  14 -0.31139403219565177677282850411e+2
5  15 -0.93529243588444783865713862664e+1
5  16  0.35816841486394083752465898540e+2
6  1   0.19985053242002433820987653617e+2
6  6  -0.38703730874935176555105901742e+3
6  7  -0.18917813819516756882830838328e+3
6  8   0.52780815920542364900561016686e+3
6  9  -0.11573902539959630126141871134e+2
6  10  0.68812326946963000169666922661e+1
6  11 -0.10006050966910838403183860980e+1
6  12  0.77771377980534432092869265740
6  13 -0.27782057523535084065932004339e+1
6  14 -0.60196695231264120758267380846e+2
6  15  0.84320405506677161018159903784e+2
6  16  0.11992291136182789328035130030e+2
7  1  -0.25693933462703749003312586129e+2
7  6  -0.15418974869023643374053993627e+3
7  7  -0.23152937917604549567536039109e+3
7  8   0.35763911791061412378285349910e+3
7  9   0.93405324183624310003907691704e+2
7  10 -0.37458323136451633156875139351e+2
7  11  0.10409964950896230045147246184e+3
7  12  0.29840293426660503123344363579e+2
7  13 -0.43533456590011143754432175058e+2
7  14  0.96324553959188282948394950600e+2
7  15 -0.39177261675615439165231486172e+2
7  16 -0.14972683625798562581422125276e+3
"""

# 3rd-order embedded weights bhh_1, bhh_2, bhh_3 of stages 1, 9 and 12.
_BHH_TEXT = """
1   0.244094488188976377952755905512
9   0.733846688281611857341361741547
12  0.220588235294117647058823529412e-1
"""


def _parse(text: str) -> list[tuple[list[int], Fraction]]:
    rows = []
    for line in text.strip().splitlines():
        *idx, value = line.split()
        rows.append(([int(i) for i in idx], Fraction(value)))
    return rows


def _vector(text: str, n: int) -> list[Fraction]:
    """Sparse 1-based ``i value`` table -> dense list of length ``n``."""
    v = [Fraction(0)] * n
    for (i,), value in _parse(text):
        v[i - 1] = value
    return v


def _poly_mul(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
    """Product of two polynomials given by coefficient lists (constant term first)."""
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, x in enumerate(p):
        for j, y in enumerate(q):
            out[i + j] += x * y
    return out


def _contd8_polynomials(b: list[Fraction], d_rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """Expand DOP853's nested dense output into ``P`` (rows: 16 stages, columns: theta^1..theta^7).

    ``r2..r8`` are written as coefficient vectors ``F_0..F_6`` over the 16 stages (in units of
    ``h k_i``); in the nested form ``F_j`` is multiplied by
    ``w_j(theta) = theta^ceil((j+1)/2) (1-theta)^floor((j+1)/2)``, so
    ``b_i(theta) = sum_j F_j[i] w_j(theta)``.
    """
    n = N_STAGES + N_DENSE
    dy = list(b) + [Fraction(0)] * (n - len(b))  # r2 = dy = h sum b_i k_i
    e1 = [Fraction(int(i == 0)) for i in range(n)]  # h k_1
    e13 = [Fraction(int(i == N_STAGES)) for i in range(n)]  # h f(t_n + h, y_{n+1})
    r3 = [x - y for x, y in zip(e1, dy)]
    r4 = [x - y - z for x, y, z in zip(dy, e13, r3)]  # = 2 dy - h (k_1 + k_13)
    factors = [dy, r3, r4, *d_rows]
    theta, one_minus = [Fraction(0), Fraction(1)], [Fraction(1), Fraction(-1)]
    degree = len(factors)
    P = [[Fraction(0)] * degree for _ in range(n)]
    for j, F in enumerate(factors):
        w = [Fraction(1)]
        for _ in range((j + 2) // 2):
            w = _poly_mul(w, theta)
        for _ in range((j + 1) // 2):
            w = _poly_mul(w, one_minus)
        assert w[0] == 0 and len(w) <= degree + 1
        for i in range(n):
            for p in range(1, len(w)):
                P[i][p - 1] += F[i] * w[p]
    return P


def _build() -> tuple[ButcherTableau, tuple[float, ...]]:
    n = N_STAGES + N_DENSE
    c = [Fraction(0)] * n
    for (i,), value in _parse(_C_TEXT):
        c[i - 1] = value
    c[N_STAGES] = Fraction(1)
    b = _vector(_B_TEXT, N_STAGES)
    rows: list[list[Fraction]] = [[Fraction(0)] * i for i in range(n)]
    for (i, j), value in _parse(_A_TEXT):
        rows[i - 1][j - 1] = value
    rows[N_STAGES] = list(b)
    er = _vector(_ER_TEXT, N_STAGES)
    d_rows = [[Fraction(0)] * n for _ in range(4)]
    for (i, j), value in _parse(_D_TEXT):
        d_rows[i - 4][j - 1] = value
    tableau = ButcherTableau(
        name="dopri8",
        a=rows[:N_STAGES],
        b=b,
        c=c[:N_STAGES],
        order=8,
        b_hat=[x - y for x, y in zip(b, er)],
        embedded_order=5,
        interpolant=_contd8_polynomials(b, d_rows),
        interpolant_order=7,
        a_dense=rows[N_STAGES:],
        c_dense=c[N_STAGES:],
        source=(
            "DOP853 (Dormand & Prince; Hairer, Norsett & Wanner, Solving ODEs I, 2nd ed. 1993, "
            "sec. II.10; Prince & Dormand 1981); b_hat: DOP853's 5th-order estimator; "
            "dense output: DOP853 CONTD8 (order 7)"
        ),
    )
    return tableau, tuple(float(x) for x in _vector(_BHH_TEXT, N_STAGES))


TABLEAU, B_HAT_3 = _build()
"""``TABLEAU``: the method; ``B_HAT_3``: DOP853's 3rd-order embedded weights (unused by the engine)."""
