from pathlib import Path

import pytest
import torch

from fedlm.config import load_config, parse_config
from fedlm.errors import ConfigError


def test_defaults_and_a_full_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 7\noutput_dir: out\nmodel: {name: minilm}\n"
        "data: {dataset: data.csv, max_examples: 100, partition: {kind: dirichlet, alpha: 0.5, num_clients: 100, min_size: 10}}\n"
        "federation: {clients_per_round: 2, rounds: 5}\ntraining: {learning_rate: 0.001}\n"
    )
    config = load_config(path)
    assert config.seed == 7 and config.federation.clients_per_round == 2 and config.training.learning_rate == 0.001
    assert config.data.partition.kind == "dirichlet" and config.data.partition.alpha == 0.5
    assert config.data.partition.num_clients == 100 and config.data.partition.min_size == 10
    assert config.training.batch_size == 16 and config.strategy.kind == "fedavg"
    assert parse_config(config.model_dump(mode="json")) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"federation": {"rounds": 0}}, "federation.rounds: Input should be greater than or equal to 1"),
        ({"federation": {"num_clients": 4}}, "federation.num_clients: Extra inputs are not permitted"),
        (
            {"data": {"partition": {"kind": "dirichlet", "alpha": 0}}},
            "data.partition.dirichlet.alpha: Input should be greater than 0",
        ),
        ({"data": {"partition": {"kind": "natural"}}}, "data.partition.natural.column: Field required"),
        ({"data": {"partition": {"kind": "predefined"}}}, "give exactly one of 'clients'"),
        ({"data": {"dataset": None}}, "a iid partition needs a dataset"),
        ({"data": {"dataset": "x.csv", "partition": {"kind": "predefined", "folder": "c"}}}, "remove data.dataset"),
        (
            {"data": {"max_examples": 9, "partition": {"kind": "predefined", "folder": "c"}}},
            "max_examples does not apply",
        ),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate: Input should be a valid number"),
        ({"training": {"lr": 0.1}}, "training.lr: Extra inputs are not permitted"),
        (
            {"data": {"partition": {"kind": "zipf"}}},
            "data.partition: Input tag 'zipf' .* expected tags: 'iid', 'dirichlet'",
        ),
        (
            {"strategy": {"kind": "fedsgd"}},
            "strategy: Input tag 'fedsgd' .* expected tags: 'fedavg', 'fedavgm', 'fedprox'",
        ),
        ({"strategy": {"kind": "fedadam", "mu": 0.1}}, "strategy.fedadam.mu: Extra inputs are not permitted"),
        (
            {"strategy": {"kind": "fedavg", "robust": {"kind": "trimmed_mean", "beta": 0.5}}},
            "strategy.fedavg.robust.trimmed_mean.beta",
        ),
        ({"federation": {"clients_per_round": 2, "fraction": 0.5}}, "give clients_per_round or fraction, not both"),
        ({"version": 9}, "config version 9 is newer"),
        ({"training": {"device": "banana"}}, "training.device: .*'banana' .*use cpu, cuda, cuda:N"),
        ({"training": {"device": "cuda:x"}}, "training.device: .*use cpu, cuda, cuda:N"),
        ({"training": {"device": "gpu"}}, "training.device"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_unreadable_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7", "mps", "xpu:1"])
def test_device_forms_are_accepted_at_config_time(device):
    assert parse_config({"training": {"device": device}}).training.device == device


def test_a_config_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\nmodel: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text: byte 0xe9 at offset 25 \(line 2\)"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# a comment\n# seed: 1\n"])
def test_an_empty_config_is_refused_and_points_to_a_starting_config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run.yaml is empty .*fedlm demo --print-config.*examples/configs/") as error:
        load_config(path)
    assert "examples/configs/bbc-dirichlet.yaml" in str(error.value)
    assert (Path(__file__).parents[2] / "examples" / "configs" / "bbc-dirichlet.yaml").is_file()


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("seed: 1\nfederation:\n  rounds: 2\n  min_clients: 1\n  rounds: 5\n", "rounds", 5),
        ("seed: 1\nmodel: {name: minilm}\nseed: 2\n", "seed", 3),
        ("federation: {rounds: 2, rounds: 3}\n", "rounds", 1),
    ],
)
def test_a_key_given_twice_names_the_key_and_line(tmp_path, text, key, line):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"key '{key}' is given twice .*\n.*run.yaml\", line {line}"):
        load_config(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  <<: {rounds: 2, min_clients: 1}\n  rounds: 4\n")
    assert load_config(path).federation.rounds == 4


def iid(num_clients: int, **sections) -> dict:
    return {"data": {"partition": {"kind": "iid", "num_clients": num_clients}}, **sections}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            iid(2, federation={"min_clients": 3}),
            r"federation.min_clients \(3\) exceeds the 2 client\(s\) taking part in each round \(data.partition",
        ),
        (
            iid(5, federation={"min_clients": 3, "clients_per_round": 2}),
            r"federation.min_clients \(3\) exceeds the 2 .*federation.clients_per_round",
        ),
        (
            {"data": {"partition": {"kind": "predefined", "clients": ["a.csv"]}}, "federation": {"min_clients": 2}},
            r"federation.min_clients \(2\) exceeds the 1 client",
        ),
        (
            iid(1, secure_aggregation={}),
            r"secure_aggregation needs at least 2 clients per round .*this run has 1 \(data.partition",
        ),
        (
            iid(5, federation={"clients_per_round": 1}, secure_aggregation={}),
            r"secure_aggregation needs at least 2 .*has 1 \(federation.clients_per_round\)",
        ),
        (
            iid(3, secure_aggregation={"threshold": 3}),
            r"secure_aggregation.threshold \(3\) exceeds the 2 neighbours each client has in a round of 3",
        ),
        (
            iid(10, secure_aggregation={"num_neighbours": 2}),
            r"the default secure_aggregation.threshold \(5\) exceeds the 2 neighbours",
        ),
        (iid(3, secure_aggregation={"num_neighbours": 3}), r"secure_aggregation.num_neighbours \(3\) exceeds the 2"),
    ],
)
def test_configs_whose_rounds_cannot_aggregate_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


@pytest.mark.parametrize(
    "data",
    [
        iid(2, federation={"min_clients": 2}),
        iid(3, secure_aggregation={"threshold": 2}),
        iid(1, federation={"fraction": 0.5}),  # clients per round known only once the clients are: the runtime checks
        {"data": {"partition": {"kind": "natural", "column": "author"}}, "secure_aggregation": {}},
        iid(1, secure_aggregation={}, deployment={"num_clients": 3}),  # the Flower count differs: checked at run time
    ],
)
def test_rounds_that_can_aggregate_or_depend_on_the_data_pass(data):
    parse_config(data)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml")), ids=str)
def test_every_example_config_validates(path):
    assert Path(load_config(path).output_dir).parts[0] == "runs"


def test_a_decoder_averaged_by_a_strategy_trains_lora_unless_the_config_says_otherwise():
    from fedlm.config import LoraConfig

    decoder = {"task": {"kind": "causal_lm"}}
    assert parse_config(decoder).peft == LoraConfig(method="lora")
    assert parse_config({**decoder, "peft": None}).peft is None  # all weights
    assert parse_config({**decoder, "peft": {"method": "ia3"}}).peft.method == "ia3"
    distillation = {"kind": "distillation", "public_data": {"held_out": 0.2}}
    assert parse_config({**decoder, "algorithm": distillation}).peft is None  # whole client models
    assert parse_config({}).peft is None  # a classifier: all weights
    # the run folder's config says what ran, so a resumed run compares adapters
    assert parse_config(decoder).model_dump()["peft"]["method"] == "lora"


def test_checkpointing_and_mixed_precision_reach_the_clients_training_options():
    from fedlm.client.local_training import TrainingOptions

    training = parse_config({"training": {"gradient_checkpointing": True, "mixed_precision": "bf16"}}).training
    options = TrainingOptions(**training.model_dump(include=set(TrainingOptions.__dataclass_fields__)))
    assert options.gradient_checkpointing and options.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="training: .*mixed_precision fp16 needs a CUDA device"):
        parse_config({"training": {"mixed_precision": "fp16"}})
    with pytest.raises(ConfigError, match="training: .*dp_sgd .* set mixed_precision: no"):
        parse_config({"training": {"mixed_precision": "bf16", "dp_sgd": {"noise_multiplier": 1.0}}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"quantization": "4bit"}}, "task classification loads its models in full precision"),
        ({"model": {"quantization": "8bit"}, "task": {"kind": "causal_lm"}, "peft": None}, "a peft adapter must train"),
        (
            {
                "model": {"quantization": "4bit"},
                "task": {"kind": "causal_lm"},
                "peft": {"method": "lora", "aggregation": "stack"},
            },
            "stack adds the adapters into the base weights",
        ),
    ],
)
def test_a_quantized_base_needs_a_task_that_loads_one_and_an_adapter_that_leaves_it_alone(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)
    # a decoder with its default LoRA adapter is fine
    assert parse_config({"model": {"quantization": "4bit"}, "task": {"kind": "causal_lm"}}).peft.method == "lora"


def test_a_quantized_base_needs_bitsandbytes_and_a_device_it_runs_on(monkeypatch):
    from fedlm.models.loading import quantized_loading

    assert quantized_loading("4bit", "cpu", "bf16")["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="bitsandbytes runs on cpu, cuda, xpu, not training.device mps"):
        quantized_loading("8bit", "mps")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"model.quantization 4bit needs bitsandbytes.*pip install 'fedlm\[qlora\]'"):
        quantized_loading("4bit", "cpu")
