"""dpc_lens.evaluation.paired_bootstrap against the exact bootstrap distribution.

For per-question differences d_i in {-1, 0, +1} (two methods' verdicts on the same questions),
a bootstrap resample's mean is (X+ - X-) / n with (X-, X0, X+) ~ Multinomial(n, observed
shares): its quantiles can be enumerated exactly, independently of any random draw.
"""

from __future__ import annotations

import math

import pytest

from dpc_lens.errors import InputError
from dpc_lens.evaluation import paired_bootstrap


def _exact_quantiles(n_plus: int, n_minus: int, n: int, qs: tuple[float, ...]) -> list[float]:
    p_plus, p_minus = n_plus / n, n_minus / n
    p_zero = 1 - p_plus - p_minus
    pmf: dict[int, float] = {}
    for a in range(n + 1):
        for c in range(n + 1 - a):
            w = (math.comb(n, a) * math.comb(n - a, c) * p_plus ** a * p_minus ** c
                 * p_zero ** (n - a - c))
            pmf[a - c] = pmf.get(a - c, 0.0) + w
    out, cdf = [], 0.0
    items = sorted(pmf.items())
    for q in qs:
        cdf = 0.0
        for s, w in items:
            cdf += w
            if cdf >= q:
                out.append(s / n)
                break
    return out


@pytest.mark.parametrize("n_plus,n_minus,n", [(12, 4, 40), (5, 5, 30), (20, 2, 60), (0, 3, 25)])
def test_interval_matches_the_exact_bootstrap_quantiles(n_plus, n_minus, n):
    a = [True] * n_plus + [False] * n_minus + [True] * ((n - n_plus - n_minus) // 2)
    a += [False] * (n - len(a))
    b = [False] * n_plus + [True] * n_minus + a[n_plus + n_minus:]
    diff, lo, hi = paired_bootstrap(a, b, n_resamples=20000)
    assert diff == pytest.approx((n_plus - n_minus) / n)
    ex_lo, ex_hi = _exact_quantiles(n_plus, n_minus, n, (0.025, 0.975))
    step = 1 / n  # the resampled mean moves in steps of 1/n; Monte-Carlo error is below one step
    assert abs(lo - ex_lo) <= step + 1e-12 and abs(hi - ex_hi) <= step + 1e-12, (lo, hi, ex_lo, ex_hi)


def test_it_is_paired_and_deterministic():
    a = [True, False] * 20
    # identical verdicts: every resampled difference is 0 (an unpaired bootstrap would not be)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    b = [True] * 25 + [False] * 15
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    # numbers work as well as verdicts (e.g. a mean over random draws per question)
    diff, lo, hi = paired_bootstrap([0.5] * 10, [0.0] * 10)
    assert (diff, lo, hi) == (0.5, 0.5, 0.5)


def test_bad_input_says_what_was_expected():
    with pytest.raises(InputError, match="equally long, non-empty"):
        paired_bootstrap([True], [True, False])
    with pytest.raises(InputError, match="equally long, non-empty"):
        paired_bootstrap([], [])
    with pytest.raises(InputError, match="n_resamples must be >= 40"):
        paired_bootstrap([True], [False], n_resamples=10)
