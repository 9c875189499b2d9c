"""Uncertainty of the numbers a run reports.

An evaluation scores the same prompts with the same noise every time, so two evaluations of one
run are *paired*: image k before and image k after. The images of one prompt (its seeds) are not
independent draws, so the unit of every error below is the prompt: the per-prompt means

    b_p = mean_{images k of p} before_k,    a_p = mean_{images k of p} after_k,    d_p = a_p - b_p

over the P prompts give

    gain = mean_p d_p,    se = std_p(d_p) / sqrt(P)   (sample std, P - 1),

which is far smaller than the error of two unpaired means, because a prompt and its noise
explain most of an image's reward. ``improved`` is the fraction of prompts whose mean rose.
Without groups every image is its own prompt. Sub-scores that do not apply to a prompt are NaN
and are left out (P counts the prompts they apply to).

Across seeds (``rlft.report``): a method's mean over S seeds has the 95% confidence interval
mean ± t_{S-1, 0.975} std / sqrt(S); a paired method difference uses the per-seed differences.
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
    unit: str = "images"
    before: float = math.nan  # mean of the paired values before

    @property
    def z(self) -> float:
        """gain / se (inf when every difference is the same non-zero value)."""
        if self.se > 0:
            return self.gain / self.se
        return math.copysign(math.inf, self.gain) if self.gain else 0.0

    def __str__(self) -> str:
        return (
            f"gain {self.gain:+.4f} ± {self.se:.4f} (standard error over {self.n} paired {self.unit}, "
            f"{self.z:+.1f} SE), {100 * self.improved:.0f}% of {self.unit} improved"
        )


def group_means(values: Sequence[float], groups: Sequence | None = None) -> list[float]:
    """Mean of each group's non-NaN values, in order of first appearance (groups with none are dropped)."""
    if groups is None:
        return [float(v) for v in values if not math.isnan(float(v))]
    if len(groups) != len(values):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    sums: dict = {}
    for v, g in zip(values, groups):
        v = float(v)
        if not math.isnan(v):
            s, c = sums.get(g, (0.0, 0))
            sums[g] = (s + v, c + 1)
    return [s / c for s, c in sums.values()]


def _mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with n - 1, n); NaN where undefined (std for n < 2)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)), n


def mean_se(values: Sequence[float], groups: Sequence | None = None) -> tuple[float, float, int]:
    """(mean, standard error, n) over per-group means (NaN where no value; se NaN for n < 2)."""
    mean, sd, n = _mean_sd(group_means(values, groups))
    return mean, sd / math.sqrt(n) if n else math.nan, n


def paired_gain(before: Sequence[float], after: Sequence[float], groups: Sequence | None = None) -> PairedGain:
    """The paired gain of ``after`` over ``before`` (same prompts and noise, same order); with ``groups``
    (the prompt of each value) the pairs are the per-prompt means."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(f"need two equal lists of at least 2 paired values, got {len(before)} and {len(after)}")
    both = [
        (float(b), float(a), g)
        for b, a, g in zip(before, after, groups if groups is not None else range(len(before)))
        if not (math.isnan(float(b)) or math.isnan(float(a)))
    ]
    keys = [g for _, _, g in both]
    b_p = group_means([b for b, _, _ in both], keys)
    d = [a - b for a, b in zip(group_means([a for _, a, _ in both], keys), b_p)]
    mean, sd, n = _mean_sd(d)
    if n < 2:
        raise ValueError(f"need at least 2 paired groups with values, got {n}")
    unit = "prompts" if groups is not None else "images"
    return PairedGain(mean, sd / math.sqrt(n), sum(x > 0 for x in d) / n, n, unit, sum(b_p) / n)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the ``level`` t confidence interval, n) of independent values (e.g. one per
    seed); half-width NaN for n < 2."""
    from scipy.stats import t

    mean, sd, n = _mean_sd([float(x) for x in values if not math.isnan(float(x))])
    if n < 2:
        return mean, math.nan, n
    return mean, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n
