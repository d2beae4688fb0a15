"""Student's t distribution in pure Python (``math`` only): its CDF and its quantile.

``sandbox compare`` needs the t quantile for the confidence interval of a paired mean difference,
and imports neither torch nor scipy (it must start at once, and scipy is no dependency). The
CDF comes from the regularized incomplete beta function,
``P(T <= t) = 1 - I_x(df/2, 1/2) / 2`` for ``t >= 0`` with ``x = df / (df + t^2)``, evaluated
by its continued fraction (modified Lentz's method, as in *Numerical Recipes*, section 6.4);
the quantile inverts the CDF by bisection, to about 1e-12. Exact for any real ``df > 0`` up to
that tolerance: ``t_quantile(0.975, 2)`` = 4.3027, ``t_quantile(0.975, 30)`` = 2.0423.
"""

from __future__ import annotations

import math

_TINY = 1e-300
"""Stand-in for a zero denominator in Lentz's method."""

_CONTINUED_FRACTION_TOLERANCE = 1e-15
_CONTINUED_FRACTION_TERMS = 500
_BISECTION_TOLERANCE = 1e-12


def _nonzero(value: float) -> float:
    """``value``, or a tiny number in its place when it is (nearly) zero."""
    return _TINY if abs(value) < _TINY else value


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function (converges fast for ``x < (a+1)/(a+b+2)``)."""
    c = 1.0
    d = 1.0 / _nonzero(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, _CONTINUED_FRACTION_TERMS + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / _nonzero(1.0 + even * d)
        c = _nonzero(1.0 + even / c)
        fraction *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / _nonzero(1.0 + odd * d)
        c = _nonzero(1.0 + odd / c)
        step = d * c
        fraction *= step
        if abs(step - 1.0) < _CONTINUED_FRACTION_TOLERANCE:
            break
    return fraction


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``: the CDF at ``x`` of a Beta(``a``, ``b``) distribution (``a, b > 0``, ``0 <= x <= 1``)."""
    if a <= 0 or b <= 0:
        raise ValueError(f"regularized_incomplete_beta: a and b must be > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: degrees of freedom must be > 0, got {df}")
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``t`` with ``P(T <= t) = p`` for Student's t with ``df > 0`` degrees of freedom (``0 < p < 1``).

    ``t_quantile(0.975, n - 1)`` is the factor of a two-sided 95% confidence interval of a mean of ``n`` values.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > _BISECTION_TOLERANCE * max(1.0, high):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
