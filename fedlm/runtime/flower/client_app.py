"""The client side of the Flower runtime: a Flower ClientApp that answers fedlm's messages on a SuperNode.

Each SuperNode is one client. What it holds comes from its node config
(`flower-supernode --node-config "dataset='/data/clinic-a.csv'"`):

    dataset        the client's private data: a CSV/TSV/JSONL/JSON/Parquet file or a saved folder (required)
    test-dataset   its test split; when omitted, `data.client_test_fraction` of `dataset` is held out
                   with the run seed, exactly as a simulation splits a predefined client's file
    name           the client's name in the server's logs and metrics (default: the dataset file's stem)
    model          a bundled model name or local model folder (default: the run config's `model.name`)
    device         torch device for training and evaluation (default: the run config's `training.device`)
    text-column, label-column   (default: the run config's `data.text_column` / `data.label_column`)
    lora-rank      this client's LoRA rank, at most `peft.r` (stack and svd aggregation; default: `peft.r`)
    he-secret-context   the CKKS secret context from `fedlm he-keys` (homomorphic aggregation)
    plugins        comma-separated plug-ins (module names or .py paths) this node lets the run config
                   import; a run config listing any other is refused

Everything else (training options, seed) comes from the run config the server was started with.
Flower 1.42 runs every message in a fresh ClientApp process, so each message loads the client's
data and base model anew (BENCHMARKS.md has the cost); the client's own state between rounds
(SCAFFOLD's control variate, error feedback's residual) stays on the node, in Flower's per-run node state. A client that
cannot do what is asked (a missing or malformed file, targets the federation's task metadata does not know)
replies with an error record that names it and its file, and the server leaves it out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlm.channels import SecureAggregation, channel_for_stage
from fedlm.channels.homomorphic import HomomorphicAggregation
from fedlm.client import FedClient, TrainingOptions
from fedlm.config import DistillationConfig, LoraConfig, RunConfig
from fedlm.data.dataset import value_key
from fedlm.data.federated import ClientData
from fedlm.data.report import main_value
from fedlm.errors import ConfigError
from fedlm.models import load_tokenizer
from fedlm.privacy.homomorphic import HomomorphicKeys
from fedlm.privacy.secure_aggregation import SecAggClient
from fedlm.protocol import TASK_METADATA_KEY, ClientInfo, EvaluateIns, FitIns, StageIns, WireMessage
from fedlm.runtime.assemble import build_model
from fedlm.runtime.federated_data import build_task, load_public_data, split_client
from fedlm.runtime.flower.flower_app import config_from_run_config
from fedlm.runtime.flower.records import error_record, from_record, to_record

NODE_CONFIG_KEYS = (
    "dataset", "test-dataset", "name", "model", "device", "text-column", "label-column", "lora-rank",
    "he-secret-context", "plugins",
)  # fmt: skip
STATE = "fedlm.client_state"
SECAGG_STATE = "fedlm.secure_aggregation"

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    """Who this client is: name, example counts, what its task reports about its targets (label keys)."""
    return _answer(message, context, lambda node, _: node.info())


@app.query("stage")
def stage(message: Message, context: Context) -> Message:
    """An update channel's exchanges, answered by the channel that owns the stage (secure
    aggregation's secrets stay in this node's state between them)."""

    def work(node: Node, content: RecordDict) -> WireMessage:
        ins = from_record(content, StageIns)
        party = node.channel_party(context)
        reply = channel_for_stage(ins.stage).answer(party, ins)
        _keep_channel_state(party, context)
        return reply

    return _answer(message, context, work)


@app.train()
def train(message: Message, context: Context) -> Message:
    def work(node: Node, content: RecordDict) -> WireMessage:
        ins = from_record(content, FitIns)
        client = _restored_client(node, ins.config.get(TASK_METADATA_KEY), context)
        client.channel_state = node.channel_party(context).channel_state
        result = client.fit(ins)
        kept = client.state_dict()
        if kept:
            context.state[STATE] = ArrayRecord({key: Array(value.numpy()) for key, value in kept.items()})
        _keep_channel_state(client, context)
        return result

    return _answer(message, context, work)


@dataclass
class ChannelParty:
    """A node's side of the update channels for a stage message (no model needed): its name and
    the channels' state (this round's secure aggregation secrets, the CKKS secret key)."""

    name: str
    channel_state: dict[str, Any]


def _keep_channel_state(party: Any, context: Context) -> None:
    """Secure aggregation's secrets, which change with every exchange, into the node's state."""
    secrets = party.channel_state.get(SecureAggregation.kind)
    if secrets is not None:
        context.state[SECAGG_STATE] = ConfigRecord({"client": secrets.to_json()})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    def work(node: Node, content: RecordDict) -> WireMessage:
        ins = from_record(content, EvaluateIns)
        return _restored_client(node, ins.config.get(TASK_METADATA_KEY), context).evaluate(ins)

    return _answer(message, context, work)


def _restored_client(node: Node, task_metadata: Any, context: Context) -> FedClient:
    """The node's client with the state it kept between messages (`FedClient.STATE`)."""
    client = node.client(task_metadata)
    state = context.state.array_records.get(STATE, {})
    client.load_state_dict({key: torch.from_numpy(array.numpy()) for key, array in state.items()})
    return client


def _answer(message: Message, context: Context, work: Callable[[Node, RecordDict], WireMessage]) -> Message:
    try:
        node = node_for(context)
    except Exception as error:  # the server must hear why, not just that the node failed
        return Message(error_record(f"{type(error).__name__}: {error}"), reply_to=message)
    try:
        return Message(to_record(work(node, message.content)), reply_to=message)
    except Exception as error:
        return Message(error_record(f"client {node.data.name}: {type(error).__name__}: {error}"), reply_to=message)


class Node:
    """One SuperNode's client: its data (read by the run's task), and a FedClient once the server
    has sent the task's metadata (classification: the label map)."""

    def __init__(self, config: RunConfig, node_config: dict[str, Any]) -> None:
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"node config has unknown keys {unknown}; valid keys are {list(NODE_CONFIG_KEYS)}")
        if "dataset" not in node_config:
            raise ConfigError("node config has no 'dataset': start the SuperNode with --node-config \"dataset='PATH'\"")
        self.config = config
        self.node_config = node_config
        self.task = build_task(config)
        self.lora_rank = None if "lora-rank" not in node_config else int(node_config["lora-rank"])
        if self.lora_rank is not None and not (
            isinstance(config.peft, LoraConfig) and 1 <= self.lora_rank <= config.peft.r
        ):
            raise ConfigError(
                f"node config lora-rank {self.lora_rank}: needs a LoRA run (peft.method lora) and 1 <= rank <= peft.r"
            )
        path = str(node_config["dataset"])
        name = str(node_config.get("name") or Path(path).stem)
        text_column = node_config.get("text-column", config.data.text_column)
        label_column = node_config.get("label-column", config.data.label_column)
        owner = f"client {name}"
        data = self.task.read(path, text_column, label_column, owner=owner)
        if "test-dataset" in node_config:
            test = self.task.read(node_config["test-dataset"], text_column, label_column, owner=f"{owner} test set")
            self.data = ClientData(name, data, test)
        else:
            self.data = split_client(name, data, config.data.client_test_fraction, config.seed)

    def homomorphic_keys(self) -> HomomorphicKeys:
        if "he-secret-context" not in self.node_config:
            raise ConfigError(
                "homomorphic aggregation needs the CKKS secret key: start the SuperNode with --node-config "
                "\"he-secret-context='DIR/he-secret.ctx'\" (fedlm he-keys DIR)"
            )
        return HomomorphicKeys.load(str(self.node_config["he-secret-context"]))

    def channel_party(self, context: Context) -> ChannelParty:
        """The channels' state this node keeps: secure aggregation's secrets from its Flower
        state, and the CKKS secret key from its node config when the run is homomorphic."""
        state: dict[str, Any] = {}
        record = context.state.config_records.get(SECAGG_STATE)
        if record is not None:
            state[SecureAggregation.kind] = SecAggClient.from_json(str(record["client"]))
        if self.config.homomorphic is not None:
            state[HomomorphicAggregation.kind] = self.homomorphic_keys()
        return ChannelParty(self.data.name, state)

    def info(self) -> ClientInfo:
        target_keys = self.task.target_keys(self.data.train.labels)
        fingerprint = FedClient.fingerprint_rows(self.data.train, self.data.test)
        column, group = self.config.data.group_column, None
        if column is not None:  # its main value of the column, as a simulation's partition summary counts it
            group = main_value(Counter(value_key(value) for value in self.data.train.column(column, self.data.name)))
        return ClientInfo(
            self.data.name, len(self.data.train), len(self.data.test), target_keys, self.lora_rank, fingerprint, group
        )

    def client(self, task_metadata: Any) -> FedClient:
        """A FedClient over this node's data for the federation's task metadata (as JSON)."""
        metadata = self.task.metadata_from_json(task_metadata)
        config = self.config
        model_name = str(self.node_config.get("model", config.model.name))
        model = build_model(config, model_name, metadata, self.lora_rank)
        options = config.training.model_dump(include=set(TrainingOptions.__dataclass_fields__))
        options["device"] = str(self.node_config.get("device", options["device"]))
        client = FedClient(
            self.data.train,
            model,
            load_tokenizer(model_name),
            name=self.data.name,
            test_dataset=self.data.test,
            task=self.task,
            seed=config.seed,
            **options,
        )
        client.set_metadata(metadata)
        if isinstance(config.algorithm, DistillationConfig):
            public = load_public_data(config, self.task)
            client.join_distillation(public.texts, None if self.task.class_labels else public.labels)
        return client


def node_for(context: Context) -> Node:
    """This node's client data for this run."""
    allowed = {entry.strip() for entry in str(context.node_config.get("plugins", "")).split(",") if entry.strip()}
    config = config_from_run_config(context.run_config, allowed)
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    return Node(config, dict(context.node_config))
