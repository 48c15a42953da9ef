def test_client_results_by_group_are_example_weighted_over_the_clients_that_report_a_metric():
    from fedlm.data.report import client_groups
    from fedlm.runtime.rounds import grouped_client_test

    partition = {
        "column": {"name": "language", "values": ["en", "zh"]},
        "clients": [
            {"client": "a", "examples": 9, "column_counts": {"en": 8, "zh": 1}},
            {"client": "b", "examples": 5, "column_counts": {"en": 5, "zh": 0}},
            {"client": "c", "examples": 4, "column_counts": {"en": 2, "zh": 2}},  # a tie: the first value
            {"client": "d", "examples": 6, "column_counts": {"en": 0, "zh": 6}},
        ],
    }
    groups = client_groups(partition)
    assert groups == {"a": "en", "b": "en", "c": "en", "d": "zh"}
    client_test = [
        {"client": "a", "num_examples": 3, "f1": 0.5, "f1_PER": 1.0},
        {"client": "b", "num_examples": 1, "f1": 0.9},
        {"client": "d", "num_examples": 2, "f1": 0.2, "f1_PER": 0.4},
    ]
    assert grouped_client_test(client_test, groups) == {
        "en": {"clients": 2, "num_examples": 4, "f1": (3 * 0.5 + 0.9) / 4, "f1_PER": 1.0},
        "zh": {"clients": 1, "num_examples": 2, "f1": 0.2, "f1_PER": 0.4},
    }
    assert client_groups({"column": None, "clients": []}) == {} and client_groups(None) == {}
