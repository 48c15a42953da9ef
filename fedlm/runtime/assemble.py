"""Assembling a federation: the one place that turns a `RunConfig` into a complete `FedServer`.

Both runtimes call `build_federation` (`fedlm.runtime.local` over in-process clients, the Flower
ServerApp over remote nodes), and every participant builds its model with `build_model`, so the
config means the same everywhere.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from fedlm.algorithms import DecoderDistillation, DistillationSettings, EnsembleDistillation, FederatedDistillation
from fedlm.channels import HomomorphicAggregation, PlainChannel, SecureAggregation, UpdateChannel
from fedlm.config import (
    AdapterConfig,
    DistillationConfig,
    EnsembleDistillationConfig,
    Ia3Config,
    LoraConfig,
    PromptTuningConfig,
    RunConfig,
    StrategyConfig,
)
from fedlm.core.privacy import AdaptiveClipping, DifferentialPrivacy
from fedlm.core.robust import ROBUST_AGGREGATES
from fedlm.core.schedule import LearningRateSchedule
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import STRATEGIES, Strategy
from fedlm.data.dataset import TextDataset
from fedlm.data.report import client_groups as groups_of_partition
from fedlm.errors import ConfigError
from fedlm.models import load_tokenizer
from fedlm.models.adapters import add_adapter, freeze_lora_a, prepare_quantized
from fedlm.models.loading import quantized_loading
from fedlm.privacy.accounting import RoundAccounting, compute_epsilon, noise_for_epsilon
from fedlm.protocol import ClientTransport
from fedlm.runtime.federated_data import build_task, load_public_data, resolve_clients_per_round
from fedlm.runtime.rounds import Federation
from fedlm.server import FedServer, GlobalModel
from fedlm.tasks import Task

logger = logging.getLogger("fedlm")


def build_federation(
    config: RunConfig,
    clients: list[Any],
    algorithm: FederatedDistillation | EnsembleDistillation | None,
    *,
    public_context: bytes | None = None,
    transport: ClientTransport | None = None,
    global_model: GlobalModel | None = None,
    validation: Any = None,
    partition: dict[str, Any] | None = None,
    client_groups: dict[str, str] | None = None,
) -> Federation:
    """The config's server over `clients`: in-process `FedClient`s, or remote clients' `ClientInfo`s
    with the `transport` that reaches them and the `global_model` (the initial global parameters).
    `public_context`: homomorphic aggregation's public CKKS context; `validation`: the federated
    validation set (encoded here; the task's sample prompts come from it); `partition`: the
    partition summary for the run folder; `client_groups`: each client's group for the grouped
    test results (default: from the partition summary's column)."""
    clients_per_round = resolve_clients_per_round(config, len(clients))
    strategy, accounting = add_privacy(
        config, build_strategy(config.strategy, len(clients)), len(clients), clients_per_round
    )
    download = config.communication.download
    server = FedServer(
        clients,
        strategy,
        seed=config.seed,
        min_clients=config.federation.min_clients,
        max_client_examples=config.federation.max_client_examples,
        round_timeout=config.federation.round_timeout,
        lora_aggregation=lora_aggregation(config),
        algorithm=algorithm,
        channel=build_channel(config, public_context),
        privacy=accounting,
        download_codec=None if download is None else download.model_dump(exclude={"error_feedback"}),
        transport=transport,
        global_model=global_model,
        learning_rates=learning_rate_schedule(config),
        max_total_bytes=config.federation.max_total_bytes,
    )
    encoded, prompts = None, []
    if validation is not None:
        task = server.global_model.task
        validation = task.read(validation, config.data.text_column, config.data.label_column, owner="validation set")
        prompts = task.sample_prompts(validation, derive_seed(config.seed, "samples"))
        encoded = server.encode_dataset(validation)
    groups = groups_of_partition(partition) if client_groups is None else client_groups
    return Federation(config, server, encoded, clients_per_round, partition, prompts, groups)


def learning_rate_schedule(config: RunConfig) -> LearningRateSchedule | None:
    """The local learning rate of each round (None: constant, the clients' own)."""
    training = config.training
    if training.lr_schedule == "constant":
        return None
    return LearningRateSchedule(
        training.lr_schedule, training.learning_rate, training.min_learning_rate, config.federation.rounds
    )


def build_channel(config: RunConfig, public_context: bytes | None) -> UpdateChannel:
    """The config's update channel: secure or homomorphic aggregation, else plain (with the
    upload codec, if any)."""
    if config.secure_aggregation is not None:
        return SecureAggregation(**config.secure_aggregation.model_dump())
    if config.homomorphic is not None:
        return HomomorphicAggregation(public_context)
    upload = config.communication.upload
    return PlainChannel(None if upload is None else upload.model_dump())


def build_strategy(config: StrategyConfig, num_clients: int) -> Strategy:
    """The strategy registered under `config.kind`, built from its section's fields; one whose
    constructor takes `num_clients` (SCAFFOLD) and whose section does not set it gets the run's."""
    if config.kind not in STRATEGIES:
        raise ConfigError(
            f"strategy.kind {config.kind!r} has a config section but no strategy class: register both with "
            f"fedlm.register_strategy; registered: {list(STRATEGIES)}"
        )
    strategy_class = STRATEGIES[config.kind]
    options = config.model_dump(exclude={"kind", "robust"})
    if config.robust is not None:
        robust_options = config.robust.model_dump(exclude={"kind"})
        options["robust"] = ROBUST_AGGREGATES[config.robust.kind](**robust_options)
    if "num_clients" in inspect.signature(strategy_class).parameters:
        options.setdefault("num_clients", num_clients)
    return strategy_class(**options)


def add_privacy(
    config: RunConfig, strategy: Strategy, num_clients: int, clients_per_round: int | None
) -> tuple[Strategy, RoundAccounting | None]:
    """The strategy wrapped in DP-FedAvg and the run's privacy accounting, when the config has
    `dp`; the noise multiplier comes from `target_epsilon` for the configured rounds if asked."""
    settings = config.dp
    if settings is None:
        return strategy, None
    expected = clients_per_round or num_clients
    sampling_rate = expected / num_clients
    rounds = config.federation.rounds
    noise_multiplier = settings.noise_multiplier or noise_for_epsilon(
        settings.target_epsilon, sampling_rate, rounds, settings.delta, settings.accountant
    )
    adaptive = None
    if settings.adaptive is not None:
        options = settings.adaptive.model_dump()
        options["count_noise"] = options["count_noise"] or expected / 20  # Andrew et al.'s suggestion
        adaptive = AdaptiveClipping(**options)
    try:
        private = DifferentialPrivacy(
            strategy, noise_multiplier=noise_multiplier, clip_norm=settings.clip_norm, expected_clients=expected,
            noise=settings.noise, adaptive=adaptive, seed=derive_seed(config.seed, "dp"),
        )  # fmt: skip
    except ValueError as error:
        raise ConfigError(f"dp: {error}") from None
    accounting = RoundAccounting(
        noise_multiplier, sampling_rate, settings.delta, settings.accountant, settings.max_epsilon
    )
    projected = compute_epsilon(noise_multiplier, sampling_rate, rounds, settings.delta, settings.accountant)
    if (
        settings.max_epsilon is not None
        and compute_epsilon(noise_multiplier, sampling_rate, 1, settings.delta, settings.accountant)
        > settings.max_epsilon
    ):
        raise ConfigError(
            f"dp: a single round at noise multiplier {noise_multiplier:.3g} already exceeds max_epsilon "
            f"{settings.max_epsilon}; use at least noise multiplier "
            f"{noise_for_epsilon(settings.max_epsilon, sampling_rate, 1, settings.delta, settings.accountant):.3g}"
        )
    if settings.max_epsilon is not None and projected > settings.max_epsilon:
        needed = noise_for_epsilon(settings.max_epsilon, sampling_rate, rounds, settings.delta, settings.accountant)
        logger.warning(
            "dp: %d rounds at noise multiplier %.4g reach epsilon %.3f > max_epsilon %g: the run will stop early; "
            "noise multiplier %.4g would last all rounds",
            rounds, noise_multiplier, projected, settings.max_epsilon, needed,
        )  # fmt: skip
    logger.info(
        "dp: noise multiplier %.4g, clip norm %g, q %.3g: epsilon %.3f after %d rounds at delta %g",
        noise_multiplier, settings.clip_norm, sampling_rate, projected, rounds, settings.delta,
    )  # fmt: skip
    return private, accounting


def build_model(config: RunConfig, model_name: str, metadata: Any, lora_rank: int | None = None) -> torch.nn.Module:
    """The run's model: pretrained `model_name` with the head of the config's task for the
    federation's `metadata` (classification: its label map), seeded from the run seed, and the
    config's PEFT adapter, if any (a LoRA adapter of rank `lora_rank` instead of the config's r
    when given), over a base quantized by `model.quantization`. Every participant builds the same one."""
    options = {}
    if config.model.quantization != "none":
        training = config.training
        options = quantized_loading(config.model.quantization, training.device, training.mixed_precision)
    model = build_task(config).load_model(model_name, metadata, seed=derive_seed(config.seed, "init"), **options)
    check_max_length(config, model, model_name)
    if config.peft is None:
        return model
    if options:
        prepare_quantized(model)
    settings = config.peft
    if lora_rank is not None:
        settings = settings.model_copy(update={"r": lora_rank})
    model = add_adapter(model, peft_config(settings), seed=derive_seed(config.seed, "adapter"))
    if isinstance(config.peft, LoraConfig) and config.peft.aggregation == "ffa":
        freeze_lora_a(model)
    return model


def check_max_length(config: RunConfig, model: torch.nn.Module, model_name: str) -> None:
    """Refuse a `training.max_length` longer than the sequences `model` has position embeddings
    for (`max_position_embeddings`, GPT-2's `n_positions`); prompt tuning's virtual tokens count too."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None:  # no learned positions: no limit to check
        return
    embeddings = getattr(model.base_model, "embeddings", None)
    padding = getattr(embeddings, "padding_idx", None)
    if padding is not None:  # RoBERTa-style positions start after the padding index
        limit -= padding + 1
    tokens, virtual = config.training.max_length, 0
    if isinstance(config.peft, PromptTuningConfig):
        virtual = config.peft.num_virtual_tokens
    if tokens + virtual > limit:
        prompt = f" plus peft.num_virtual_tokens {virtual}" if virtual else ""
        raise ConfigError(
            f"training.max_length {tokens}{prompt} exceeds the {limit} positions model {model_name} has embeddings "
            f"for; set training.max_length to at most {limit - virtual}"
        )


def check_device(device: str) -> None:
    """Refuse a `training.device` (checked for form by the config) that this machine does not have."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "mps":
        count = 1 if torch.backends.mps.is_available() else 0
    else:  # cuda, xpu
        backend = getattr(torch, kind)
        count = backend.device_count() if backend.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"training.device {device}: this machine has no {kind} device (torch {torch.__version__}); use cpu"
        )
    if index and int(index) >= count:
        raise ConfigError(
            f"training.device {device}: this machine has {count} {kind} device(s), {kind}:0 to {kind}:{count - 1}"
        )


def peft_config(settings: AdapterConfig) -> Any:
    """The PEFT library's config for fedlm's adapter settings."""
    import peft

    auto = None
    if isinstance(settings, LoraConfig):
        targets = auto if settings.target_modules == "auto" else settings.target_modules
        return peft.LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets
        )
    if isinstance(settings, Ia3Config):
        return peft.IA3Config(
            target_modules=auto if settings.target_modules == "auto" else settings.target_modules,
            feedforward_modules=auto if settings.feedforward_modules == "auto" else settings.feedforward_modules,
        )
    return peft.PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens)


def lora_aggregation(config: RunConfig) -> str:
    return config.peft.aggregation if isinstance(config.peft, LoraConfig) else "fedit"


def build_algorithm(
    config: RunConfig, task: Task, metadata: Any, held_out_public: TextDataset | None = None
) -> FederatedDistillation | EnsembleDistillation | None:
    """The config's distillation algorithm (None: weight averaging), with its public set (the
    slice held out of a simulation's dataset, or its own) and, for federated distillation, the
    student (seeded head, for the task's `metadata`). Distillation needs a task of class labels."""
    settings = config.algorithm
    if settings is None:
        return None
    decoders = task.kind == "causal_lm" and isinstance(settings, DistillationConfig)
    if not task.class_labels and not decoders:
        raise ConfigError(
            f"algorithm {settings.kind} distils class probabilities, and task {task.kind!r} has no class labels; "
            "remove the algorithm section (weight averaging), or use a classification task (or, for decoders, "
            "algorithm distillation)"
        )
    public = load_public_data(config, task, held_out_public)
    training = settings.model_dump(include=set(DistillationSettings.__dataclass_fields__))
    if decoders:
        student_name = settings.student or config.model.name
        student = task.load_model(student_name, metadata, seed=derive_seed(config.seed, "student"))
        check_max_length(config, student, student_name)
        options = {key: training[key] for key in ("temperature", "weighting", "epochs", "learning_rate", "batch_size")}
        return DecoderDistillation(public, student, load_tokenizer(student_name), top_k=settings.top_k, **options)
    columns = {"text_column": settings.public_data.text_column, "label_column": settings.public_data.label_column}
    if isinstance(settings, EnsembleDistillationConfig):
        return EnsembleDistillation(public, **columns, **training)
    student_name = settings.student or config.model.name
    student = task.load_model(student_name, metadata, seed=derive_seed(config.seed, "student"))
    check_max_length(config, student, student_name)
    return FederatedDistillation(
        public, student, load_tokenizer(student_name), client_output=settings.client_output,
        digest_epochs=settings.digest_epochs, soft_labels_cover=settings.soft_labels_cover, **columns, **training,
    )  # fmt: skip
