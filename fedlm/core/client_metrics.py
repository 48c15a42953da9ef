"""The distribution of a metric over clients, as federated NLP papers report it: mean,
example-weighted mean, worst client, 10th percentile and standard deviation."""

from __future__ import annotations

import numpy as np


def metric_distribution(values: list[float], weights: list[int], higher_is_better: bool = True) -> dict[str, float]:
    """Summary of one metric over clients. `weights` are the clients' test example counts; the
    10th percentile interpolates linearly (NumPy's default); std is the population std."""
    if not values:
        raise ValueError("no client values to summarize")
    array, weight = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "weighted_mean": float((array * weight).sum() / weight.sum()),
        "worst": float(array.min() if higher_is_better else array.max()),
        "p10": float(np.percentile(array, 10 if higher_is_better else 90)),
        "std": float(array.std()),
    }
