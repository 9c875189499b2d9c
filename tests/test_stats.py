"""The paired gain of two evaluations, against a hand computation."""

from __future__ import annotations

import math

import pytest

from rlft.stats import paired_gain


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
