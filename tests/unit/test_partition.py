"""Partitioners: statistics, not just shapes."""

import numpy as np
import pytest

from fedlm.data import holdout_split
from fedlm.data.partition import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    QuantityPartitioner,
    ShardsPartitioner,
)
from fedlm.errors import ConfigError

LABELS = np.random.default_rng(0).integers(0, 5, 10_000).tolist()  # 5 balanced labels


def label_shares(partition, labels, num_labels=5):
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[part], minlength=num_labels) / len(part) for part in partition])


def assert_exact_cover(partition, n):
    flat = np.concatenate([np.asarray(part, dtype=np.int64) for part in partition])
    assert len(flat) == n and np.array_equal(np.sort(flat), np.arange(n)), "every example in exactly one client"
    assert all(part == sorted(part) for part in partition)


@pytest.mark.parametrize(
    "partitioner",
    [
        IidPartitioner(7, seed=1),
        DirichletPartitioner(20, alpha=0.5, min_size=5, seed=1),
        QuantityPartitioner(20, "dirichlet", alpha=0.5, seed=1),
        QuantityPartitioner(20, "power_law", exponent=1.5, seed=1),
        ShardsPartitioner(10, labels_per_client=2, seed=1),
        NaturalPartitioner("label"),
    ],
    ids=lambda p: type(p).__name__,
)
def test_exact_cover_and_same_seed_same_partition(partitioner):
    partition = partitioner.partition(LABELS)
    assert_exact_cover(partition, len(LABELS))
    assert partition == partitioner.partition(LABELS)


@pytest.mark.parametrize("make", [IidPartitioner, lambda n, seed: DirichletPartitioner(n, 0.5, seed=seed)])
def test_another_seed_gives_another_partition(make):
    assert make(10, seed=1).partition(LABELS) != make(10, seed=2).partition(LABELS)


def test_iid_sizes_differ_by_at_most_one():
    assert {len(part) for part in IidPartitioner(7, seed=3).partition(range(100))} == {14, 15}


def test_dirichlet_small_alpha_gives_clients_dominated_by_one_label():
    shares = label_shares(DirichletPartitioner(50, alpha=0.1, seed=0).partition(LABELS), LABELS)
    assert np.median(shares.max(axis=1)) > 0.8


def test_dirichlet_large_alpha_is_near_iid():
    global_share = np.bincount(LABELS) / len(LABELS)

    def mean_total_variation(alpha):
        shares = label_shares(DirichletPartitioner(20, alpha=alpha, seed=0).partition(LABELS), LABELS)
        return np.abs(shares - global_share).sum(axis=1).mean() / 2

    assert mean_total_variation(1000) < 0.06
    assert mean_total_variation(0.1) > 0.5


def test_dirichlet_min_size_holds_even_when_sampling_leaves_clients_empty():
    partition = DirichletPartitioner(500, alpha=0.05, min_size=8, seed=0).partition(LABELS)
    assert min(len(part) for part in partition) >= 8
    assert_exact_cover(partition, len(LABELS))


def test_quantity_power_law_spread_matches_the_exponent():
    # sizes - min_size are proportional to r^-exponent: largest / smallest = N^exponent = 10^1.5
    partition = QuantityPartitioner(10, "power_law", exponent=1.5, min_size=1, seed=0).partition(range(100_001))
    extra = np.array(sorted(len(part) - 1 for part in partition))
    assert extra[-1] / extra[0] == pytest.approx(10**1.5, rel=0.01)


@pytest.mark.parametrize("alpha", [1.0, 100.0])
def test_quantity_dirichlet_spread_matches_theory(alpha):
    # Dirichlet(alpha) shares over N clients have coefficient of variation sqrt((N - 1) / (N alpha + 1))
    n_clients = 400
    partition = QuantityPartitioner(n_clients, "dirichlet", alpha=alpha, seed=0).partition(range(1_000_000))
    sizes = np.array([len(part) for part in partition])
    assert sizes.std() / sizes.mean() == pytest.approx(np.sqrt((n_clients - 1) / (n_clients * alpha + 1)), rel=0.15)


def test_quantity_skew_keeps_labels_iid():
    shares = label_shares(QuantityPartitioner(10, "power_law", exponent=1.0, seed=0).partition(LABELS), LABELS)
    assert np.abs(shares - 0.2).max() < 0.12


def test_shards_give_each_client_exactly_k_labels():
    partition = ShardsPartitioner(12, labels_per_client=2, seed=0).partition(LABELS)
    labels = np.asarray(LABELS)
    assert all(len(set(labels[part].tolist())) == 2 for part in partition)


def test_natural_partition_groups_by_value_and_names_clients():
    values = ["en", "zh", "en", "fr", "zh", "en"]
    partitioner = NaturalPartitioner("language")
    assert partitioner.partition(values) == [[0, 2, 5], [3], [1, 4]]
    assert partitioner.client_names(values) == ["en", "fr", "zh"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DirichletPartitioner(5, alpha=0), "alpha must be > 0"),
        (lambda: DirichletPartitioner(5, alpha=-1), "alpha must be > 0"),
        (lambda: QuantityPartitioner(5, "zipf"), "'dirichlet' or 'power_law'"),
        (lambda: ShardsPartitioner(5, labels_per_client=0), "labels_per_client must be >= 1"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_more_clients_than_examples_and_impossible_shards():
    with pytest.raises(ConfigError, match="cannot give 20 clients at least 1 example"):
        IidPartitioner(20).partition(range(10))
    with pytest.raises(ConfigError, match="at least 3 example.*use at most 3 clients"):
        DirichletPartitioner(4, alpha=1, min_size=3).partition(range(10))
    with pytest.raises(ConfigError, match="2 clients x 2 labels cannot cover all 5 labels"):
        ShardsPartitioner(2, labels_per_client=2).partition(LABELS)
    with pytest.raises(ConfigError, match="only 5 labels"):
        ShardsPartitioner(2, labels_per_client=6).partition(LABELS)


def test_holdout_split_sizes_and_seeding():
    kept, held = holdout_split(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(kept + held) == list(range(10))
    assert holdout_split(10, 0.2, seed=0) == (kept, held)
    assert holdout_split(10, 0.0, seed=0) == (list(range(10)), [])
