"""k-means clustering of row vectors (Lloyd's iterations from a k-means++ start), seeded."""

from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, clusters: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """The cluster (0..clusters-1) of each row of `points` (n x d, float): centres start by
    k-means++ (Arthur and Vassilvitskii 2007) drawn with `seed`, then Lloyd's iterations until no
    row changes cluster (at most `iterations`). A cluster left empty keeps its centre."""
    if not 1 <= clusters <= len(points):
        raise ValueError(f"cannot make {clusters} clusters of {len(points)} points")
    generator = torch.Generator().manual_seed(seed)
    points = points.double()
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centres) < clusters:
        distance = torch.cdist(points, centres).min(dim=1).values ** 2
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=generator)]])
    assignment = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(iterations):
        for cluster in range(clusters):
            members = points[assignment == cluster]
            if len(members):
                centres[cluster] = members.mean(dim=0)
        updated = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment
