"""Means, spreads and paired differences over seeds, without SciPy.

A 95 % interval of a paired difference uses Student's t with n − 1 degrees of
freedom: mean ± t(0.975, n − 1) · s / √n, s the sample standard deviation
(n − 1 in the denominator) of the per-seed differences. The t quantile is
found by bisection on the distribution function, computed by Simpson's rule
on the density (accurate to about 1e-9 for the quantiles used here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with n − 1 in the denominator; None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _t_density(t: float, dof: int) -> float:
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    return math.exp(log_norm - (dof + 1) / 2 * math.log1p(t * t / dof))


def t_cdf(t: float, dof: int, intervals: int = 4000) -> float:
    """P(T ≤ t) for Student's t with ``dof`` degrees of freedom (Simpson's rule)."""
    if t < 0:
        return 1.0 - t_cdf(-t, dof, intervals)
    h = t / intervals
    total = _t_density(0.0, dof) + _t_density(t, dof)
    for i in range(1, intervals):
        total += (4 if i % 2 else 2) * _t_density(i * h, dof)
    return 0.5 + total * h / 3


def t_quantile(p: float, dof: int) -> float:
    """The t with P(T ≤ t) = p, for 0.5 < p < 1."""
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """a − b over the seeds both have: the mean, its 95 % interval and the seeds."""

    mean: float
    low: float | None
    high: float | None
    seeds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired_difference(
    a: dict[int, float], b: dict[int, float], confidence: float = 0.95
) -> PairedDifference | None:
    """a[seed] − b[seed] over the seeds in both (same seed: same initial weights and
    data order); None when no seed is shared, no interval for a single pair."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    differences = [a[s] - b[s] for s in seeds]
    m = mean(differences)
    if len(seeds) < 2:
        return PairedDifference(m, None, None, seeds)
    half = t_quantile(0.5 + confidence / 2, len(seeds) - 1) * sample_std(differences)
    half /= math.sqrt(len(seeds))
    return PairedDifference(m, m - half, m + half, seeds)
