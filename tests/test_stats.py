"""The paired gain of two evaluations, against a hand computation."""

from __future__ import annotations

import math

import pytest

from rlft.stats import mean_se, paired_gain, t_interval


def test_paired_gain_by_hand():
    before = [0.5, 0.2, 0.9, 0.4]
    after = [0.7, 0.1, 1.0, 0.8]  # differences 0.2, -0.1, 0.1, 0.4: mean 0.15
    g = paired_gain(before, after)
    sd = math.sqrt(((0.05) ** 2 + (0.25) ** 2 + (0.05) ** 2 + (0.25) ** 2) / 3)
    assert g.gain == pytest.approx(0.15, abs=1e-12) and g.se == pytest.approx(sd / 2, abs=1e-12)
    assert g.improved == 0.75 and g.n == 4 and g.z == pytest.approx(0.15 / (sd / 2))
    assert "gain +0.1500 ± 0.1041 (standard error over 4 paired images, +1.4 SE), 75% of images improved" == str(g)
    # a constant shift has no spread: infinitely many standard errors
    assert paired_gain([0.0, 1.0], [0.5, 1.5]).z == math.inf
    with pytest.raises(ValueError, match="two equal lists"):
        paired_gain([1.0], [2.0])


def test_paired_gain_over_prompts_by_hand():
    # two prompts x 2 images: prompt means before (0.35, 0.65), after (0.4, 0.9): differences 0.05, 0.25
    before, after, groups = [0.5, 0.2, 0.9, 0.4], [0.7, 0.1, 1.0, 0.8], ["p", "p", "q", "q"]
    g = paired_gain(before, after, groups)
    assert g.n == 2 and g.gain == pytest.approx(0.15, abs=1e-12) and g.improved == 1.0
    assert g.se == pytest.approx(math.sqrt(2 * 0.1**2) / math.sqrt(2), abs=1e-12)
    assert "over 2 paired prompts" in str(g) and "100% of prompts improved" in str(g)
    # a sub-score that does not apply (NaN) leaves its prompt out
    nan = math.nan
    g = paired_gain([nan, nan, 0.0, 1.0, 0.5, 0.5], [nan, nan, 1.0, 1.0, 0.5, 1.0], [0, 0, 1, 1, 2, 2])
    assert g.n == 2 and g.gain == pytest.approx(0.375)


def test_mean_se_and_t_interval_by_hand():
    mean, se, n = mean_se([1.0, 3.0, 2.0, 6.0, math.nan], ["a", "a", "b", "b", "c"])  # prompt means 2 and 4
    assert (mean, n) == (3.0, 2) and se == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
    mean, half, n = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{4, 0.975} = 2.7764451, std = sqrt(2.5)
    assert (mean, n) == (3.0, 5) and half == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(t_interval([1.0])[1]) and math.isnan(mean_se([1.0])[1])
