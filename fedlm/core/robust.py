"""Robust aggregates of client deltas: they bound what a few broken or malicious clients can do.

Each works coordinate block by coordinate block, so memory stays at one block of K values per
coordinate instead of a K x P matrix.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod

import torch

from fedlm.core.update import ClientUpdate

BLOCK = 1 << 17  # coordinates per block: K rows of a block stay in cache
GRAM_BLOCK = 1 << 18  # coordinates per matrix product in Krum


class RobustAggregate(ABC):
    """Maps the round's client deltas to one aggregate delta."""

    @abstractmethod
    def __call__(self, updates: list[ClientUpdate]) -> torch.Tensor: ...


@functools.cache
def sorting_network(count: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for `count` inputs.

    Built for the next power of two; comparators that touch a position >= count are dropped,
    which is exact: padding with +inf, a comparator against a padded position never moves a value.
    """
    size = 1 << max(count - 1, 0).bit_length()
    pairs = []
    span = 1
    while span < size:
        step = span
        while step >= 1:
            for offset in range(step % span, size - step, 2 * step):
                for i in range(min(step, size - offset - step)):
                    low, high = offset + i, offset + i + step
                    if low // (2 * span) == high // (2 * span) and high < count:
                        pairs.append((low, high))
            step //= 2
        span *= 2
    return tuple(pairs)


@functools.cache
def selection_network(count: int, outputs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of `sorting_network(count)` that can affect the `outputs` positions."""
    needed, kept = set(outputs), []
    for low, high in reversed(sorting_network(count)):
        if low in needed or high in needed:
            kept.append((low, high))
            needed |= {low, high}
    return tuple(reversed(kept))


def _ranked_blocks(updates: list[ClientUpdate], ranks, total: torch.Tensor | None = None):
    """Yield (start, end, rows) per block of coordinates, where rows[r] for r in `ranks` holds
    every coordinate's r-th smallest client value (and `total`, if given, the sum over clients).
    A comparator network of elementwise min/max over whole blocks, in place in one buffer, is
    several times faster than torch.sort along K."""
    count = len(updates)
    pairs = selection_network(count, tuple(ranks))
    size = updates[0].delta.numel()
    buffer = torch.empty(count + 1, min(BLOCK, size), dtype=updates[0].delta.dtype)
    for start in range(0, size, BLOCK):
        end = min(start + BLOCK, size)
        rows = [buffer[index, : end - start] for index in range(count + 1)]
        for row, update in zip(rows, updates):
            row.copy_(update.delta[start:end])
        if total is not None:
            torch.sum(buffer[:count, : end - start], dim=0, out=total[start:end])
        spare = rows[count]
        for low, high in pairs:
            torch.minimum(rows[low], rows[high], out=spare)
            torch.maximum(rows[low], rows[high], out=rows[high])
            rows[low], spare = spare, rows[low]
        yield start, end, rows


class CoordinateMedian(RobustAggregate):
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498); with an even number of clients
    the mean of the two middle values (NumPy's and Flower's convention)."""

    def __call__(self, updates: list[ClientUpdate]) -> torch.Tensor:
        count = len(updates)
        middle = range(count // 2, count // 2 + 1) if count % 2 else range(count // 2 - 1, count // 2 + 1)
        out = torch.empty_like(updates[0].delta)
        for start, end, rows in _ranked_blocks(updates, middle):
            if count % 2:
                out[start:end] = rows[count // 2]
            else:
                torch.add(rows[count // 2 - 1], rows[count // 2], out=out[start:end]).mul_(0.5)
        return out


class TrimmedMean(RobustAggregate):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the int(beta * K) largest and smallest
    values of each coordinate, average the rest (scipy's trim_mean, as Flower's FedTrimmedAvg)."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def __call__(self, updates: list[ClientUpdate]) -> torch.Tensor:
        count = len(updates)
        cut = int(self.beta * count)
        out = torch.empty_like(updates[0].delta)
        # the kept values' sum is the total minus the `cut` smallest and largest, which needs a
        # smaller selection network than ranking all the kept values
        extremes = [*range(cut), *range(count - cut, count)]
        for start, end, rows in _ranked_blocks(updates, extremes, total=out):
            block = out[start:end]
            for row in (rows[rank] for rank in extremes):
                block.sub_(row)
            block.div_(count - 2 * cut)
        return out


class Krum(RobustAggregate):
    """Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries",
    NeurIPS). Each client's score is the sum of squared distances to its K - f - 2 nearest
    neighbours (f = `num_malicious`); Krum returns the delta with the lowest score, Multi-Krum
    (`to_keep` = m > 1) the plain mean of the m lowest-scoring deltas, as in the paper.
    Pairwise distances come from one Gram matrix, accumulated block by block in float64."""

    def __init__(self, num_malicious: int = 0, to_keep: int = 1) -> None:
        if num_malicious < 0 or to_keep < 1:
            raise ValueError(f"Krum needs num_malicious >= 0 and to_keep >= 1, got {num_malicious} and {to_keep}")
        self.num_malicious = num_malicious
        self.to_keep = to_keep

    def scores(self, updates: list[ClientUpdate]) -> torch.Tensor:
        count = len(updates)
        gram = torch.zeros(count, count, dtype=torch.float64)
        size = updates[0].delta.numel()
        for start in range(0, size, GRAM_BLOCK):
            block = torch.stack([update.delta[start : start + GRAM_BLOCK] for update in updates]).double()
            gram += block @ block.T
        squared_norms = gram.diagonal()
        distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp_(min=0)
        distances.fill_diagonal_(float("inf"))
        neighbours = max(1, count - self.num_malicious - 2)
        return distances.sort(dim=1).values[:, :neighbours].sum(dim=1)

    def __call__(self, updates: list[ClientUpdate]) -> torch.Tensor:
        chosen = self.scores(updates).argsort(stable=True)[: min(self.to_keep, len(updates))].tolist()
        out = torch.zeros_like(updates[0].delta)
        for index in chosen:
            out.add_(updates[index].delta, alpha=1 / len(chosen))
        return out


def clip_to_norm(updates: list[ClientUpdate], max_norm: float) -> list[ClientUpdate]:
    """Norm bounding (Sun et al. 2019, arXiv:1911.07963): scale each delta to L2 norm <= max_norm."""
    clipped = []
    for update in updates:
        norm = float(update.delta.norm())
        if norm > max_norm:
            update = dataclasses.replace(update, delta=update.delta * (max_norm / norm))
        clipped.append(update)
    return clipped


ROBUST_AGGREGATES: dict[str, type[RobustAggregate]] = {
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
}
