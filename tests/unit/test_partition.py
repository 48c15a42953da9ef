import pytest

from fedlm.data import IidPartitioner, holdout_split


def test_iid_partition_is_disjoint_complete_and_balanced():
    parts = IidPartitioner(num_clients=7, seed=3).partition(100)
    assert sorted(i for part in parts for i in part) == list(range(100))
    assert {len(part) for part in parts} == {14, 15}


def test_iid_partition_depends_only_on_the_seed():
    assert IidPartitioner(4, seed=1).partition(50) == IidPartitioner(4, seed=1).partition(50)
    assert IidPartitioner(4, seed=1).partition(50) != IidPartitioner(4, seed=2).partition(50)


def test_iid_partition_needs_an_example_per_client():
    with pytest.raises(ValueError, match="cannot give 5 clients"):
        IidPartitioner(5).partition(3)


def test_holdout_split_sizes_and_seeding():
    kept, held = holdout_split(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(kept + held) == list(range(10))
    assert holdout_split(10, 0.2, seed=0) == (kept, held)
    assert holdout_split(10, 0.0, seed=0) == (list(range(10)), [])
