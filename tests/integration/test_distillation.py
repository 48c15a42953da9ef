"""Federated distillation on tiny models: clients of two architectures, a student, a public set."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import build_tiny_model_folder, make_records, read_metrics
from fedlm import FedClient, FedServer
from fedlm.algorithms import EnsembleDistillation, FederatedDistillation
from fedlm.config import parse_config
from fedlm.core.distillation import soften
from fedlm.core.privacy import DifferentialPrivacy
from fedlm.data.partition import DirichletPartitioner
from fedlm.errors import ConfigError, DatasetError, FedlmError
from fedlm.models.federated import set_federated_vector
from fedlm.protocol import FitRes
from fedlm.runtime import build_simulation, run_federation
from fedlm.tasks.classification import evaluate_model, load_classifier
from fedlm.tasks.distillation import predict_logits

RECORDS = make_records(900, seed=0)
TRAIN, PUBLIC, VALIDATION = RECORDS[:300], RECORDS[300:600], RECORDS[600:]
OPTIONS = {"learning_rate": 3e-3, "max_length": 32}
STUDENT = {"temperature": 2.0, "learning_rate": 1e-2, "epochs": 5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {"two": build_tiny_model_folder(root / "two"), "four": build_tiny_model_folder(root / "four", layers=4)}


def dirichlet_clients(folders, seed: int = 21) -> list[FedClient]:
    """Three clients on Dirichlet(0.5) label skew (with seed 21 each has at most 2 examples of
    one of the three topics), a 2-layer, a 4-layer and a 2-layer BERT."""
    labels = [record["label"] for record in TRAIN]
    parts = DirichletPartitioner(num_clients=3, alpha=0.5, seed=seed).partition(labels)
    architectures = ["two", "four", "two"]
    return [
        FedClient([TRAIN[i] for i in part], load_classifier(str(folders[arch]), 3, seed=index), name=f"{arch}-{index}", **OPTIONS)
        for index, (part, arch) in enumerate(zip(parts, architectures))
    ]  # fmt: skip


def distillation(folders, **options) -> FederatedDistillation:
    student = load_classifier(str(folders["two"]), 3, seed=9)
    return FederatedDistillation([record["text"] for record in PUBLIC], student, **{**STUDENT, **options})


def test_the_student_beats_every_local_only_client_on_label_skewed_data(folders):
    clients = dirichlet_clients(folders)
    assert [len(client.model.bert.encoder.layer) for client in clients] == [2, 4, 2]
    server = FedServer(clients, algorithm=distillation(folders, learning_rate=3e-3), seed=0)
    history = server.fit(rounds=2, local_epochs=3, validation=VALIDATION)
    validation = server.encode_dataset(VALIDATION)
    # without a digest step the clients' models only ever saw their own data: local-only models
    local_only = [evaluate_model(c.model, validation, 16, 0)["accuracy"] for c in clients]
    student = history[-1]["val_accuracy"]
    assert student > max(local_only) + 0.15, (student, local_only)
    # what travelled: the outputs on the public set, public examples x classes float32 values each
    assert history[-1]["bytes_up"] < 3 * (len(PUBLIC) * 3 * 4 + 2_000)
    assert history[-1]["bytes_up"] > 3 * len(PUBLIC) * 3 * 4


def test_clients_digest_the_consensus_and_can_send_probabilities(folders):
    plain = dirichlet_clients(folders)
    FedServer(plain, algorithm=distillation(folders), seed=0).fit(rounds=2, local_epochs=1)
    digesting = dirichlet_clients(folders)
    server = FedServer(
        digesting, algorithm=distillation(folders, digest_epochs=1, client_output="probabilities"), seed=0
    )
    history = server.fit(rounds=2, local_epochs=1)
    assert history[1]["bytes_down"] > history[0]["bytes_down"] + len(PUBLIC) * 3 * 4  # the soft labels went down
    for with_digest, without in zip(digesting, plain):  # round 1 is the same, round 2 digested first
        assert not torch.equal(with_digest.get_parameters(), without.get_parameters())
    assert server.algorithm.soft_labels.sum(dim=-1).allclose(torch.ones(len(PUBLIC), dtype=torch.float64))


def test_a_client_with_bad_outputs_is_dropped_and_named(folders, caplog):
    clients = dirichlet_clients(folders)
    honest_fit = clients[1].fit
    answers = iter([lambda ins: FitRes(torch.full((len(PUBLIC) * 3,), float("nan")), 10),
                    lambda ins: FitRes(torch.zeros(7), 10)])  # fmt: skip
    clients[1].fit = lambda ins: next(answers)(ins)
    server = FedServer(clients, algorithm=distillation(folders), seed=0)
    history = server.fit(rounds=2, local_epochs=1)
    assert [record["clients"] for record in history] == [2, 2]
    assert "NaN" in history[0]["dropped"][0]["reason"] and history[0]["dropped"][0]["client"] == "four-1"
    assert "shape [7]" in history[1]["dropped"][0]["reason"]
    assert "client four-1 dropped" in caplog.text
    clients[1].fit = honest_fit


def test_a_client_with_another_public_set_is_dropped_saying_why(folders):
    clients = dirichlet_clients(folders)
    server = FedServer(clients, algorithm=distillation(folders), seed=0)
    clients[2].public_texts = clients[2].public_texts[:-1]
    record = server.fit(rounds=1, local_epochs=1)[0]
    assert record["clients"] == 2
    assert "client two-2: its public set (299 texts" in record["dropped"][0]["reason"]


def test_bad_distillation_input_is_a_clear_error(folders, tmp_path):
    clients = dirichlet_clients(folders)
    binary_student = load_classifier(str(folders["two"]), 2, seed=0)
    with pytest.raises(DatasetError, match=r"the student: labels \['tech'\] fall outside the model's 2 classes"):
        FedServer(clients, algorithm=FederatedDistillation(["a text"], binary_student))
    no_text = tmp_path / "public.csv"
    no_text.write_text("score,label\n3,sport\n")
    with pytest.raises(
        DatasetError, match=r"public set: .*public.csv has no text column; its columns are \[.label., .score.\]"
    ):
        FederatedDistillation(no_text, binary_student)
    with pytest.raises(ConfigError, match="weighting must be one of"):
        FederatedDistillation(["a"], binary_student, weighting="votes")
    with pytest.raises(FedlmError, match="trains with fit"):
        FedServer(clients, algorithm=distillation(folders)).aggregate_parameters()


def test_ensemble_distillation_moves_the_average_towards_the_clients_ensemble(folders):
    """FedDF: after FedAvg, the refined model is closer (KL on the public set) to the ensemble
    of the clients' models than the plain average was."""
    model = load_classifier(str(folders["two"]), 3, seed=0)
    clients = [FedClient(TRAIN[i::3], model, name=f"c{i}", **OPTIONS) for i in range(3)]
    refine = EnsembleDistillation([record["text"] for record in PUBLIC], **STUDENT)
    server = FedServer(clients, algorithm=refine, seed=0)
    captured = {}
    original = refine.refine

    def spy(model, previous, updates, seed, round_number):
        captured.update(previous=previous, averaged=model.params, updates=updates)
        return original(model, previous, updates, seed, round_number)

    refine.refine = spy
    record = server.fit(rounds=1, local_epochs=1)[0]
    assert record["ensemble_distillation_loss"] >= 0
    public = refine.public.encoded(server.global_model, with_labels=False)

    def probabilities(vector):
        probe = server.get_model()
        set_federated_vector(probe, vector)
        return soften(predict_logits(probe, public, 16, 0), STUDENT["temperature"])

    total = sum(u.num_examples for u in captured["updates"])
    ensemble = sum(u.num_examples / total * probabilities(captured["previous"] + u.delta) for u in captured["updates"])

    def kl(student):
        return float((ensemble * (ensemble / student).log()).sum(dim=-1).mean())

    assert kl(probabilities(server.global_params)) < kl(probabilities(captured["averaged"]))


def test_distillation_runs_from_config_with_two_architectures(config_data_factory, folders):
    algorithm = {
        "kind": "distillation", "temperature": 2.0, "learning_rate": 1e-2, "epochs": 2,
        "public_data": {"held_out": 0.25}, "client_models": [str(folders["two"]), str(folders["four"])],
    }  # fmt: skip
    data = config_data_factory(num_clients=3, rounds=1, algorithm=algorithm)
    data["data"]["partition"] = {"kind": "dirichlet", "num_clients": 3, "alpha": 0.5}
    simulation = build_simulation(parse_config(data))
    server = simulation.server
    layers = [len(client.model.bert.encoder.layer) for client in server.clients]
    assert layers == [2, 4, 2] and server.clients[0].model is server.clients[2].model  # one replica per model
    assert len(server.algorithm.public.texts) == 75  # a quarter of the 300 training examples
    record = server.fit(rounds=1, validation=simulation.validation)[0]
    assert record["clients"] == 3 and "student_loss" in record and "val_accuracy" in record
    with pytest.raises(ConfigError, match="algorithm distillation trains whole client models; remove peft"):
        parse_config({**data, "peft": {"method": "lora"}})
    with pytest.raises(ConfigError, match="give exactly one of 'dataset'"):
        parse_config({**data, "algorithm": {**algorithm, "public_data": {}}})


def test_a_resumed_distillation_run_equals_an_uninterrupted_one(config_data_factory, folders, tmp_path):
    """The student, the clients' own models and the last soft labels (for the digest) all come
    back from the checkpoint."""
    algorithm = {
        "kind": "distillation", "epochs": 1, "learning_rate": 1e-2, "digest_epochs": 1,
        "public_data": {"held_out": 0.2}, "client_models": [str(folders["two"]), str(folders["four"])],
    }  # fmt: skip
    data = config_data_factory(num_clients=2, rounds=2, algorithm=algorithm)
    whole = parse_config({**data, "output_dir": str(tmp_path / "whole")})
    run_federation(build_simulation(whole))
    first = parse_config({**data, "output_dir": str(tmp_path / "parts"), "federation": {"rounds": 1}})
    run_federation(build_simulation(first))
    second = parse_config({**data, "output_dir": str(tmp_path / "parts")})
    run_federation(build_simulation(second), resume=True)
    whole_metrics, parts_metrics = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [r.get("val_accuracy") for r in whole_metrics] == [r.get("val_accuracy") for r in parts_metrics]
    assert whole_metrics[-1]["student_loss"] == parts_metrics[-1]["student_loss"]


def test_clients_probabilities_can_be_clipped_noised_and_accounted(config_data_factory, folders):
    algorithm = {
        "kind": "distillation", "learning_rate": 1e-2, "epochs": 1, "client_output": "probabilities",
        "public_data": {"held_out": 0.25},
    }  # fmt: skip
    dp = {"noise_multiplier": 1.0, "clip_norm": 5.0}
    data = config_data_factory(num_clients=3, rounds=2, algorithm=algorithm, dp=dp)
    server = build_simulation(parse_config(data)).server
    history = server.fit(rounds=2)
    assert history[1]["epsilon"] > history[0]["epsilon"] > 0
    soft = server.algorithm.soft_labels
    assert (soft >= 0).all() and soft.sum(dim=-1).allclose(torch.ones(len(soft), dtype=soft.dtype))
    with pytest.raises(ConfigError, match="set algorithm.client_output: probabilities"):
        parse_config({**data, "algorithm": {**algorithm, "client_output": "logits"}})
    with pytest.raises(ConfigError, match="dp with algorithm.soft_labels_cover own_labels: dp releases only"):
        parse_config({**data, "algorithm": {**algorithm, "soft_labels_cover": "own_labels"}})


EXPERT_TOPICS = ["business", "politics", "sport", "tech"]


def expert_clients(folders) -> list[FedClient]:
    """A news desk that knows business, politics and sport, a tech desk that knows politics,
    sport and tech: label sets that overlap in two labels, each with one label of its own."""
    desks = {"news-desk": ["business", "politics", "sport"], "tech-desk": ["politics", "sport", "tech"]}
    return [
        FedClient(make_records(150, 11 + index, labels), load_classifier(str(folders["two"]), 4, seed=index),
                  name=name, **OPTIONS)
        for index, (name, labels) in enumerate(desks.items())
    ]  # fmt: skip


def experts_distillation(folders, **options) -> FederatedDistillation:
    public = [record["text"] for record in make_records(300, 3, EXPERT_TOPICS)]
    student = load_classifier(str(folders["two"]), 4, seed=9)
    return FederatedDistillation(public, student, **{**STUDENT, "learning_rate": 3e-3, **options})


def test_experts_on_different_labels_distil_into_a_student_that_beats_each_of_them(folders, caplog):
    """Over the union of the experts' labels, with soft labels restricted to each expert's own,
    the student knows all four topics; averaging the experts' full distributions instead lets each
    expert outvote the other's own topic (it gives almost nothing to a label it never saw)."""
    caplog.set_level(logging.INFO, logger="fedlm")
    union_validation = make_records(300, 4, EXPERT_TOPICS)
    accuracy = {}
    for cover in ("all", "own_labels"):
        clients = expert_clients(folders)
        server = FedServer(clients, algorithm=experts_distillation(folders, soft_labels_cover=cover), seed=0)
        accuracy[cover] = server.fit(rounds=2, local_epochs=3, validation=union_validation)[-1]["val_accuracy"]
    validation = server.encode_dataset(union_validation)
    experts = [evaluate_model(client.model, validation, 16, 0)["accuracy"] for client in clients]
    assert max(experts) < 0.8  # each misses the topic only the other knows (a quarter of the texts)
    assert accuracy["own_labels"] > max(experts) + 0.15, (accuracy, experts)
    assert accuracy["own_labels"] > accuracy["all"] + 0.15, (accuracy, experts)
    assert server.global_model.metadata.label2id == {"business": 0, "politics": 1, "sport": 2, "tech": 3}
    assert (
        "union of the clients' labels (4: business, politics, sport, tech); each client's soft labels cover its own: "
        "news-desk: business, politics, sport; tech-desk: politics, sport, tech" in caplog.text
    )


def test_experts_digest_the_students_prediction_and_label_sets_that_share_nothing_are_warned_of(folders, caplog):
    server = FedServer(
        expert_clients(folders),
        algorithm=experts_distillation(folders, soft_labels_cover="own_labels", digest_epochs=1),
    )
    server.fit(rounds=1, local_epochs=1)
    public = server.algorithm.public.encoded(server.global_model, with_labels=False)
    student = soften(predict_logits(server.get_model(), public, 16, 0), STUDENT["temperature"])
    assert torch.equal(server.algorithm.soft_labels, student)  # the consensus the next round sends down
    assert "groups that share no label" not in caplog.text
    apart = [FedClient(make_records(20, 5, labels), load_classifier(str(folders["two"]), 4, seed=0), name=name)
             for name, labels in (("a", ["business", "sport"]), ("b", ["politics", "tech"]))]  # fmt: skip
    FedServer(apart, algorithm=experts_distillation(folders, soft_labels_cover="own_labels"))
    assert "form 2 groups that share no label (business, sport | politics, tech)" in caplog.text
    with pytest.raises(ConfigError, match="soft_labels_cover own_labels restricts .* dp releases only"):
        private = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=1.0, expected_clients=2)
        FedServer(apart, private, algorithm=experts_distillation(folders, soft_labels_cover="own_labels")).fit(1)
    with pytest.raises(ConfigError, match="soft_labels_cover must be one of"):
        experts_distillation(folders, soft_labels_cover="mine")
