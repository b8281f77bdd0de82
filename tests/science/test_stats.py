"""Bootstrap intervals on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import pytest

from xlora.science.eval.stats import Interval, bootstrap_mean, paired_available, paired_difference


def test_constant_data_gives_a_zero_width_interval():
    for values in ([0.7] * 50, [1] * 30, [0] * 10):
        iv = bootstrap_mean(values)
        assert iv.low == iv.estimate == iv.high and iv.n == len(values)
        assert iv.estimate == pytest.approx(values[0])


def test_known_mean_and_a_sensible_width():
    # 100 outcomes, 30 successes: mean 0.3; the binomial standard error is sqrt(.3*.7/100) = 0.046,
    # so a 95% interval is about 0.3 +- 0.09
    iv = bootstrap_mean([1] * 30 + [0] * 70, resamples=4000)
    assert iv.estimate == pytest.approx(0.3)
    assert 0.20 < iv.low < 0.23 and 0.37 < iv.high < 0.40
    # absolute errors: mean 2.5 and an interval inside the data's range that contains it
    errors = [1.0, 2.0, 3.0, 4.0] * 25
    iv = bootstrap_mean(errors)
    assert iv.estimate == pytest.approx(2.5) and 1.0 < iv.low < 2.5 < iv.high < 4.0
    # more items, narrower interval
    assert bootstrap_mean(errors * 4).high - bootstrap_mean(errors * 4).low < iv.high - iv.low


def test_weights_give_the_token_weighted_mean():
    # item losses 1 and 3 with 3 and 1 tokens: (1*3 + 3*1) / 4 = 1.5 (the unweighted mean is 2)
    iv = bootstrap_mean([1.0, 3.0] * 20, weights=[3, 1] * 20)
    assert iv.estimate == pytest.approx(1.5) and iv.low < 1.5 < iv.high


def test_paired_identical_models_give_zero():
    a = [0.1, 0.9, 0.4, 0.4, 2.0, 0.0] * 5
    iv = paired_difference(a, list(a))
    assert (iv.estimate, iv.low, iv.high, iv.n) == (0.0, 0.0, 0.0, 30) and not iv.excludes_zero


def test_a_clear_difference_excludes_zero_and_pairing_helps():
    # B is A plus a constant 0.2 on every item, A's spread is large: the paired difference is
    # exactly -0.2 with no width, while the two separate intervals overlap
    a = [float(i % 10) for i in range(100)]
    b = [x + 0.2 for x in a]
    d = paired_difference(a, b)
    assert d.estimate == pytest.approx(-0.2) and d.low == pytest.approx(-0.2) and d.high == pytest.approx(-0.2)
    assert d.excludes_zero
    ia, ib = bootstrap_mean(a), bootstrap_mean(b)
    assert ia.high > ib.low  # unpaired, the same data would look inconclusive
    # a noisy but clear difference: 0/1 outcomes, A right on 80 of 100 items, B on 40 of them
    a01 = [1] * 80 + [0] * 20
    b01 = [1] * 40 + [0] * 60
    d = paired_difference(a01, b01)
    assert d.estimate == pytest.approx(0.4) and d.low > 0 and d.excludes_zero


def test_reproducible_with_the_seed():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.25, 3.0] * 4
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert paired_difference(values, values[::-1], seed=3) == paired_difference(values, values[::-1], seed=3)
    assert bootstrap_mean(values, seed=3) != bootstrap_mean(values, seed=4)


def test_clear_errors_on_bad_input():
    with pytest.raises(ValueError, match="no items"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="no items"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="3 and 2 items"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="3 values but 2 weights"):
        bootstrap_mean([1, 2, 3], weights=[1, 1])
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_mean([1.0], resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0], level=95)
    with pytest.raises(ValueError, match="same items"):
        paired_available([1.0, None], [1.0])


def test_paired_available_keeps_items_both_models_parsed():
    a, b = paired_available([1.0, None, 3.0, 4.0], [2.0, 5.0, None, 1.0])
    assert (a, b) == ([1.0, 4.0], [2.0, 1.0])


def test_format():
    assert Interval(0.6451, 0.58, 0.712, 100).format() == "0.645 [0.580, 0.712] n=100"
    assert Interval(math.nan, math.nan, math.nan, 0).format() == "n/a (n=0)"
