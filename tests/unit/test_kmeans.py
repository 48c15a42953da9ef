"""k-means against scikit-learn's on the same points, and its errors."""

import pytest
import torch
from sklearn.cluster import KMeans

from fedlm.core.kmeans import kmeans


def same_grouping(first: list[int], second: list[int]) -> bool:
    """Whether two assignments put the same points together (cluster numbers aside)."""
    return len(set(zip(first, second))) == len(set(first)) == len(set(second))


def test_kmeans_groups_points_as_scikit_learn_does():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0], [3.0, 3.0, 3.0]])
    points = torch.cat([centre + 0.6 * torch.randn(50, 3, generator=generator) for centre in centres])
    ours = kmeans(points, 4, seed=1).tolist()
    reference = KMeans(n_clusters=4, n_init=10, random_state=0).fit(points.numpy()).labels_.tolist()
    assert same_grouping(ours, reference)
    assert same_grouping(ours, [index // 50 for index in range(200)])  # the four blobs
    assert kmeans(points, 4, seed=1).tolist() == ours  # seeded


def test_kmeans_refuses_more_clusters_than_points():
    with pytest.raises(ValueError, match="cannot make 5 clusters of 4 points"):
        kmeans(torch.zeros(4, 2), 5, seed=0)
    assert kmeans(torch.zeros(4, 2), 2, seed=0).tolist() == [0, 0, 0, 0]  # identical points: one cluster used
