"""The server side of the Flower runtime: a Flower ServerApp whose main loop is fedlm's own round loop.

The SuperLink starts this app for a run submitted by `fedlm run CONFIG --backend flower`. It
waits for the config's number of SuperNodes, asks each who it is (client name, example counts,
what its task reports about its targets, such as its labels; a node that cannot load its data is
logged by node id and left out), builds the global model and the task's metadata (classification:
the label map), and then runs exactly the rounds a simulation runs (`run_federation`:
sampling, deadlines, dropping failed clients, strategies, evaluation, checkpoints, `--resume`),
with a `FlowerTransport` carrying the messages. Clients are ordered by name, so a deployment
whose nodes hold the files of a simulation's predefined partition produces the same model.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlm.algorithms import FederatedDistillation
from fedlm.client import TrainingOptions
from fedlm.config import PredefinedPartitionConfig, RunConfig, cohort_problem
from fedlm.errors import ConfigError, DatasetError, FedlmError
from fedlm.models import load_tokenizer
from fedlm.privacy.homomorphic import read_public_context
from fedlm.protocol import ClientInfo
from fedlm.runtime.assemble import build_algorithm, build_federation, build_model, check_device, lora_aggregation
from fedlm.runtime.federated_data import build_task, resolve_clients_per_round
from fedlm.runtime.flower.flower_app import RESUME_KEY, config_from_run_config
from fedlm.runtime.flower.launch import ALLOW_DATA_CHANGE_KEY, OVERWRITE_KEY
from fedlm.runtime.flower.transport import FlowerTransport, query_clients
from fedlm.runtime.rounds import Federation, check_run_folder, megabytes, round_line, run_federation
from fedlm.server import GlobalModel
from fedlm.tasks import Task

logger = logging.getLogger("fedlm")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fedlm %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = config_from_run_config(context.run_config)
        flags = {
            "resume": bool(context.run_config.get(RESUME_KEY, False)),
            "overwrite": bool(context.run_config.get(OVERWRITE_KEY, False)),
            "allow_data_change": bool(context.run_config.get(ALLOW_DATA_CHANGE_KEY, False)),
        }
        check_run_folder(config, **flags)  # before waiting for nodes and loading the model
        federation = build_deployment(grid, config)
        rounds = config.federation.rounds
        history = run_federation(
            federation,
            on_round_end=lambda record: logger.info(round_line(record, rounds, federation.server.global_model.task)),
            **flags,
        )
        summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
        per_client = ", ".join(
            f"{name} {megabytes(moved['down'])} down / {megabytes(moved['up'])} up"
            for name, moved in summary["clients"].items()
        )
        logger.info(
            "finished %d rounds; sent down %s, up %s (%s); model saved to %s",
            len(history),
            megabytes(summary["bytes_down"]),
            megabytes(summary["bytes_up"]),
            per_client,
            config.output_dir / "model",
        )
    except FedlmError as error:
        logger.error("%s", error)
        raise
    finally:
        logger.removeHandler(handler)


def expected_clients(config: RunConfig) -> int:
    """How many SuperNodes the run waits for: `deployment.num_clients`, else the partition's count."""
    if config.deployment.num_clients is not None:
        return config.deployment.num_clients
    partition = config.data.partition
    if isinstance(partition, PredefinedPartitionConfig) and partition.clients is not None:
        return len(partition.clients)
    if hasattr(partition, "num_clients"):
        return partition.num_clients
    raise ConfigError(
        f"a {partition.kind} partition does not say how many clients there are; set deployment.num_clients"
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The connected SuperNodes' ids once at least `count` are connected; an error after `timeout` s."""
    deadline, seen = time.monotonic() + timeout, -1
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) != seen:
            logger.info("%d of %d SuperNodes connected", len(node_ids), count)
            seen = len(node_ids)
        if len(node_ids) >= count:
            return node_ids
        if time.monotonic() > deadline:
            raise FedlmError(
                f"waited {timeout:.0f} s for {count} SuperNodes, saw {len(node_ids)} connected "
                f"(node ids {node_ids}); start more SuperNodes, or lower deployment.num_clients "
                f"or raise deployment.node_wait_timeout"
            )
        time.sleep(1.0)


def _with_usable_targets(
    infos: list[tuple[int, ClientInfo]], task: Task
) -> tuple[list[tuple[int, ClientInfo]], list[str]]:
    """The nodes whose target keys can join the task's metadata (classification: integer labels
    within the class bound), and a line naming each other node and why."""
    usable, failures = [], []
    for node_id, info in infos:
        try:
            task.metadata(info.target_keys)
            usable.append((node_id, info))
        except DatasetError as error:
            failures.append(f"node {node_id} (client {info.name}): {error}")
    return usable, failures


def build_deployment(grid: Grid, config: RunConfig) -> Federation:
    """The server side of a deployment: nodes found and named, the global model built."""
    check_device(config.training.device)  # the server evaluates the global model on it
    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    if config.data.validation_file is None:
        logger.info(
            "no data.validation_file: the global model is evaluated on the clients' test splits only "
            "(data.validation_fraction applies to a simulation's pooled data, which a deployment does not have)"
        )
    node_ids = wait_for_nodes(grid, expected_clients(config), config.deployment.node_wait_timeout)
    infos, failures = query_clients(grid, node_ids, time.monotonic() + config.deployment.node_wait_timeout)
    task = build_task(config)
    infos, label_failures = _with_usable_targets(infos, task)
    for failure in failures + label_failures:
        logger.warning("SuperNode excluded: %s", failure)
    names = [info.name for _, info in infos]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"SuperNodes must hold clients with distinct names; {duplicates} appear more than once "
            "(set name=... in each SuperNode's --node-config)"
        )
    if len(infos) < config.federation.min_clients:
        raise FedlmError(
            f"only {len(infos)} SuperNode(s) can take part, federation.min_clients is "
            f"{config.federation.min_clients}; see the excluded nodes above"
        )
    infos.sort(key=lambda item: item[1].name)
    clients = [info for _, info in infos]
    described = (f"{info.name} (node {node_id}, {info.num_examples} examples)" for node_id, info in infos)
    logger.info("clients: %s", ", ".join(described))
    metadata = task.metadata(key for info in clients for key in info.target_keys)
    algorithm = build_algorithm(config, task, metadata)
    if isinstance(algorithm, FederatedDistillation):  # the student is the global model
        model, tokenizer = algorithm.student, algorithm.tokenizer
        task.check_model(model, metadata, owner="the student")
    else:
        model, tokenizer = build_model(config, config.model.name, metadata), load_tokenizer(config.model.name)
    node_ids = {info.name: node_id for node_id, info in infos}
    transport = FlowerTransport(grid, node_ids, task.metadata_to_json(metadata))
    problem = cohort_problem(
        config,
        resolve_clients_per_round(config, len(clients)) or len(clients),
        f"{len(clients)} SuperNodes can take part",
    )
    if problem:
        raise ConfigError(problem)
    options = config.training.model_dump(include=set(TrainingOptions.__dataclass_fields__))
    global_model = GlobalModel(
        model, tokenizer, task, metadata, TrainingOptions(**options, seed=config.seed), lora_aggregation(config),
        clients, layouts=not isinstance(algorithm, FederatedDistillation),
    )  # fmt: skip
    public_context = None
    if config.homomorphic is not None:  # the nodes hold the secret key (node config he-secret-context)
        public_context = read_public_context(config.homomorphic.public_context)
    return build_federation(
        config, clients, algorithm, public_context=public_context, transport=transport, global_model=global_model,
        validation=config.data.validation_file,
        client_groups={info.name: info.group for info in clients if info.group is not None},
    )  # fmt: skip
