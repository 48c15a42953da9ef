"""From a run config to the federation's data: clients (train and test splits) and the
server's federated validation set."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from fedlm.config import (
    ClusterPartitionConfig,
    NaturalPartitionConfig,
    PartitionConfig,
    PredefinedPartitionConfig,
    RunConfig,
)
from fedlm.core.kmeans import kmeans
from fedlm.core.seeding import derive_seed
from fedlm.data import (
    BUNDLED_DATASETS,
    PARTITIONERS,
    TextDataset,
    client_sources,
    holdout_split,
    load_bundled_dataset,
    load_predefined,
)
from fedlm.data.dataset import load_public_set
from fedlm.data.federated import ClientData, FederatedData
from fedlm.data.partition import DirichletPartitioner, NaturalPartitioner, Partitioner
from fedlm.errors import ConfigError, DatasetError
from fedlm.models.embedding import embed_texts
from fedlm.tasks import TASKS, Task

logger = logging.getLogger("fedlm")
LABEL_SKEW_PARTITIONS = ("dirichlet", "shards")  # partitions that skew the classes, unless given a column


def build_task(config: RunConfig) -> Task:
    """The task registered under `config.task.kind`, built from its section's fields; one whose
    constructor takes `max_labels` (classification) and whose section does not set it gets the
    run's `data.max_labels`."""
    if config.task.kind not in TASKS:
        raise ConfigError(
            f"task.kind {config.task.kind!r} has a config section but no task class: register both with "
            f"fedlm.register_task; registered: {list(TASKS)}"
        )
    task_class = TASKS[config.task.kind]
    options = config.task.model_dump(exclude={"kind"})
    if "max_labels" in inspect.signature(task_class).parameters:
        options.setdefault("max_labels", config.data.max_labels)
    return task_class(**options)


def load_source(config: RunConfig, task: Task) -> TextDataset:
    """The run's single source dataset (bundled or a file) as `task` reads it, subsampled to `max_examples`."""
    data_config = config.data
    name = data_config.dataset
    if name in BUNDLED_DATASETS and BUNDLED_DATASETS[name].task != task.kind:
        raise ConfigError(
            f"data.dataset {name!r} holds rows for task {BUNDLED_DATASETS[name].task}, and the run's task is "
            f"{task.kind}: set task: {{kind: {BUNDLED_DATASETS[name].task}}} or choose another dataset"
        )
    if name in BUNDLED_DATASETS or (not Path(name).exists() and not Path(name).suffix):
        # names the registered datasets when `name` is unknown; the task checks its labels
        data = task.read(load_bundled_dataset(name), owner="data.dataset")
    else:
        data = task.read(data_config.dataset, data_config.text_column, data_config.label_column, owner="data.dataset")
    if data_config.max_examples is not None and data_config.max_examples < len(data):
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "subset"))
        data = data.subset(sorted(torch.randperm(len(data), generator=generator)[: data_config.max_examples].tolist()))
    return data


def prepare_federated_data(config: RunConfig, task: Task | None = None) -> FederatedData:
    """The config's clients (train and test splits), validation set and held-out public set, read
    by `task` (None: the config's, `build_task`)."""
    task = build_task(config) if task is None else task
    data_config, partition = config.data, config.data.partition
    check_partition_fits(partition, task)
    if isinstance(partition, PredefinedPartitionConfig):
        sources = client_sources(partition.clients, partition.folder)
        data, parts, names = load_predefined(sources, data_config.text_column, data_config.label_column, task.read)
    else:
        data = load_source(config, task)
        parts, names = None, None
        if isinstance(partition, ClusterPartitionConfig):
            data = with_clusters(data, partition, derive_seed(config.seed, "clusters"))
    validation = None
    if data_config.validation_file is not None:
        validation = task.read(
            data_config.validation_file, data_config.text_column, data_config.label_column, owner="data.validation_file"
        )
        kept = list(range(len(data)))
    else:
        kept, held = holdout_split(len(data), data_config.validation_fraction, derive_seed(config.seed, "validation"))
        validation = data.subset(held) if held else None
    public = None
    if config.algorithm is not None and config.algorithm.public_data.held_out is not None:
        fraction = config.algorithm.public_data.held_out
        kept_positions, public_positions = holdout_split(len(kept), fraction, derive_seed(config.seed, "public"))
        public = data.subset([kept[i] for i in public_positions])
        kept = [kept[i] for i in kept_positions]
    if parts is None:
        partitioner = make_partitioner(partition, derive_seed(config.seed, "partition"))
        targets = data.subset(kept).column(getattr(partition, "column", None) or "label", owner="data.partition.column")
        parts = [[kept[i] for i in part] for part in partitioner.partition(targets)]
        names = partitioner.client_names(targets)
    else:
        held_set = set(range(len(data))) - set(kept)
        parts = [[i for i in part if i not in held_set] for part in parts]
    if names is None:
        width = len(str(len(parts) - 1))
        names = [f"client-{index:0{width}d}" for index in range(len(parts))]
    clients = [
        split_client(name, data.subset(part), data_config.client_test_fraction, config.seed)
        for name, part in zip(names, parts)
    ]
    federated = FederatedData(clients, validation, public)
    check_validation_labels(federated, task)
    return federated


def check_partition_fits(partition: PartitionConfig, task: Task) -> None:
    """A label-skew partition of the labels needs a task whose targets are class labels."""
    if partition.kind in LABEL_SKEW_PARTITIONS and partition.column is None and not task.class_labels:
        raise ConfigError(
            f"data.partition.kind {partition.kind} skews the class labels, and task {task.kind!r} has none: "
            "give data.partition.column (a column of classes to skew), or use kind iid, quantity or natural"
        )


def target_keys(federated: FederatedData, task: Task) -> list[str]:
    """What the clients' training targets report for the federation's metadata (classification:
    every label some client trains on), sorted."""
    return sorted({key for client in federated.clients for key in task.target_keys(client.train.labels)})


def load_public_data(config: RunConfig, task: Task, held_out: TextDataset | None = None) -> TextDataset:
    """Distillation's public set: `held_out` of the dataset (`FederatedData.public`), or its own
    bundled dataset or file, subsampled (seeded) to `max_examples`. Texts (labels optional) for a
    task of class labels; rows as `task` reads them (a decoder's conversations) for any other."""
    settings = config.algorithm.public_data
    if settings.held_out is not None:
        if held_out is None:
            raise ConfigError(
                "algorithm.public_data.held_out slices the pooled data.dataset, which only a simulation has; "
                "give public_data.dataset (a bundled name or a file every participant can read)"
            )
        public = held_out
    elif settings.dataset in BUNDLED_DATASETS:
        if BUNDLED_DATASETS[settings.dataset].task != task.kind:
            raise ConfigError(
                f"algorithm.public_data.dataset {settings.dataset!r} holds rows for task "
                f"{BUNDLED_DATASETS[settings.dataset].task}, and the run's task is {task.kind}: choose another dataset"
            )
        public = load_bundled_dataset(settings.dataset)
        if not task.class_labels:
            public = task.read(public, owner="algorithm.public_data.dataset")
    elif task.class_labels:
        public = load_public_set(
            settings.dataset, settings.text_column, settings.label_column, owner="public_data.dataset"
        )
    else:
        public = task.read(settings.dataset, settings.text_column, owner="algorithm.public_data.dataset")
    if settings.max_examples is not None and settings.max_examples < len(public):
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "public subset"))
        public = public.subset(
            sorted(torch.randperm(len(public), generator=generator)[: settings.max_examples].tolist())
        )
    return public


def with_clusters(data: TextDataset, partition: ClusterPartitionConfig, seed: int) -> TextDataset:
    """`data` with a "cluster" column: the k-means cluster of each text's embedding by
    `partition.encoder`."""
    if partition.clusters > len(data):
        raise ConfigError(
            f"data.partition.clusters {partition.clusters} exceeds the {len(data)} examples to cluster; "
            f"give at most {len(data)}"
        )
    logger.info("clustering %d texts into %d clusters by %s embeddings", len(data), partition.clusters,
                partition.encoder)  # fmt: skip
    points = embed_texts(partition.encoder, data.texts, partition.max_length)
    clusters = kmeans(points, partition.clusters, seed).tolist()
    return TextDataset(data.texts, data.labels, data.source, {**data.columns, "cluster": clusters})


def make_partitioner(partition: PartitionConfig, seed: int) -> Partitioner:
    if isinstance(partition, NaturalPartitionConfig):
        return NaturalPartitioner(partition.column)
    if isinstance(partition, ClusterPartitionConfig):
        return DirichletPartitioner(partition.num_clients, partition.alpha, partition.min_size, seed)
    return PARTITIONERS[partition.kind](**partition.model_dump(exclude={"kind", "column"}), seed=seed)


def split_client(name: str, data: TextDataset, test_fraction: float, seed: int) -> ClientData:
    """A client's seeded train / test split; at least one test example when test_fraction > 0."""
    if len(data) == 0:
        raise DatasetError(f"client {name} has no examples; change the partition or its min_size")
    train, test = holdout_split(len(data), test_fraction, derive_seed(seed, "test", name))
    if test_fraction > 0 and not test and len(data) > 1:
        train, test = train[1:], train[:1]
    if not train:
        raise DatasetError(
            f"client {name} is left with zero training examples after its test split; lower data.client_test_fraction"
        )
    return ClientData(name, data.subset(train), data.subset(test))


def check_validation_labels(federated: FederatedData, task: Task) -> None:
    """Refuse validation labels (target keys) that no client trains on."""
    if federated.validation is None:
        return
    known = set(target_keys(federated, task))
    unseen = sorted(set(task.target_keys(federated.validation.labels)) - known)
    if unseen:
        raise DatasetError(
            f"federated validation set has labels {unseen} that no client's training data has; "
            f"the training labels are {sorted(known)}"
        )


def resolve_clients_per_round(config: RunConfig, num_clients: int) -> int | None:
    """Clients sampled per round from `clients_per_round` or `fraction` (None: all of them)."""
    federation = config.federation
    if federation.fraction is not None:
        return max(1, int(federation.fraction * num_clients))
    if federation.clients_per_round is not None and federation.clients_per_round > num_clients:
        raise ConfigError(
            f"federation.clients_per_round ({federation.clients_per_round}) exceeds the number of clients ({num_clients})"
        )
    return federation.clients_per_round
