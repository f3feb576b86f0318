"""Confidence intervals for benchmark scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_interval(
    scores: Sequence[float], n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores`, in the scores' own units.

    Deterministic for a given seed, so a result file can be regenerated bit for bit.
    """
    values = np.asarray(list(scores), dtype=np.float64)
    if values.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    # Resample in chunks: VQAv2 has ~200k questions, and 1000 x 200k indices at once is 1.6 GB.
    rows = max(1, 4_000_000 // values.size)
    parts = []
    for start in range(0, n_resamples, rows):
        picks = rng.integers(0, values.size, size=(min(rows, n_resamples - start), values.size))
        parts.append(values[picks].mean(axis=1))
    means = np.concatenate(parts)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def bootstrap_statistic(
    groups: Sequence[np.ndarray],
    statistic: Callable[[list[np.ndarray]], float],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of one or more groups of rows.

    Each group is resampled on its own (a stratified bootstrap), so a statistic averaged over fixed
    splits, such as POPE's mean F1 over its three splits, keeps every split at its real size.
    """
    groups = [np.asarray(g) for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    values = [
        statistic([g[rng.integers(0, len(g), size=len(g))] for g in groups]) for _ in range(n_resamples)
    ]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [tail, 1.0 - tail])
    return (float(low), float(high))
