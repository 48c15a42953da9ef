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
from fedlm.core.layout import ClientLayout, with_rank
from fedlm.core.lora import fold_products, lora_aggregation_error, lora_pairs, svd_refactor
from fedlm.core.privacy import DifferentialPrivacy
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import FedAvg, Strategy
from fedlm.core.update import ClientUpdate
from fedlm.data.dataset import load_text_dataset
from fedlm.data.labels import LabelMap
from fedlm.distillation import EnsembleDistillation, FederatedDistillation
from fedlm.errors import ConfigError, FedlmError, ModelError, WireError
from fedlm.gate import checked_evaluation, checked_update
from fedlm.models.adapters import check_foldable, is_adapted, lora_scalings, merged_copy
from fedlm.models.federated import federated_spec, get_federated_vector, set_federated_vector
from fedlm.models.loading import load_tokenizer, quiet_transformers
from fedlm.privacy.accounting import RoundAccounting
from fedlm.privacy.homomorphic_round import HomomorphicError, encrypted_fit
from fedlm.privacy.secure_aggregation import SecAggError
from fedlm.privacy.secure_round import SecureAggregation, secure_fit
from fedlm.protocol import ClientInfo, ClientTransport, Compressed, EvaluateIns, FitIns, FitRes, LoopbackTransport
from fedlm.tasks.classification import EncodedDataset, encode, evaluate_model

logger = logging.getLogger("fedlm")

# how LoRA factors are aggregated (fedlm.core.lora): fedit averages A and B (inexact); ffa needs no
# step (A is frozen, not federated); stack folds the exact average of the products into the base
# weights; svd re-factors it to the global rank. stack and svd accept clients of lower ranks.
LORA_AGGREGATIONS = ("fedit", "ffa", "stack", "svd")
CLIENT_METRICS = ("accuracy", "macro_f1")  # what every client's evaluation reports, summarized per round


class FedServer:
    """Holds the global federated parameters and runs rounds over `clients`.

    Given `FedClient`s (the seed API and the in-process runtime), it checks that every client's
    model has the same federated parameters, builds the federation's label map from all clients'
    labels, and broadcasts the first client's parameters so that every client starts from the
    same global model; messages go through a `LoopbackTransport`. A deployment runtime builds the
    server with `over_transport` instead: clients are `ClientInfo`s of remote nodes.

    `lora_aggregation` (see `LORA_AGGREGATIONS`) applies to LoRA adapters. With `stack` or `svd`
    clients may hold adapters of different ranks; the global adapter has the largest.
    """

    def __init__(
        self,
        clients: Sequence[FedClient],
        strategy: Strategy | None = None,
        *,
        seed: int = 0,
        min_clients: int = 1,
        round_timeout: float | None = None,
        max_client_examples: int | None = None,
        lora_aggregation: str = "fedit",
        algorithm: FederatedDistillation | EnsembleDistillation | None = None,
    ) -> None:
        if not clients:
            raise ConfigError("FedServer needs at least one client")
        clients = list(clients)
        _name_clients(clients)
        if isinstance(algorithm, FederatedDistillation):  # clients may differ; the student is the global model
            model = algorithm.student
            tokenizer = algorithm.tokenizer or load_tokenizer(getattr(model, "name_or_path", ""), "the student")
        else:
            model, tokenizer = _largest_model(clients), clients[0].tokenizer
            _check_same_models(clients, lora_aggregation)
        label_map = _build_label_map(model, clients)
        if isinstance(algorithm, FederatedDistillation):
            label_map.check_fits(model.config.num_labels, owner="the student")
        transport = LoopbackTransport(clients)
        self._setup(clients, transport, model, tokenizer, label_map, clients[0].options, lora_aggregation, algorithm)
        # an update (or a client's outputs) and at most two strategy vectors of the same size, plus headers
        transport.max_reply_bytes = 3 * 4 * self.upload_numel() + (1 << 20)
        self._configure_rounds(strategy, seed, min_clients, round_timeout, max_client_examples)
        if isinstance(algorithm, FederatedDistillation):
            for client in clients:
                client.join_distillation(algorithm.public.texts)
        else:
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
        max_client_examples: int | None = None,
        lora_aggregation: str = "fedit",
        algorithm: FederatedDistillation | EnsembleDistillation | None = None,
    ) -> FedServer:
        """A server over clients that live elsewhere: `transport` reaches them by name, `model`
        holds the initial global parameters (the student, in federated distillation) and
        evaluates them, `options` sets evaluation's batch size, device and maximum length."""
        if not clients:
            raise ConfigError("FedServer needs at least one client")
        server = cls.__new__(cls)
        server._setup(list(clients), transport, model, tokenizer, label_map, options, lora_aggregation, algorithm)
        server._configure_rounds(strategy, seed, min_clients, round_timeout, max_client_examples)
        return server

    def _setup(self, clients, transport, model, tokenizer, label_map, options, lora_aggregation, algorithm) -> None:
        if lora_aggregation not in LORA_AGGREGATIONS:
            raise ConfigError(f"lora_aggregation must be one of {list(LORA_AGGREGATIONS)}, got {lora_aggregation!r}")
        self.clients = clients
        self.transport = transport
        self.label_map = label_map
        self.options = options
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self._model = model
        self._tokenizer = tokenizer
        self.lora_aggregation = lora_aggregation
        self.algorithm = algorithm  # None: weight averaging with the strategy
        self.distillation = algorithm if isinstance(algorithm, FederatedDistillation) else None
        # stack folds the adapters into the adapted layers' base weights, which then travel down
        self.lora_base = lora_aggregation == "stack" and bool(lora_pairs(federated_spec(model)))
        if self.lora_base:
            check_foldable(model)
        self.spec = federated_spec(model, self.lora_base)
        self.global_params = get_federated_vector(model, self.lora_base)
        self._initial_params = self.global_params.clone() if self.lora_base else None
        self.lora_pairs = lora_pairs(self.spec)
        self.lora_scalings = lora_scalings(model) if self.lora_pairs else {}
        self.lora_rank = max((pair.a_shape[0] for pair in self.lora_pairs), default=0)
        self.layouts = {} if self.distillation else self._client_layouts()
        # what each client declared when it joined (a FedClient's data is here): replies may not claim more
        self._examples = {
            client.name: len(client.data) if isinstance(client, FedClient) else client.num_examples
            for client in clients
        }
        self._test_examples = {
            client.name: len(client.test_data or []) if isinstance(client, FedClient) else client.num_test_examples
            for client in clients
        }
        self._eval_model: torch.nn.Module | None = None

    def upload_numel(self, name: str | None = None) -> int:
        """How many values a client's update holds (`name`'s, or the largest)."""
        if self.distillation is not None:
            return self.distillation.output_numel(self.label_map.num_labels)
        if name is not None and name in self.layouts:
            return self.layouts[name].upload.numel
        return self.spec.numel

    def _client_layouts(self) -> dict[str, ClientLayout]:
        """The layouts of clients whose vectors are not the global vector (lower LoRA ranks, or
        stack's base weights that travel down only), by name."""
        layouts = {}
        for client in self.clients:
            if isinstance(client, FedClient):
                download = federated_spec(client.model, self.lora_base)
                upload = federated_spec(client.model)
                scalings = lora_scalings(client.model) if self.lora_pairs else {}
                b_scale = {layer: scalings.get(layer, scale) / scale for layer, scale in self.lora_scalings.items()}
            elif client.lora_rank is not None or self.lora_base:
                # a node built its model from the run config: the global alpha, its own rank
                rank = client.lora_rank or self.lora_rank
                download = with_rank(self.spec, rank)
                upload = with_rank(self.spec, rank, drop=(".base_layer.weight",))
                b_scale = dict.fromkeys(self.lora_scalings, self.lora_rank / rank)
            else:
                continue
            try:
                layout = ClientLayout(self.spec, download, upload, b_scale)
            except ValueError as error:
                raise ModelError(f"client {client.name}: its model does not fit the global model: {error}") from None
            if not layout.same_ranks and self.lora_aggregation not in ("stack", "svd"):
                raise ModelError(
                    f"client {client.name}: its LoRA adapter has a lower rank than the global adapter; "
                    f"lora_aggregation {self.lora_aggregation} needs every client to use the same rank "
                    "(stack and svd accept different ranks)"
                )
            if not layout.is_identity:
                layouts[client.name] = layout
        return layouts

    def _configure_rounds(
        self,
        strategy: Strategy | None,
        seed: int,
        min_clients: int,
        round_timeout: float | None,
        max_client_examples: int | None,
    ) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        if max_client_examples is not None and max_client_examples < 1:
            raise ConfigError(f"max_client_examples must be >= 1, got {max_client_examples}")
        # the most examples one client's update counts for in the weighted average (None: what it
        # declared when it joined, which a remote client reports itself)
        self.max_client_examples = max_client_examples
        # codec specs ({"kind": "int8", ...}, see fedlm.core.compression) for updates sent up and
        # parameters sent down; the upload spec may add "error_feedback": true
        self.upload_codec: dict[str, Any] | None = None
        self.download_codec: dict[str, Any] | None = None
        # differential privacy's accounting (with a DifferentialPrivacy strategy); every
        # aggregated round is charged, and fit() stops before a round would exceed max_epsilon
        self.privacy: RoundAccounting | None = None
        self.stop_reason: str | None = None
        # secure aggregation's settings (fedlm.privacy.secure_round); None: clients send updates in the clear
        self.secure_aggregation: SecureAggregation | None = None
        # homomorphic aggregation's public CKKS context (fedlm.privacy.homomorphic_round; set with
        # aggregate_encrypted); None: clients send updates in the clear
        self.homomorphic_context: bytes | None = None
        self.strategy = strategy or FedAvg()
        self.seed = seed
        self.min_clients = min_clients
        self.round_timeout = round_timeout

    def aggregate_encrypted(self, public_context: bytes) -> None:
        """From now on clients send their updates CKKS-encrypted and the server adds ciphertexts
        with `public_context` (`HomomorphicKeys.public_context()`; the clients hold the secret key
        in `FedClient.homomorphic_keys`)."""
        self.homomorphic_context = public_context
        # ciphertexts take about 80 bytes a value (8,192-degree CKKS, 4,096 values each)
        self.transport.max_reply_bytes = max(self.transport.max_reply_bytes, 100 * self.upload_numel() + (1 << 20))

    # ---- the seed API ------------------------------------------------------------------------

    def broadcast_model(self) -> None:
        """Send the global parameters and the strategy's round instructions to every client
        (parameters are loaded once per distinct model object)."""
        clients = self._local_clients("broadcast_model")
        messages = self._fit_messages([client.name for client in clients], self.round + 1, 1, compress=False)
        loaded: set[int] = set()
        for client in clients:
            client.receive(messages[client.name], load_parameters=id(client.model) not in loaded)
            loaded.add(id(client.model))

    def _fit_messages(
        self, names: list[str], round_number: int, local_epochs: int, compress: bool = True
    ) -> dict[str, FitIns]:
        """Each named client's instructions for the round; `compress` applies the download codec
        (only to messages that travel: `broadcast_model` hands clients the exact parameters)."""
        if self.distillation is not None:  # plus DP's clipping and noise shares, when clients add them
            config, _ = self.strategy.configure_fit(self.global_params)
            base = {"round": round_number, "epochs": local_epochs, "seed": self.seed, **config}
            message = self.distillation.fit_message(base)
            if self.upload_codec is not None:
                message.config["upload_codec"] = self.upload_codec
            return dict.fromkeys(names, message)
        config, tensors = self.strategy.configure_fit(self.global_params)
        if tensors and any(not layout.same_ranks for layout in self.layouts.values()):
            raise ConfigError(
                f"{type(self.strategy).__name__} sends per-parameter state to clients, which clients of lower "
                "LoRA ranks cannot use; give every client the same rank or choose another strategy"
            )
        base = {"round": round_number, "epochs": local_epochs, "seed": self.seed, **config}
        if self.upload_codec is not None:
            base["upload_codec"] = self.upload_codec
        return self._messages(names, FitIns, base, tensors, compress)

    def _messages(self, names, message_type, config, tensors, compress) -> dict[str, Any]:
        """One message per distinct client layout, in each client's layout, shared by the clients
        with that layout (a message's bytes are encoded once)."""
        if self.lora_base:
            config = {**config, "lora_base": True}
        codec = codec_from_spec(self.download_codec) if compress and self.download_codec is not None else None
        by_layout: dict[int, Any] = {}
        messages = {}
        for name in names:
            layout = self.layouts.get(name)
            key = id(layout)
            if key not in by_layout:
                parameters = self.global_params if layout is None else layout.restrict(self.global_params)
                own_tensors = (
                    tensors
                    if layout is None
                    else {tensor_name: layout.restrict(tensor, upload=True) for tensor_name, tensor in tensors.items()}
                )
                if codec is not None:
                    parameters = Compressed.encode(codec, parameters)
                by_layout[key] = message_type(parameters, config, own_tensors)
            messages[name] = by_layout[key]
        return messages

    def aggregate_parameters(self) -> dict[str, Any]:
        """FedAvg (or the configured strategy) over the clients that trained since the last call."""
        updates, dropped = [], []
        for client in self._local_clients("aggregate_parameters"):
            result = client.take_update()
            if result is not None:
                self._accept(client.name, result, updates, dropped)
        if not updates:
            raise FedlmError("no client has a new update to aggregate; call client.local_train() first")
        aggregation = self._aggregate(updates, self.round + 1)
        self.round += 1
        record = {"round": self.round, "clients": len(updates), "dropped": dropped, **aggregation}
        self.history.append(record)
        return record

    def _aggregate(
        self, updates: list[ClientUpdate], round_number: int, secure_sum: tuple[torch.Tensor, float] | None = None
    ) -> dict[str, Any]:
        """The strategy's step, then for LoRA adapters the configured re-factoring (`svd`, `stack`)
        and the aggregation error it leaves, then FedDF's ensemble distillation if configured (in
        federated distillation: the student's training instead); returns the round's summary.
        Under secure or homomorphic aggregation the strategy gets the weighted sum of the updates instead
        (`secure_sum`: the sum and its total weight; `updates` then carry metrics only)."""
        summary = _train_summary(updates)
        if self.distillation is not None:
            return {**summary, **self.distillation.aggregate(self, updates, round_number)}
        previous = self.global_params
        if secure_sum is not None:
            total, weight = secure_sum
            examples = sum(update.num_examples for update in updates)
            if isinstance(self.strategy, DifferentialPrivacy):
                self.global_params = self.strategy.aggregate_sum(previous, total, examples)
            else:
                self.global_params = self.strategy.aggregate(previous, [ClientUpdate(total / weight, examples)])
            return summary
        self.global_params = self.strategy.aggregate(previous, updates)
        if self.lora_pairs:
            if self.lora_aggregation == "svd":
                self.global_params = svd_refactor(previous, self.global_params, updates, self.lora_pairs)
            if self.lora_base:
                self.global_params = fold_products(
                    previous, self.global_params, updates, self.lora_pairs, self.lora_scalings, self._initial_params
                )
            summary["lora_aggregation_error"] = lora_aggregation_error(
                previous, self.global_params, updates, self.lora_pairs, self.lora_scalings if self.lora_base else None
            )
        if isinstance(self.algorithm, EnsembleDistillation):
            self.global_params, metrics = self.algorithm.refine(
                self, previous, self.global_params, updates, round_number
            )
            summary.update(metrics)
        return summary

    def get_model(self) -> torch.nn.Module:
        """A transformers model holding the global parameters (a copy: later rounds do not change it)."""
        return copy.deepcopy(self._global_model())

    def save(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Write the global model, tokenizer and label map with `save_pretrained`. An adapter model
        is written merged into a plain transformers model (`merge_lora=True`, loads with
        `from_pretrained`) or as the PEFT adapter folder with the classification head
        (`merge_lora=False`, loads with `PeftModel.from_pretrained` over the base model)."""
        if self.lora_base and not merge_lora:
            raise ConfigError(
                "stack aggregation folds the adapters into the base weights every round, so the model is not "
                "an adapter over the original base: save it with merge_lora=True"
            )
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
        set_federated_vector(self._eval_model, self.global_params, self.lora_base)
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
            projected = None if self.privacy is None else self.privacy.next_round_exceeds_budget()
            if projected is not None:
                self.stop_reason = (
                    f"stopped before round {self.round + 1}: it would bring epsilon to {projected:.3f}, over "
                    f"max_epsilon {self.privacy.max_epsilon} (delta {self.privacy.delta})"
                )
                logger.warning("%s", self.stop_reason)
                break
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
        sampled = self.sample_clients(self.round, clients_per_evaluation, purpose="evaluate")
        names = [client.name for client in sampled if client.has_test_data]
        if self.distillation is not None:  # each client's own model
            config = {"round": self.round, "distillation": self.distillation.client_config()}
            messages = dict.fromkeys(names, EvaluateIns(torch.zeros(0), config))
        else:
            messages = self._messages(names, EvaluateIns, {"round": self.round}, {}, compress=False)
        results = []
        for name, reply in self.transport.evaluate(messages, self._deadline()).items():
            try:
                if isinstance(reply, str):
                    raise WireError(reply)
                metrics = checked_evaluation(reply, self._test_examples[name], CLIENT_METRICS)
            except WireError as error:
                logger.warning(
                    "round %d: client %s failed to evaluate: %s", self.round, self.transport.describe(name), error
                )
                continue
            if reply.num_examples > 0:
                results.append({"client": name, "num_examples": reply.num_examples, **metrics})
        if not results:
            return {}
        summary: dict[str, Any] = {"clients_evaluated": len(results)}
        weights = [result["num_examples"] for result in results]
        for metric in CLIENT_METRICS:
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
        bytes_before = self.byte_counts()

        # 1-3. train the sampled clients; keep the valid updates
        names = [client.name for client in self.sample_clients(round_number, clients_per_round)]
        messages = self._fit_messages(names, round_number, local_epochs)
        updates: list[ClientUpdate] = []
        dropped: list[dict[str, str]] = []
        record: dict[str, Any] = {"round": round_number}
        secure_sum = None
        summed = self.secure_aggregation is not None or self.homomorphic_context is not None
        if summed:  # the server gets only the sum of the updates
            secure_sum = self._summed_train(messages, round_number, updates, dropped, record)
        else:
            replies = self.transport.fit(messages, self._deadline())
            for name, reply in replies.items():
                if isinstance(reply, str):
                    self._drop(round_number, name, reply, dropped)
                else:
                    self._accept(name, reply, updates, dropped)
            record.update(_client_epsilons(replies))
        record.update({"clients": len(updates), "dropped": dropped})

        # 4. aggregate, or skip the round when too few clients remain
        if len(updates) >= self.min_clients and (not summed or secure_sum is not None):
            record.update(self._aggregate(updates, round_number, secure_sum))
            if self.privacy is not None:  # a released aggregate: the round costs privacy
                private = isinstance(self.strategy, DifferentialPrivacy)
                noise = self.strategy.round_noise_multiplier(len(updates)) if private else None
                record.update(self.privacy.spend_round(noise))
                record.update({f"dp_{key}": value for key, value in getattr(self.strategy, "last_round", {}).items()})
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
        record.update(self.bytes_since(bytes_before))
        record["seconds"] = time.perf_counter() - start
        # what the round cost beyond training and evaluation (clients train one after the other in
        # process, side by side in a deployment)
        training = record.get("train_seconds_max" if self.transport.parallel else "train_seconds", 0.0)
        record["overhead_seconds"] = record["seconds"] - record["eval_seconds"] - training
        self.history.append(record)
        return record

    def byte_counts(self) -> dict[str, tuple[int, int]]:
        """Bytes sent so far, (down, up), per client name and in total (key None)."""
        counts: dict[Any, tuple[int, int]] = {
            name: (down, up) for name, (down, up) in self.transport.bytes.by_client.items()
        }
        counts[None] = (self.transport.bytes.down, self.transport.bytes.up)
        return counts

    def bytes_since(self, before: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """`bytes_down`, `bytes_up` and `client_bytes` ({name: {down, up}}) sent since `before`
        (`byte_counts()`), as measured on the serialized messages."""
        now = self.byte_counts()
        moved = {
            name: {"down": down - before.get(name, (0, 0))[0], "up": up - before.get(name, (0, 0))[1]}
            for name, (down, up) in now.items()
            if (down, up) != before.get(name, (0, 0))
        }
        total = moved.pop(None, {"down": 0, "up": 0})
        return {"bytes_down": total["down"], "bytes_up": total["up"], "client_bytes": moved}

    def _summed_train(
        self,
        messages: dict[str, FitIns],
        round_number: int,
        updates: list[ClientUpdate],
        dropped: list[dict[str, str]],
        record: dict[str, Any],
    ) -> tuple[torch.Tensor, float] | None:
        """Train under secure or homomorphic aggregation; `updates` get the finished clients'
        metrics (no vectors: the server never sees one). Returns the weighted sum and its total
        weight, or None when the sum cannot be recovered (the round is then skipped)."""
        private = isinstance(self.strategy, DifferentialPrivacy)  # every client counts once
        examples = {name: self._counted(self._examples[name]) for name in messages}
        weights = {name: 1.0 if private else count / sum(examples.values()) for name, count in examples.items()}
        protocol, key = (
            (secure_fit, "secure_aggregation")
            if self.secure_aggregation is not None
            else (encrypted_fit, "homomorphic")
        )
        try:
            total, replies, failed, summary = protocol(self, messages, weights)
        except (SecAggError, HomomorphicError) as error:
            logger.warning("round %d: %s failed: %s; global model unchanged", round_number, key, error)
            record[key] = {"error": str(error)}
            return None
        for name, reason in failed.items():
            self._drop(round_number, name, reason, dropped)
        # the counts the weights were made from, not the replies' own claims
        updates.extend(ClientUpdate(torch.zeros(0), examples[name], reply.metrics) for name, reply in replies.items())
        record[key] = summary
        record.update(_client_epsilons(replies))
        return total, sum(weights[name] for name in replies)

    def _drop(self, round_number: int, name: str, reason: str, dropped: list[dict[str, str]]) -> None:
        logger.warning("round %d: client %s dropped: %s", round_number, self.transport.describe(name), reason)
        dropped.append({"client": name, "reason": reason})

    def _accept(self, name: str, result: FitRes, updates: list[ClientUpdate], dropped: list[dict[str, str]]) -> None:
        """Through the validation gate (`fedlm.gate.checked_update`) into the global layout; a
        reply that fails it drops the client, naming the reason."""
        try:
            delta, num_examples, metrics, extras = checked_update(result, self.upload_numel(name), self._examples[name])
        except WireError as error:
            self._drop(self.round + 1, name, str(error), dropped)
            return
        layout = self.layouts.get(name)
        if layout is not None:  # into the global layout: the client's factors, then their difference
            trained = layout.restrict(self.global_params, upload=True) + delta
            delta = layout.embed(trained, self.global_params) - self.global_params
            extras = {key: layout.embed(value, torch.zeros_like(self.global_params)) for key, value in extras.items()}
        updates.append(ClientUpdate(delta, self._counted(num_examples), metrics, extras))

    def _counted(self, num_examples: int) -> int:
        return num_examples if self.max_client_examples is None else min(num_examples, self.max_client_examples)

    def _deadline(self) -> float | None:
        return None if self.round_timeout is None else time.monotonic() + self.round_timeout

    def _local_clients(self, method: str) -> list[FedClient]:
        if self.distillation is not None:
            raise FedlmError(f"{method} averages weights; a server running FederatedDistillation trains with fit()")
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


def _largest_model(clients: list[FedClient]) -> torch.nn.Module:
    """The model with the most federated parameters (the highest LoRA rank when ranks differ)."""
    return max((client.model for client in clients), key=lambda model: federated_spec(model).numel)


def _check_same_models(clients: list[FedClient], lora_aggregation: str) -> None:
    """A `ModelError` naming the first client whose federated parameters differ from the first
    client's, unless only LoRA ranks differ and the aggregation mode accepts that."""
    reference = clients[0]
    spec = federated_spec(reference.model)
    for client in clients[1:]:
        if client.model is reference.model:
            continue
        difference = spec.first_difference(federated_spec(client.model))
        if difference and ".lora_" in difference and lora_aggregation not in ("stack", "svd"):
            raise ModelError(
                f"client {client.name}: its LoRA adapter differs from client {reference.name}'s: {difference}; "
                f"lora_aggregation {lora_aggregation} needs every client to use the same rank and target modules "
                "(stack and svd accept different ranks)"
            )
        if difference and ".lora_" not in difference:
            raise ModelError(
                f"client {client.name}: its model's federated parameters differ from client "
                f"{reference.name}'s: {difference}; every client must load the same architecture"
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


def _client_epsilons(replies: dict[str, FitRes | str]) -> dict[str, Any]:
    """DP-SGD: each client's own epsilon after this round, by name (clients account for
    themselves), and the largest, which holds for every client."""
    trained = [(name, reply.metrics) for name, reply in replies.items() if not isinstance(reply, str)]
    epsilons = {name: metrics["dp_sgd_epsilon"] for name, metrics in trained if "dp_sgd_epsilon" in metrics}
    if not epsilons:
        return {}
    delta = max(metrics["dp_sgd_delta"] for _, metrics in trained if "dp_sgd_delta" in metrics)
    return {"client_dp_sgd_epsilon": epsilons, "dp_sgd_epsilon_max": max(epsilons.values()), "dp_sgd_delta": delta}


def _train_summary(updates: list[ClientUpdate]) -> dict[str, float]:
    total = sum(update.num_examples for update in updates)
    losses = [(update.metrics.get("loss", math.nan), update.num_examples) for update in updates]
    return {
        "train_loss": sum(loss * n for loss, n in losses) / total,
        "train_examples": total,
        "train_seconds": sum(update.metrics.get("seconds", 0.0) for update in updates),
        "train_seconds_max": max(update.metrics.get("seconds", 0.0) for update in updates),  # clients in parallel
    }
