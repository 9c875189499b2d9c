"""Uncertainty of the numbers a run reports.

An evaluation scores the same prompts with the same noise every time, so two evaluations of one
run are *paired*: image k before and image k after. The gain and its standard error come from
the per-image differences d_k = after_k - before_k (k = 1..n),

    gain = mean_k d_k,    se = std_k(d_k) / sqrt(n)   (sample std, n - 1),

which is far smaller than the error of two unpaired means, because an image's prompt and noise
explain most of its reward. ``improved`` is the fraction of images whose reward rose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedGain:
    gain: float  # mean of after - before
    se: float  # its standard error
    improved: float  # fraction of pairs with after > before
    n: int

    @property
    def z(self) -> float:
        """gain / se (inf when every difference is the same non-zero value)."""
        if self.se > 0:
            return self.gain / self.se
        return math.copysign(math.inf, self.gain) if self.gain else 0.0

    def __str__(self) -> str:
        return (
            f"gain {self.gain:+.4f} ± {self.se:.4f} (standard error over {self.n} paired images, "
            f"{self.z:+.1f} SE), {100 * self.improved:.0f}% of images improved"
        )


def paired_gain(before: Sequence[float], after: Sequence[float]) -> PairedGain:
    """The paired gain of ``after`` over ``before`` (same prompts and noise, same order)."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need two equal lists of at least 2 paired values, got {len(before)} and {len(after)}")
    d = [float(b) - float(a) for a, b in zip(before, after)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return PairedGain(mean, sd / math.sqrt(n), sum(x > 0 for x in d) / n, n)
