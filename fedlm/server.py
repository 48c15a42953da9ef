"""FedServer: the global model, the label map, and the round loop.

A round, top to bottom (`run_round`):
  1. sample clients (seeded by run seed and round);
  2. send each the global parameters and the round config, collect its update;
  3. drop clients that raised or sent a malformed update, logging the name and reason;
  4. aggregate the remaining updates with the strategy (FedAvg by default);
  5. evaluate the new global model on the federated validation set;
  6. record the round's metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedlm.client import FedClient, TrainingOptions
from fedlm.core.client_metrics import metric_distribution
from fedlm.core.compression import codec_from_spec
from fedlm.core.lora import lora_aggregation_error, lora_pairs, svd_refactor
from fedlm.core.params import ParamSpec
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import FedAvg, Strategy
from fedlm.core.update import ClientUpdate
from fedlm.data.dataset import load_text_dataset
from fedlm.data.labels import LabelMap
from fedlm.errors import ConfigError, FedlmError, ModelError
from fedlm.models.adapters import is_adapted, merged_copy
from fedlm.models.federated import federated_spec, get_federated_vector, set_federated_vector
from fedlm.models.loading import quiet_transformers
from fedlm.protocol import ClientInfo, ClientTransport, Compressed, EvaluateIns, FitIns, FitRes, LoopbackTransport
from fedlm.tasks.classification import EncodedDataset, encode, evaluate_model

logger = logging.getLogger("fedlm")


class FedServer:
    """Holds the global federated parameters and runs rounds over `clients`.

    Given `FedClient`s (the seed API and the in-process runtime), it checks that every client's
    model has the same federated parameters, builds the federation's label map from all clients'
    labels, and broadcasts the first client's parameters so that every client starts from the
    same global model; messages go through a `LoopbackTransport`. A deployment runtime builds the
    server with `over_transport` instead: clients are `ClientInfo`s of remote nodes.
    """

    def __init__(
        self,
        clients: Sequence[FedClient],
        strategy: Strategy | None = None,
        *,
        seed: int = 0,
        min_clients: int = 1,
        round_timeout: float | None = None,
    ) -> None:
        if not clients:
            raise ConfigError("FedServer needs at least one client")
        clients = list(clients)
        _name_clients(clients)
        model = clients[0].model
        spec = federated_spec(model)
        _check_models(clients, spec)
        label_map = _build_label_map(model, clients)
        # an update and at most two strategy vectors of the same size, plus headers
        transport = LoopbackTransport(clients, max_reply_bytes=3 * 4 * spec.numel + (1 << 20))
        self._setup(clients, transport, model, clients[0].tokenizer, label_map, clients[0].options)
        self._configure_rounds(strategy, seed, min_clients, round_timeout)
        self.broadcast_model()

    @classmethod
    def over_transport(
        cls,
        clients: Sequence[ClientInfo],
        transport: ClientTransport,
        model: torch.nn.Module,
        tokenizer: Any,
        label_map: LabelMap,
        options: TrainingOptions,
        strategy: Strategy | None = None,
        *,
        seed: int = 0,
        min_clients: int = 1,
        round_timeout: float | None = None,
    ) -> FedServer:
        """A server over clients that live elsewhere: `transport` reaches them by name, `model`
        holds the initial global parameters and evaluates them, `options` sets evaluation's batch
        size, device and maximum length."""
        if not clients:
            raise ConfigError("FedServer needs at least one client")
        server = cls.__new__(cls)
        server._setup(list(clients), transport, model, tokenizer, label_map, options)
        server._configure_rounds(strategy, seed, min_clients, round_timeout)
        return server

    def _setup(self, clients, transport, model, tokenizer, label_map, options) -> None:
        self.clients = clients
        self.transport = transport
        self.label_map = label_map
        self.options = options
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._model = model
        self._tokenizer = tokenizer
        self.spec = federated_spec(model)
        self.global_params = get_federated_vector(model)
        self.lora_pairs = lora_pairs(self.spec)
        self._eval_model: torch.nn.Module | None = None

    def _configure_rounds(
        self, strategy: Strategy | None, seed: int, min_clients: int, round_timeout: float | None
    ) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        # codec specs ({"kind": "int8", ...}, see fedlm.core.compression) for updates sent up and
        # parameters sent down; the upload spec may add "error_feedback": true
        self.upload_codec: dict[str, Any] | None = None
        self.download_codec: dict[str, Any] | None = None
        # LoRA factors: "fedit" keeps the strategy's average of A and B, "svd" re-factors the exact
        # average of the products (fedlm.core.lora); "ffa" needs no step (A is frozen, not federated)
        self.lora_aggregation = "fedit"
        self.strategy = strategy or FedAvg()
        self.seed = seed
        self.min_clients = min_clients
        self.round_timeout = round_timeout

    # ---- the seed API ------------------------------------------------------------------------

    def broadcast_model(self) -> None:
        """Send the global parameters and the strategy's round instructions to every client
        (parameters are loaded once per distinct model object)."""
        ins = self._fit_instructions(self.round + 1, local_epochs=1)
        loaded: set[int] = set()
        for client in self._local_clients("broadcast_model"):
            client.receive(ins, load_parameters=id(client.model) not in loaded)
            loaded.add(id(client.model))

    def _fit_instructions(self, round_number: int, local_epochs: int, compress: bool = False) -> FitIns:
        """The round's instructions; `compress` applies the download codec (only for messages
        that travel: `broadcast_model` hands clients the exact parameters)."""
        config, tensors = self.strategy.configure_fit(self.global_params)
        base = {"round": round_number, "epochs": local_epochs, "seed": self.seed}
        if self.upload_codec is not None:
            base["upload_codec"] = self.upload_codec
        parameters = self.global_params
        if compress and self.download_codec is not None:
            parameters = Compressed.encode(codec_from_spec(self.download_codec), parameters)
        return FitIns(parameters, {**base, **config}, tensors)

    def aggregate_parameters(self) -> dict[str, Any]:
        """FedAvg (or the configured strategy) over the clients that trained since the last call."""
        updates, dropped = [], []
        for client in self._local_clients("aggregate_parameters"):
            result = client.take_update()
            if result is not None:
                self._accept(client.name, result, updates, dropped)
        if not updates:
            raise FedlmError("no client has a new update to aggregate; call client.local_train() first")
        aggregation = self._aggregate(updates)
        self.round += 1
        record = {"round": self.round, "clients": len(updates), "dropped": dropped, **aggregation}
        self.history.append(record)
        return record

    def _aggregate(self, updates: list[ClientUpdate]) -> dict[str, Any]:
        """The strategy's step, then for LoRA adapters the configured re-factoring (`svd`) and the
        aggregation error it leaves; returns the training summary for the round's record."""
        previous = self.global_params
        self.global_params = self.strategy.aggregate(previous, updates)
        summary = _train_summary(updates)
        if self.lora_pairs:
            if self.lora_aggregation == "svd":
                self.global_params = svd_refactor(previous, self.global_params, updates, self.lora_pairs)
            summary["lora_aggregation_error"] = lora_aggregation_error(
                previous, self.global_params, updates, self.lora_pairs
            )
        return summary

    def get_model(self) -> torch.nn.Module:
        """A transformers model holding the global parameters (a copy: later rounds do not change it)."""
        return copy.deepcopy(self._global_model())

    def save(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Write the global model, tokenizer and label map with `save_pretrained`. An adapter model
        is written merged into a plain transformers model (`merge_lora=True`, loads with
        `from_pretrained`) or as the PEFT adapter folder with the classification head
        (`merge_lora=False`, loads with `PeftModel.from_pretrained` over the base model)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self._global_model()
        with quiet_transformers():
            if is_adapted(model) and merge_lora:
                merged_copy(model).save_pretrained(path)
            elif is_adapted(model):
                model.save_pretrained(path, save_embedding_layers=False)
            else:
                model.save_pretrained(path)
            self._tokenizer.save_pretrained(path)
        info = {"round": self.round, "label2id": self.label_map.label2id, "num_parameters": self.spec.numel}
        (path / "fedlm.json").write_text(json.dumps(info, indent=2))
        return path

    # ---- evaluation --------------------------------------------------------------------------

    def evaluate(
        self, dataset: Any, text_column: str | None = None, label_column: str | None = None
    ) -> dict[str, float]:
        """Loss, accuracy and macro-F1 of the global model on a (federated validation) dataset."""
        encoded = self.encode_dataset(dataset, text_column, label_column)
        options = self.options
        pad_id = self._tokenizer.pad_token_id or 0
        return evaluate_model(self._global_model(), encoded, options.batch_size, pad_id, options.device)

    def encode_dataset(
        self, dataset: Any, text_column: str | None = None, label_column: str | None = None
    ) -> EncodedDataset:
        """Tokenize a dataset with the federation's tokenizer and label map (encoded ones pass through)."""
        if isinstance(dataset, EncodedDataset):
            return dataset
        data = load_text_dataset(dataset, text_column, label_column, owner="validation set")
        labels = self.label_map.encode(data.labels, owner=f"validation set {data.source}")
        return encode(self._tokenizer, data.texts, labels, self.options.max_length)

    def _global_model(self) -> torch.nn.Module:
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(self._model)
            self._eval_model.config.id2label = dict(self.label_map.id2label)
            self._eval_model.config.label2id = dict(self.label_map.label2id)
        set_federated_vector(self._eval_model, self.global_params)
        return self._eval_model

    # ---- the round loop ----------------------------------------------------------------------

    def fit(
        self,
        rounds: int,
        local_epochs: int = 1,
        clients_per_round: int | None = None,
        validation: Any = None,
        clients_per_evaluation: int | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run `rounds` rounds (see `run_round`); returns one metrics dict per round (also kept in `history`)."""
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        encoded = None if validation is None else self.encode_dataset(validation)
        records = []
        for _ in range(rounds):
            record = self.run_round(local_epochs, clients_per_round, encoded, clients_per_evaluation)
            records.append(record)
            if on_round_end is not None:
                on_round_end(record)
        return records

    def sample_clients(self, round_number: int, count: int | None, purpose: str = "fit") -> list[Any]:
        """`count` clients (all when None), drawn with a seed from the run seed, purpose and round."""
        if count is None or count >= len(self.clients):
            return list(self.clients)
        if count < 0:
            raise ConfigError(f"the number of clients to sample must be >= 0, got {count}")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, purpose, round_number))
        chosen = torch.randperm(len(self.clients), generator=generator)[:count]
        return [self.clients[index] for index in sorted(chosen.tolist())]

    def evaluate_global_model(
        self, validation: EncodedDataset | None, clients_per_evaluation: int | None = None
    ) -> dict[str, Any]:
        """`val_*` metrics on the federated validation set (if any) and `client_*` metrics on the test
        splits of `clients_per_evaluation` clients (all when None, none when 0)."""
        metrics: dict[str, Any] = {}
        if validation is not None:
            metrics.update({f"val_{key}": value for key, value in self.evaluate(validation).items()})
        if clients_per_evaluation != 0:
            metrics.update(self.evaluate_clients(clients_per_evaluation))
        return metrics

    def evaluate_clients(self, clients_per_evaluation: int | None = None) -> dict[str, Any]:
        """The global model on each (sampled) client's own test split: per-client results and their
        distribution (mean, weighted mean, worst, 10th percentile, std) of accuracy and macro-F1."""
        ins = EvaluateIns(self.global_params, {"round": self.round})
        sampled = self.sample_clients(self.round, clients_per_evaluation, purpose="evaluate")
        names = [client.name for client in sampled if client.has_test_data]
        results = []
        for name, reply in self.transport.evaluate(names, ins, self._deadline()).items():
            if isinstance(reply, str):
                logger.warning(
                    "round %d: client %s failed to evaluate: %s", self.round, self.transport.describe(name), reply
                )
            elif reply.num_examples > 0:
                results.append({"client": name, "num_examples": reply.num_examples, **reply.metrics})
        if not results:
            return {}
        summary: dict[str, Any] = {"clients_evaluated": len(results)}
        weights = [result["num_examples"] for result in results]
        for metric in ("accuracy", "macro_f1"):
            distribution = metric_distribution([result[metric] for result in results], weights)
            summary.update({f"client_{metric}_{key}": value for key, value in distribution.items()})
        summary["client_test"] = results
        return summary

    def run_round(
        self,
        local_epochs: int = 1,
        clients_per_round: int | None = None,
        validation: EncodedDataset | None = None,
        clients_per_evaluation: int | None = None,
    ) -> dict[str, Any]:
        """One round: train the sampled clients, aggregate, then evaluate on the federated validation
        set and on the test splits of `clients_per_evaluation` clients (all when None, none when 0)."""
        round_number = self.round + 1
        start = time.perf_counter()
        bytes_before = (self.transport.bytes.down, self.transport.bytes.up)
        client_bytes_before = {name: tuple(counts) for name, counts in self.transport.bytes.by_client.items()}

        # 1-3. train the sampled clients; keep the valid updates
        ins = self._fit_instructions(round_number, local_epochs, compress=True)
        names = [client.name for client in self.sample_clients(round_number, clients_per_round)]
        updates: list[ClientUpdate] = []
        dropped: list[dict[str, str]] = []
        for name, reply in self.transport.fit(names, ins, self._deadline()).items():
            if isinstance(reply, str):
                self._drop(round_number, name, reply, dropped)
            else:
                self._accept(name, reply, updates, dropped)
        record: dict[str, Any] = {"round": round_number, "clients": len(updates), "dropped": dropped}

        # 4. aggregate, or skip the round when too few clients remain
        if len(updates) >= self.min_clients:
            record.update(self._aggregate(updates))
        else:
            logger.warning(
                "round %d skipped: %d client(s) sent a valid update, min_clients is %d; global model unchanged",
                round_number,
                len(updates),
                self.min_clients,
            )
            record["skipped"] = True
        self.round = round_number

        # 5. evaluate: federated validation set, then the clients' own test splits
        eval_start = time.perf_counter()
        record.update(self.evaluate_global_model(validation, clients_per_evaluation))
        record["eval_seconds"] = time.perf_counter() - eval_start

        # 6. record
        record["bytes_down"] = self.transport.bytes.down - bytes_before[0]
        record["bytes_up"] = self.transport.bytes.up - bytes_before[1]
        record["client_bytes"] = {
            name: {
                "down": down - client_bytes_before.get(name, (0, 0))[0],
                "up": up - client_bytes_before.get(name, (0, 0))[1],
            }
            for name, (down, up) in self.transport.bytes.by_client.items()
            if (down, up) != client_bytes_before.get(name, (0, 0))
        }
        record["seconds"] = time.perf_counter() - start
        # what the round cost beyond training and evaluation (clients train one after the other in
        # process, side by side in a deployment)
        training = record.get("train_seconds_max" if self.transport.parallel else "train_seconds", 0.0)
        record["overhead_seconds"] = record["seconds"] - record["eval_seconds"] - training
        self.history.append(record)
        return record

    def _drop(self, round_number: int, name: str, reason: str, dropped: list[dict[str, str]]) -> None:
        logger.warning("round %d: client %s dropped: %s", round_number, self.transport.describe(name), reason)
        dropped.append({"client": name, "reason": reason})

    def _accept(self, name: str, result: FitRes, updates: list[ClientUpdate], dropped: list[dict[str, str]]) -> None:
        problem = self._update_problem(result)
        if problem:
            self._drop(self.round + 1, name, problem, dropped)
        else:
            updates.append(ClientUpdate(result.delta, result.num_examples, result.metrics, result.extras))

    def _update_problem(self, result: FitRes) -> str | None:
        for name, vector in {"update": result.delta, **result.extras}.items():
            if vector.dtype != torch.float32 or vector.dim() != 1 or vector.numel() != self.spec.numel:
                return f"{name} has dtype {vector.dtype} and shape {list(vector.shape)}, expected float32 [{self.spec.numel}]"
            if not torch.isfinite(vector.sum()) and not torch.isfinite(vector).all():  # fast path first
                return f"{name} contains NaN or infinite values"
        if result.num_examples < 1:
            return f"update reports {result.num_examples} training examples, expected >= 1"
        return None

    def _deadline(self) -> float | None:
        return None if self.round_timeout is None else time.monotonic() + self.round_timeout

    def _local_clients(self, method: str) -> list[FedClient]:
        if not all(isinstance(client, FedClient) for client in self.clients):
            raise FedlmError(f"{method} needs FedClient objects; this server's clients are remote, use fit()")
        return self.clients


def _name_clients(clients: list[FedClient]) -> None:
    for index, client in enumerate(clients):
        if client.name is None:
            client.name = f"client-{index}"
    names = [client.name for client in clients]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"client names must be unique; {duplicates} appear more than once (pass name=...)")


def _check_models(clients: list[FedClient], spec: ParamSpec) -> None:
    for client in clients[1:]:
        if client.model is clients[0].model:
            continue
        difference = spec.first_difference(federated_spec(client.model))
        if difference and ".lora_" in difference:
            raise ModelError(
                f"client {client.name}: its LoRA adapter differs from client {clients[0].name}'s: {difference}; "
                "the LoRA aggregation modes (fedit, ffa, svd) need every client to use the same rank and target modules"
            )
        if difference:
            raise ModelError(
                f"client {client.name}: its model's federated parameters differ from client "
                f"{clients[0].name}'s: {difference}; every client must load the same architecture"
            )


def _build_label_map(model: torch.nn.Module, clients: list[FedClient]) -> LabelMap:
    """The model's own label names when it has real ones, else every client's labels, sorted."""
    configured = getattr(model.config, "label2id", None) or {}
    if configured and not all(key.startswith("LABEL_") for key in configured):
        label_map = LabelMap({str(key): int(value) for key, value in configured.items()})
    else:
        label_map = LabelMap.from_values(value for client in clients for value in client.label_values())
    for client in clients:
        client.set_label_map(label_map)
    return label_map


def _train_summary(updates: list[ClientUpdate]) -> dict[str, float]:
    total = sum(update.num_examples for update in updates)
    losses = [(update.metrics.get("loss", math.nan), update.num_examples) for update in updates]
    return {
        "train_loss": sum(loss * n for loss, n in losses) / total,
        "train_examples": total,
        "train_seconds": sum(update.metrics.get("seconds", 0.0) for update in updates),
        "train_seconds_max": max(update.metrics.get("seconds", 0.0) for update in updates),  # clients in parallel
    }
