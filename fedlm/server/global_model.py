"""The global model: the flat vector of federated parameters and everything that maps it onto
clients and back onto a transformers model.

Clients may hold LoRA adapters of lower ranks than the global adapter (`fedlm.core.layout`), and
with `stack` aggregation the adapted layers' base weights travel down too; `GlobalModel` keeps
each such client's layout, cuts the global vector down to it (`restrict`) and embeds a client's
update back (`to_global`). After the strategy's step it applies the configured LoRA re-factoring
(`refactor`). `model()` materializes the vector as the transformers model that evaluates it and
that `save` writes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from fedlm.client import FedClient, TrainingOptions
from fedlm.core.compression import Codec, Compressed
from fedlm.core.layout import ClientLayout, with_rank
from fedlm.core.lora import fold_products, lora_aggregation_error, lora_pairs, svd_refactor
from fedlm.core.update import ClientUpdate
from fedlm.errors import ConfigError, ModelError
from fedlm.models.adapters import check_foldable, is_adapted, lora_scalings, merged_copy
from fedlm.models.federated import federated_spec, get_federated_vector, set_federated_vector
from fedlm.models.loading import is_quantized, load_tokenizer, quiet_transformers
from fedlm.tasks import Task
from fedlm.tasks.text import EncodedDataset, report_encoding

# how LoRA factors are aggregated (fedlm.core.lora): fedit averages A and B (inexact); ffa needs no
# step (A is frozen, not federated); stack folds the exact average of the products into the base
# weights; svd re-factors it to the global rank. stack and svd accept clients of lower ranks.
LORA_AGGREGATIONS = ("fedit", "ffa", "stack", "svd")


class GlobalModel:
    """The global parameters of `model` (its federated vector; `model` is the template the
    global model is materialized from) with its tokenizer, the federation's `task` and its
    `metadata` (classification: the label map), and the `options` it is evaluated with (batch
    size, maximum length, device).

    `clients` are the participants whose vectors may differ from the global one: each brings its
    own `model` (a `FedClient`) or, remotely, only its `lora_rank` (a `ClientInfo`; a node builds
    its model from the run config). `layouts=False` for an algorithm whose clients send no
    weights (federated distillation)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        metadata: Any,
        options: TrainingOptions,
        lora_aggregation: str = "fedit",
        clients: tuple[Any, ...] | list[Any] = (),
        layouts: bool = True,
    ) -> None:
        if lora_aggregation not in LORA_AGGREGATIONS:
            raise ConfigError(f"lora_aggregation must be one of {list(LORA_AGGREGATIONS)}, got {lora_aggregation!r}")
        self.template = model
        self.tokenizer = tokenizer
        self.task = task
        self.metadata = metadata
        self.options = options
        self.lora_aggregation = lora_aggregation
        # stack folds the adapters into the adapted layers' base weights, which then travel down
        self.lora_base = lora_aggregation == "stack" and bool(lora_pairs(federated_spec(model)))
        if self.lora_base:
            check_foldable(model)
        self.spec = federated_spec(model, self.lora_base)
        self.params = get_federated_vector(model, self.lora_base)
        self._initial_params = self.params.clone() if self.lora_base else None
        self.lora_pairs = lora_pairs(self.spec)
        self.lora_scalings = lora_scalings(model) if self.lora_pairs else {}
        self.lora_rank = max((pair.a_shape[0] for pair in self.lora_pairs), default=0)
        self.layouts = self._client_layouts(clients) if layouts else {}
        self._materialized: torch.nn.Module | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def encode(self, texts: list[str], targets: list[Any], owner: str = "dataset") -> EncodedDataset:
        """`texts` tokenized with the global model's tokenizer and maximum length, with their
        encoded `targets` (`encode_targets`); rows the task skips or cuts are logged, naming `owner`."""
        encoded = self.task.encode(self.tokenizer, texts, targets, self.options.max_length, owner)
        report_encoding(encoded, len(texts), owner, self.options.max_length)
        return encoded

    def encode_targets(self, targets: list[Any], owner: str) -> list[Any]:
        """Raw targets encoded with the federation's metadata (classification: class ids)."""
        return self.task.encode_targets(self.metadata, targets, owner)

    def upload_numel(self, name: str | None = None) -> int:
        """How many values a client's update holds (`name`'s, or the global vector's)."""
        if name is not None and name in self.layouts:
            return self.layouts[name].upload.numel
        return self.spec.numel

    def _client_layouts(self, clients) -> dict[str, ClientLayout]:
        """The layouts of clients whose vectors are not the global vector (lower LoRA ranks, or
        stack's base weights that travel down only), by name."""
        layouts = {}
        for client in clients:
            model = getattr(client, "model", None)
            if model is not None:
                download = federated_spec(model, self.lora_base)
                upload = federated_spec(model)
                scalings = lora_scalings(model) if self.lora_pairs else {}
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

    # ---- to and from the clients -------------------------------------------------------------

    def messages(self, names, message_type, config, tensors, codec: Codec | None = None) -> dict[str, Any]:
        """One message per distinct client layout, in each client's layout, shared by the clients
        with that layout (a message's bytes are encoded once); `codec` compresses the parameters."""
        if tensors and any(not layout.same_ranks for layout in self.layouts.values()):
            raise ConfigError(
                "this strategy sends per-parameter state to clients, which clients of lower LoRA ranks cannot use; "
                "give every client the same rank or choose another strategy"
            )
        if self.lora_base:
            config = {**config, "lora_base": True}
        by_layout: dict[int, Any] = {}
        messages = {}
        for name in names:
            layout = self.layouts.get(name)
            key = id(layout)
            if key not in by_layout:
                parameters = self.params if layout is None else layout.restrict(self.params)
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

    def to_global(
        self, name: str, delta: torch.Tensor, extras: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A client's (checked) update and extras in the global layout: its trained factors
        embedded, then their difference from the global parameters."""
        layout = self.layouts.get(name)
        if layout is None:
            return delta, extras
        trained = layout.restrict(self.params, upload=True) + delta
        delta = layout.embed(trained, self.params) - self.params
        extras = {key: layout.embed(value, torch.zeros_like(self.params)) for key, value in extras.items()}
        return delta, extras

    def refactor(self, previous: torch.Tensor, updates: list[ClientUpdate]) -> dict[str, float]:
        """After the strategy's step from `previous`: the configured LoRA re-factoring (`svd`
        re-factors to the global rank, `stack` folds the products into the base weights) and the
        aggregation error it leaves, for the round's record."""
        if not self.lora_pairs:
            return {}
        if self.lora_aggregation == "svd":
            self.params = svd_refactor(previous, self.params, updates, self.lora_pairs)
        if self.lora_base:
            self.params = fold_products(
                previous, self.params, updates, self.lora_pairs, self.lora_scalings, self._initial_params
            )
        scalings = self.lora_scalings if self.lora_base else None
        return {
            "lora_aggregation_error": lora_aggregation_error(previous, self.params, updates, self.lora_pairs, scalings)
        }

    # ---- as a transformers model -------------------------------------------------------------

    def model(self, params: torch.Tensor | None = None) -> torch.nn.Module:
        """The transformers model holding the global parameters (or `params`); one replica,
        reused: later calls change it."""
        if self._materialized is None:
            self._materialized = copy.deepcopy(self.template)
            self.task.annotate_model(self._materialized, self.metadata)
        set_federated_vector(self._materialized, self.params if params is None else params, self.lora_base)
        return self._materialized

    def generate(self, prompts: list[dict[str, Any]]) -> list[str]:
        """The global model's responses to the task's sample prompts (`Task.sample_prompts`)."""
        model = self.model().to(self.options.device)
        return self.task.generate(model, self.tokenizer, prompts, self.options.max_length, self.options.device)

    def read(self, model: torch.nn.Module) -> torch.Tensor:
        """The federated vector of `model` (the materialized model, after training it)."""
        return get_federated_vector(model, self.lora_base)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global parameters, for a checkpoint."""
        return {"parameters": self.params.contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take back `state_dict()`'s parameters; a ValueError when there are none or they do not fit."""
        params = state.get("parameters")
        if params is None:
            raise ValueError("no 'parameters'")
        if params.shape != self.params.shape:
            raise ValueError(f"{params.numel()} parameters, the model has {self.spec.numel}")
        self.params = params.clone()

    def save(self, path: str | Path, round_number: int, merge_lora: bool = True) -> Path:
        """Write the model and tokenizer with `save_pretrained`, and fedlm.json (the round, the task
        and its metadata, such as the label map). An adapter model is
        written merged into a plain transformers model (`merge_lora=True`, loads with
        `from_pretrained`) or as the PEFT adapter folder with the classification head
        (`merge_lora=False`, loads with `PeftModel.from_pretrained` over the base model). Over a
        quantized base the adapter folder is written either way: merging would round the update
        into the base's 4 or 8 bits."""
        if self.lora_base and not merge_lora:
            raise ConfigError(
                "stack aggregation folds the adapters into the base weights every round, so the model is not "
                "an adapter over the original base: save it with merge_lora=True"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self.model()
        with quiet_transformers():
            if is_adapted(model) and merge_lora and not is_quantized(model):
                merged_copy(model).save_pretrained(path)
            elif is_adapted(model):
                model.save_pretrained(path, save_embedding_layers=False)
            else:
                model.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        info = {
            "round": round_number,
            "task": self.task.kind,
            "metadata": self.task.metadata_to_json(self.metadata),
            "num_parameters": self.spec.numel,
        }
        (path / "fedlm.json").write_text(json.dumps(info, indent=2))
        return path


def global_model_of(clients: list[FedClient], lora_aggregation: str, algorithm: Any) -> GlobalModel:
    """The global model of in-process clients: the largest client model (the highest LoRA rank
    when ranks differ) after checking that every client's federated parameters match, or the
    student of an algorithm that replaces weights (clients may then differ), for the clients'
    task; the task's metadata is the model's own (classification: its real label names) when it
    has it, else joined from every client's target keys (classification: their labels, sorted)."""
    if algorithm.replaces_weights:
        model = algorithm.student
        tokenizer = algorithm.tokenizer or load_tokenizer(getattr(model, "name_or_path", ""), "the student")
    else:
        model = max((client.model for client in clients), key=lambda model: federated_spec(model).numel)
        tokenizer = clients[0].tokenizer
        _check_same_models(clients, lora_aggregation)
    task = _common_task(clients)
    metadata = task.metadata_from_model(model)
    if metadata is None:
        metadata = task.metadata(key for client in clients for key in client.target_keys())
    for client in clients:
        client.set_metadata(metadata)
    if algorithm.replaces_weights:
        task.check_model(model, metadata, owner="the student")
    options = clients[0].options
    return GlobalModel(
        model, tokenizer, task, metadata, options, lora_aggregation, clients, not algorithm.replaces_weights
    )


def _common_task(clients: list[FedClient]) -> Task:
    """The task every client trains (the first client's), or a ConfigError naming one that differs."""
    task = clients[0].task
    for client in clients[1:]:
        if type(client.task) is not type(task):
            raise ConfigError(
                f"client {client.name} trains task {client.task.kind!r}, client {clients[0].name} task {task.kind!r}; "
                "every client of a federation must train the same task (FedClient(task=...))"
            )
    return task


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
