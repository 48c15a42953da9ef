"""The run config: one YAML file, validated into typed models whose errors name the field."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import SchemaValidator, core_schema

from fedlm.errors import ConfigError

CONFIG_VERSION = 1
# torch device strings fedlm accepts: cpu, or a backend with an optional device index
DEVICE_PATTERN = re.compile(r"cpu|(cuda|mps|xpu)(:[0-9]+)?")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = Field("minilm", description="a bundled model name (minilm) or a local Hugging Face folder")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="load the frozen base in 4-bit NF4 with double quantization (QLoRA, Dettmers et al. 2023) or "
        "8-bit (LLM.int8()) through bitsandbytes (pip install 'fedlm[qlora]'; CPU or CUDA), for a task that supports "
        "it (causal_lm); only the peft adapter trains and travels",
    )


class IidPartitionConfig(Section):
    kind: Literal["iid"] = "iid"
    num_clients: int = Field(5, ge=1, description="number of clients")


class DirichletPartitionConfig(Section):
    kind: Literal["dirichlet"]
    num_clients: int = Field(5, ge=1, description="number of clients")
    alpha: float = Field(..., gt=0, description="concentration: 0.1 strongly skewed, 1000 near IID")
    min_size: int = Field(1, ge=1, description="fewest examples any client gets")
    column: str | None = Field(None, description="split on this column instead of the label")


class QuantityPartitionConfig(Section):
    kind: Literal["quantity"]
    num_clients: int = Field(5, ge=1, description="number of clients")
    distribution: Literal["dirichlet", "power_law"] = Field("dirichlet", description="how client sizes are drawn")
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration of the size shares")
    exponent: float = Field(1.0, ge=0, description="power-law exponent of the size shares")
    min_size: int = Field(1, ge=1, description="fewest examples any client gets")


class ShardsPartitionConfig(Section):
    kind: Literal["shards"]
    num_clients: int = Field(5, ge=1, description="number of clients")
    labels_per_client: int = Field(2, ge=1, description="labels each client holds")
    column: str | None = Field(None, description="split on this column instead of the label")


class NaturalPartitionConfig(Section):
    kind: Literal["natural"]
    column: str = Field(..., description="one client per value of this column (author, user, language, ...)")


class ClusterPartitionConfig(Section):
    """Skew for data without labels: texts embedded by an encoder, k-means-clustered, then the
    clusters dealt out to clients in Dirichlet(alpha) shares (the clusters play the labels)."""

    kind: Literal["clusters"]
    num_clients: int = Field(5, ge=1, description="number of clients")
    clusters: int = Field(..., ge=2, description="k-means clusters of the texts' embeddings")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over the clusters: 0.1 strongly skewed")
    min_size: int = Field(1, ge=1, description="fewest examples any client gets")
    encoder: str = Field("minilm", description="the encoder whose mean-pooled embeddings are clustered")
    max_length: int = Field(128, ge=8, description="tokens of each text the encoder reads")
    # the column the clusters are written to (partition.json, client_test_by_cluster)
    column: ClassVar[str] = "cluster"


class PredefinedPartitionConfig(Section):
    kind: Literal["predefined"]
    clients: list[str] | None = Field(None, description="one data file or saved dataset folder per client")
    folder: str | None = Field(None, description="a folder whose data files are the clients, one each")

    @model_validator(mode="after")
    def _one_source(self) -> PredefinedPartitionConfig:
        if (self.clients is None) == (self.folder is None):
            raise ValueError("give exactly one of 'clients' (a list of files) or 'folder'")
        return self


PartitionConfig = Annotated[
    IidPartitionConfig
    | DirichletPartitionConfig
    | QuantityPartitionConfig
    | ShardsPartitionConfig
    | NaturalPartitionConfig
    | ClusterPartitionConfig
    | PredefinedPartitionConfig,
    Field(discriminator="kind"),
]


class DataConfig(Section):
    dataset: str | None = Field(
        "bbc-news",
        description="a bundled dataset name or a CSV/JSONL/Parquet file or saved folder (not for predefined)",
    )
    text_column: str | None = Field(None, description="the text column; detected by name when omitted")
    label_column: str | None = Field(None, description="the label column; detected by name when omitted")
    max_examples: int | None = Field(None, ge=2, description="use a seeded random subset of this many examples")
    validation_file: str | None = Field(None, description="the federated validation set, held by the server")
    validation_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share held out as the federated validation set when no validation_file"
    )
    client_test_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of each client's data kept as its test split"
    )
    partition: PartitionConfig = Field(IidPartitionConfig(), description="how the data is split into clients")
    group_by: str | None = Field(
        None,
        description="a column the clients' test results are grouped by each round (client_test_by_<column>; each "
        "client counts for its most common value); default: the column the partition splits on",
    )
    # the bounds of fedlm.tasks.classification.MAX_LABELS and fedlm.protocol.MAX_WIRE_LABELS, written out:
    # configs load without torch
    max_labels: int = Field(
        10_000, ge=2, le=100_000, description="most classes a run accepts (integer labels: ids below it)"
    )

    @property
    def group_column(self) -> str | None:
        """The column the clients' test results are grouped by: `group_by`, else the partition's."""
        return self.group_by or getattr(self.partition, "column", None)

    @model_validator(mode="before")
    @classmethod
    def _no_default_dataset_for_predefined(cls, data: Any) -> Any:
        partition = data.get("partition") if isinstance(data, dict) else None
        kind = partition.get("kind") if isinstance(partition, dict) else getattr(partition, "kind", None)
        if kind == "predefined" and "dataset" not in data:
            return {**data, "dataset": None}
        return data

    @model_validator(mode="after")
    def _has_source(self) -> DataConfig:
        if self.partition.kind != "predefined" and self.dataset is None:
            raise ValueError(f"a {self.partition.kind} partition needs a dataset to split")
        if self.partition.kind == "predefined" and self.dataset is not None:
            raise ValueError("a predefined partition reads its clients' files; remove data.dataset")
        if self.partition.kind == "predefined" and self.max_examples is not None:
            raise ValueError("max_examples does not apply to a predefined partition (each client keeps its file)")
        return self


class FederationConfig(Section):
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round; all when omitted")
    fraction: float | None = Field(None, gt=0, le=1, description="or the share of clients sampled per round")
    clients_per_evaluation: int | None = Field(
        None, ge=0, description="clients whose test split is evaluated each round; all when omitted, 0 for none"
    )
    rounds: int = Field(3, ge=1, description="federated rounds")
    min_clients: int = Field(1, ge=1, description="fewest valid updates a round needs to aggregate")
    round_timeout: float | None = Field(None, gt=0, description="seconds; later updates are dropped as timed out")
    checkpoint_every: int = Field(1, ge=0, description="write a checkpoint every this many rounds; 0 never")
    max_client_examples: int | None = Field(
        None, ge=1, description="the most examples one client's update counts for in the average; none when omitted"
    )
    max_total_bytes: int | None = Field(
        None,
        ge=1,
        description="communication budget of the training rounds (bytes up and down): the run ends cleanly before "
        "a round that would exceed it (judged by the largest round so far); none when omitted",
    )

    @model_validator(mode="after")
    def _one_sample_size(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give clients_per_round or fraction, not both")
        return self


class MedianConfig(Section):
    kind: Literal["median"]


class TrimmedMeanConfig(Section):
    kind: Literal["trimmed_mean"]
    beta: float = Field(0.1, ge=0, lt=0.5, description="share of clients trimmed from each end, per coordinate")


class KrumConfig(Section):
    kind: Literal["krum"]
    num_malicious: int = Field(0, ge=0, description="clients assumed malicious (f)")
    to_keep: int = Field(1, ge=1, description="1 for Krum, m > 1 for Multi-Krum")


RobustConfig = Annotated[MedianConfig | TrimmedMeanConfig | KrumConfig, Field(discriminator="kind")]


class StrategyBase(Section):
    """What every strategy section has. A plug-in's section subclasses it with
    `kind: Literal["<its name>"] = "<its name>"` and the options its strategy class takes."""

    robust: RobustConfig | None = Field(None, description="a robust aggregate in front of the server step")
    clip_norm: float | None = Field(None, gt=0, description="scale each client delta to at most this L2 norm")
    kind: str = Field(description="the name the strategy is registered under (fedlm.register_strategy)")


class FedAvgConfig(StrategyBase):
    kind: Literal["fedavg"] = "fedavg"
    server_lr: float = Field(1.0, gt=0)


class FedAvgMConfig(StrategyBase):
    kind: Literal["fedavgm"]
    server_lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class FedProxConfig(StrategyBase):
    kind: Literal["fedprox"]
    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 ||w - w_global||^2")
    server_lr: float = Field(1.0, gt=0)


class FedOptConfig(StrategyBase):
    kind: Literal["fedadagrad", "fedadam", "fedyogi"]
    server_lr: float = Field(1e-2, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity: added to sqrt(v)")


class ScaffoldConfig(StrategyBase):
    kind: Literal["scaffold"]
    server_lr: float = Field(1.0, gt=0)


# strategy kind -> the section that validates `strategy: {kind: <kind>, ...}`; the strategy classes
# are in fedlm.core.strategies.STRATEGIES under the same names (fedlm.register_strategy adds to both)
STRATEGY_SECTIONS: dict[str, type[StrategyBase]] = {}
# the type of RunConfig.strategy: any registered section, dumped with all of its fields
StrategyConfig = SerializeAsAny[StrategyBase]


def section_kinds(section: type[StrategyBase]) -> tuple[Any, ...]:
    """The values the `kind` field of `section` accepts: its Literal's, or none."""
    annotation = section.model_fields["kind"].annotation
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def check_strategy_section(name: str, section: type[StrategyBase]) -> None:
    """Raise unless `section` may be registered as the config section of strategy `name`."""
    _check_section("strategy", "fedavg", StrategyBase, STRATEGY_SECTIONS, name, section)


def _check_section(
    role: str, example: str, base: type[Section], registered: dict[str, type[Section]], name: str, section: type
) -> None:
    """Raise unless `section` (a subclass of `base`) may be registered in `registered` as the config
    section of the `role` (strategy, task) `name`, selected by its `kind`."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"{role} name {name!r} must be a lowercase identifier, such as {example!r}")
    if name in registered:
        raise ValueError(
            f"a {role} section named {name!r} is already registered ({registered[name].__name__}); choose another name"
        )
    if not (isinstance(section, type) and issubclass(section, base)):
        raise TypeError(f"the config section of {role} {name!r} must subclass fedlm.config.{base.__name__}")
    kinds = section_kinds(section)
    if name not in kinds:
        raise ValueError(
            f"{section.__name__} must declare `kind: Literal[{name!r}] = {name!r}` so that configs select it by "
            f"{role}.kind (it accepts {list(kinds) or 'any string'})"
        )
    for kind, other in registered.items():
        if other is not section and kind in kinds:
            raise ValueError(f"{section.__name__} accepts kind {kind!r}, which is {other.__name__}'s")
        if other is not section and name in section_kinds(other):
            raise ValueError(f"{other.__name__} ({role} {kind!r}) accepts kind {name!r} too; choose another name")


def register_strategy_section(name: str, section: type[StrategyBase]) -> None:
    """Make `strategy: {kind: name, ...}` validate with `section`. Plug-ins call
    `fedlm.register_strategy`, which registers the strategy class along with it."""
    check_strategy_section(name, section)
    STRATEGY_SECTIONS[name] = section


for _name, _section in {
    "fedavg": FedAvgConfig,
    "fedavgm": FedAvgMConfig,
    "fedprox": FedProxConfig,
    "fedadagrad": FedOptConfig,
    "fedadam": FedOptConfig,
    "fedyogi": FedOptConfig,
    "scaffold": ScaffoldConfig,
}.items():
    register_strategy_section(_name, _section)


@functools.lru_cache(maxsize=8)
def _sections_validator(sections: tuple[tuple[str, type[StrategyBase]], ...]) -> SchemaValidator:
    # a union tagged by `kind`, as Field(discriminator="kind") builds (the same errors), over exactly
    # the registered kinds, in the order they were registered
    return SchemaValidator(
        core_schema.tagged_union_schema(
            {kind: section.__pydantic_core_schema__ for kind, section in sections}, discriminator="kind"
        )
    )


def validate_strategy(value: Any) -> StrategyBase:
    """`value` (a mapping or a section) validated by the section registered under its `kind`;
    errors are located under the kind, as a discriminated union's are."""
    return _sections_validator(tuple(STRATEGY_SECTIONS.items())).validate_python(value)


class TaskBase(Section):
    """What every task's config section has: `kind`, the name of a registered task
    (`fedlm.tasks.TASKS`); a task's options are its section's other fields."""

    kind: str = Field(description="the task: a registered name (classification, or a plug-in's)")
    # the `peft` section a run of this task gets when its config has none and averages weights
    default_peft: ClassVar[dict[str, Any] | None] = None
    # whether the task's models load with a quantized base (model.quantization)
    quantizable: ClassVar[bool] = False


class ClassificationTaskConfig(TaskBase):
    kind: Literal["classification"] = "classification"


class CausalLMTaskConfig(TaskBase):
    """Instruction and dialogue tuning of a decoder (fedlm.tasks.causal_lm)."""

    kind: Literal["causal_lm"] = "causal_lm"
    default_peft: ClassVar[dict[str, Any] | None] = {"method": "lora"}
    quantizable: ClassVar[bool] = True
    format: Literal["auto", "messages", "instruction", "text"] = Field(
        "auto",
        description="the rows: messages (chat turns), instruction/input/output (Alpaca), or text; auto detects it from the columns",
    )
    chat_template: str | None = Field(
        None, description="a Jinja chat template; the tokenizer's when omitted, ChatML when it has none"
    )
    train_on_prompt: bool = Field(False, description="count every token in the loss, not only the assistant's")
    samples: int = Field(
        4, ge=0, description="validation prompts answered by the global model after every round (samples/round_N.jsonl)"
    )
    max_new_tokens: int = Field(48, ge=1, description="the longest generated sample response, in tokens")
    packing: bool = Field(
        False,
        description="pack several examples into each sequence of up to max_length tokens, attention kept within "
        "each example (checked on the model); batch_size then counts packed sequences",
    )
    rouge_l: bool = Field(
        False,
        description="score each sample response against its reference with ROUGE-L (F-measure, the rouge-score "
        "package: pip install 'fedlm[rouge]'); rounds record the mean as sample_rouge_l",
    )


class TokenClassificationTaskConfig(TaskBase):
    """Tagging words: named entities and other tags (fedlm.tasks.token_classification)."""

    kind: Literal["token_classification"] = "token_classification"
    tag_names: list[str] | None = Field(None, description="the tag of each id, for data whose tags are ids")
    invalid_spans: Literal["repair", "error"] = Field(
        "repair",
        description="an entity that does not begin as its scheme says (I-PER after O): repair it as CoNLL's "
        "evaluation reads it (counted in the log), or refuse the row",
    )


class Seq2SeqTaskConfig(TaskBase):
    """Writing a target text from a source text with an encoder-decoder (fedlm.tasks.seq2seq)."""

    kind: Literal["seq2seq"] = "seq2seq"
    samples: int = Field(
        16, ge=0, description="validation sources the global model writes targets for after every round, scored "
        "with ROUGE-L (samples/round_N.jsonl, sample_rouge_l)",
    )  # fmt: skip
    max_new_tokens: int = Field(48, ge=1, description="the longest generated target, in tokens")


# task kind -> the section that validates `task: {kind: <kind>, ...}`; the task classes are in
# fedlm.tasks.TASKS under the same names (fedlm.register_task adds to both)
TASK_SECTIONS: dict[str, type[TaskBase]] = {}
# the type of RunConfig.task: any registered section, dumped with all of its fields
TaskConfig = SerializeAsAny[TaskBase]


def check_task_section(name: str, section: type[TaskBase]) -> None:
    """Raise unless `section` may be registered as the config section of task `name`."""
    _check_section("task", "classification", TaskBase, TASK_SECTIONS, name, section)


def register_task_section(name: str, section: type[TaskBase]) -> None:
    """Make `task: {kind: name, ...}` validate with `section`. Plug-ins call `fedlm.register_task`,
    which registers the task class along with it."""
    check_task_section(name, section)
    TASK_SECTIONS[name] = section


register_task_section("classification", ClassificationTaskConfig)
register_task_section("causal_lm", CausalLMTaskConfig)
register_task_section("token_classification", TokenClassificationTaskConfig)
register_task_section("seq2seq", Seq2SeqTaskConfig)


def validate_task(value: Any) -> TaskBase:
    """`value` (a mapping or a section) validated by the task section registered under its `kind`."""
    return _sections_validator(tuple(TASK_SECTIONS.items())).validate_python(value)


class DPSGDConfig(Section):
    """Sample-level DP on every client: DP-SGD (Abadi et al. 2016) through Opacus, each client's
    epsilon accounted over all the steps it trains."""

    noise_multiplier: float = Field(gt=0, description="z: noise std = z * clip_norm on each step's gradient sum")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of each example's gradient (replaces max_grad_norm)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta each client's epsilon is reported at")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="Renyi DP or privacy loss distributions")


class TrainingConfig(Section):
    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="the local learning rate across rounds: constant, or annealed from learning_rate towards "
        "min_learning_rate (reached one round after the last), linearly or along half a cosine",
    )
    min_learning_rate: float = Field(0.0, ge=0, description="where lr_schedule anneals the learning rate to")
    max_length: int = Field(128, ge=8, description="tokens per example after truncation")
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables it")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer; SCAFFOLD assumes sgd")
    group_by_length: bool = Field(
        False,
        description="batch examples of similar lengths together (shuffled batches of sorted windows): less padding",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, the same update"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="autocast the forward pass to bf16 (CPU or GPU) or fp16 (CUDA, with loss scaling); parameters, "
        "gradients and optimizer stay float32; not with dp_sgd",
    )
    device: str = Field("cpu", description="torch device for training and evaluation, e.g. cuda")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; torch's default when omitted")
    dp_sgd: DPSGDConfig | None = Field(
        None, description="train every client with DP-SGD (sample-level DP; batches are Poisson-sampled)"
    )

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(
                f"{device!r} is not a device fedlm can train on: use cpu, cuda, cuda:N (the GPU with index N), "
                "mps (Apple silicon) or xpu, xpu:N (Intel GPUs)"
            )
        return device

    @model_validator(mode="after")
    def _mixed_precision_fits(self) -> TrainingConfig:
        if self.mixed_precision == "fp16" and not self.device.startswith("cuda"):
            raise ValueError(
                f"mixed_precision fp16 needs a CUDA device (loss scaling), and device is {self.device}: use bf16 or no"
            )
        if self.mixed_precision != "no" and self.dp_sgd is not None:
            raise ValueError("dp_sgd (Opacus) computes per-example gradients in float32: set mixed_precision: no")
        return self

    @model_validator(mode="after")
    def _schedule_ends_below_its_start(self) -> TrainingConfig:
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(
                f"min_learning_rate {self.min_learning_rate} exceeds learning_rate {self.learning_rate}: the schedule "
                "anneals from learning_rate down to min_learning_rate"
            )
        return self


class LoraConfig(Section):
    """LoRA adapters (Hu et al. 2021): only the low-rank A, B (and the classification head) train and travel."""

    method: Literal["lora"]
    r: int = Field(8, ge=1, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="scaling: the update is (alpha / r) B A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto", description="module names to adapt; auto: PEFT's defaults for the architecture (query, value for BERT)"
    )
    aggregation: Literal["fedit", "ffa", "stack", "svd"] = Field(
        "fedit",
        description="fedit: average A and B separately (inexact); ffa: freeze A at its shared init, federate B only "
        "(exact); stack: add the exact average of the products B A to the base weights each round (exact; the "
        "adapted layers' weights travel down); svd: re-factor the exact average of B A to rank r (best rank-r "
        "approximation)",
    )
    client_ranks: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        description="LoRA ranks given to the clients in turn (client i: client_ranks[i % len]), for stack and svd; "
        "the largest must be r, the global rank. A SuperNode takes its rank from --node-config lora-rank",
    )

    @model_validator(mode="after")
    def _check_ranks(self) -> LoraConfig:
        if self.client_ranks is None:
            return self
        if self.aggregation not in ("stack", "svd"):
            raise ValueError(f"client_ranks needs aggregation stack or svd, not {self.aggregation}")
        if max(self.client_ranks) != self.r:
            raise ValueError(f"r (the global rank, {self.r}) must be the largest of client_ranks {self.client_ranks}")
        return self


class Ia3Config(Section):
    """IA3 (Liu et al. 2022): learned rescaling vectors on keys, values and feed-forward activations."""

    method: Literal["ia3"]
    target_modules: list[str] | Literal["auto"] = Field("auto", description="auto: PEFT's defaults")
    feedforward_modules: list[str] | Literal["auto"] = Field("auto", description="auto: PEFT's defaults")


class PromptTuningConfig(Section):
    """Prompt tuning (Lester et al. 2021): trainable virtual tokens prepended to every input."""

    method: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(20, ge=1)


AdapterConfig = Annotated[LoraConfig | Ia3Config | PromptTuningConfig, Field(discriminator="method")]


class CodecConfig(Section):
    """A communication codec (fedlm.core.compression)."""

    kind: Literal["float16", "bfloat16", "int8", "topk"]
    block: int = Field(2048, ge=1, le=1 << 24, description="int8: values sharing one scale (at most 2^24)")
    fraction: float = Field(0.01, gt=0, le=1, description="topk: share of coordinates sent")
    error_feedback: bool = Field(
        False, description="uploads: carry what the codec drops into the next round (recommended with topk)"
    )


class CommunicationConfig(Section):
    upload: CodecConfig | None = Field(None, description="codec for client updates (client to server)")
    download: CodecConfig | None = Field(
        None, description="codec for the global parameters sent for training (evaluation gets them exact)"
    )

    @model_validator(mode="after")
    def _feedback_is_for_uploads(self) -> CommunicationConfig:
        if self.download is not None and self.download.error_feedback:
            raise ValueError(
                "download.error_feedback: error feedback needs a sender that keeps state; use it on upload"
            )
        return self


class DeploymentConfig(Section):
    """Settings that only the Flower deployment runtime reads (a simulation ignores them)."""

    num_clients: int | None = Field(
        None, ge=1, description="SuperNodes to wait for; the partition's number of clients when omitted"
    )
    node_wait_timeout: float = Field(
        300.0, gt=0, description="seconds to wait for num_clients SuperNodes before the run fails"
    )


class PublicDataConfig(Section):
    """The public (proxy) set that distillation predicts on: a dataset of its own, or a slice of
    the run's dataset held back from partitioning (its labels are not used)."""

    dataset: str | None = Field(None, description="a bundled dataset name or a data file every participant can read")
    held_out: float | None = Field(
        None, gt=0, lt=1, description="fraction of data.dataset held back from the clients (simulation only)"
    )
    max_examples: int | None = Field(None, ge=1, description="a seeded subset of this many examples")
    text_column: str | None = None
    label_column: str | None = Field(None, description="labels are optional; used only with hard_label_weight")

    @model_validator(mode="after")
    def _one_source(self) -> PublicDataConfig:
        if (self.dataset is None) == (self.held_out is None):
            raise ValueError("give exactly one of 'dataset' (a bundled name or file) or 'held_out' (a fraction)")
        return self


class DistillationTraining(Section):
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft labels and the KD loss")
    weighting: Literal["examples", "confidence", "entropy"] = Field(
        "examples", description="soft labels: clients weighted by examples, or per example by confidence / certainty"
    )
    epochs: int = Field(1, ge=1, description="distillation epochs over the public set per round")
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, ge=1)
    hard_label_weight: float = Field(
        0.0, ge=0, le=1, description="mix of cross-entropy on the public set's labels into the KD loss"
    )
    public_data: PublicDataConfig


class DistillationConfig(DistillationTraining):
    """Federated distillation (FedMD / FedKD-style): clients send predictions on the public set,
    the server trains a student on their soft labels. Clients may run different models."""

    kind: Literal["distillation"]
    student: str | None = Field(None, description="the student's model (bundled name or folder); default model.name")
    client_models: list[str] | None = Field(
        None, description="models given to the clients in turn (default: model.name); on Flower, --node-config model"
    )
    client_output: Literal["logits", "probabilities"] = Field(
        "logits", description="what clients send: logits, or probabilities at the temperature"
    )
    digest_epochs: int = Field(0, ge=0, description="FedMD's digest: epochs clients distil from the last consensus")
    soft_labels_cover: Literal["all", "own_labels"] = Field(
        "all",
        description="own_labels: clients are experts on different label sets; each one's soft labels cover the "
        "labels of its own data, and the student (over their union) matches each over those only",
    )
    top_k: int = Field(
        16, ge=1, le=1024, description="decoders (task causal_lm): the next tokens per position each client sends"
    )


class EnsembleDistillationConfig(DistillationTraining):
    """FedDF (Lin et al. 2020): weight averaging, then the average distils from the clients' ensemble."""

    kind: Literal["ensemble_distillation"]


AlgorithmConfig = Annotated[DistillationConfig | EnsembleDistillationConfig, Field(discriminator="kind")]


class AdaptiveClippingConfig(Section):
    """Adaptive clipping (Andrew et al. 2021): the clip norm follows a quantile of the update norms."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="fraction of updates that should go unclipped")
    learning_rate: float = Field(0.2, gt=0, description="geometric step of the clip norm per round")
    count_noise: float | None = Field(
        None, gt=0, description="std of the noise on the unclipped count; default clients per round / 20"
    )


class DPConfig(Section):
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) with an accountant."""

    noise_multiplier: float | None = Field(None, gt=0, description="z: noise std = z * clip_norm on the sum")
    target_epsilon: float | None = Field(None, gt=0, description="instead of noise_multiplier: the z that reaches it")
    delta: float = Field(1e-5, gt=0, lt=1)
    clip_norm: float = Field(1.0, gt=0, description="L2 bound of each client's update (the start, when adaptive)")
    adaptive: AdaptiveClippingConfig | None = None
    noise: Literal["server", "clients"] = Field(
        "server", description="server: a trusted server adds the noise; clients: each adds its share (distributed DP)"
    )
    accountant: Literal["rdp", "pld"] = Field("rdp", description="Renyi DP or privacy loss distributions")
    max_epsilon: float | None = Field(None, gt=0, description="stop, checkpointed, before epsilon would exceed this")

    @model_validator(mode="after")
    def _one_noise(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        return self


class SecureAggregationConfig(Section):
    """SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020): the server sees only the sum of the updates."""

    clip_range: float = Field(
        1.0, gt=0, description="updates are clipped to [-clip_range, clip_range] per value before quantization"
    )
    num_neighbours: int | None = Field(None, ge=1, description="per client; default 2 ceil(log2 n) + 2 (at most n - 1)")
    threshold: int | None = Field(None, ge=2, description="shares needed to unmask; default a majority of neighbours")


class HomomorphicConfig(Section):
    """CKKS homomorphic aggregation (TenSEAL, `pip install 'fedlm[he]'`): clients encrypt their
    updates with a key the server never holds; the server adds ciphertexts; a client decrypts the sum."""

    poly_modulus_degree: Literal[8192, 16384] = Field(
        8192, description="CKKS ring degree of the keys a simulation makes: 8192 packs 4,096 values per ciphertext"
    )
    public_context: Path | None = Field(
        None,
        description="Flower backend: the server's he-public.ctx from `fedlm he-keys` (SuperNodes get he-secret.ctx); "
        "a simulation makes its own keys",
    )


def load_plugin(entry: str) -> str:
    """Import plug-in `entry`, a module name or the path of a .py file, once per process, so that
    its register_* calls (fedlm.register_strategy) take effect."""
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = Path(entry).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"plugin file {entry} does not exist (relative paths start at {Path.cwd()})")
        name = f"fedlm_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
        if name in sys.modules:
            return entry
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as error:
            del sys.modules[name]  # a later parse tries again
            if not isinstance(error, Exception):
                raise
            raise ValueError(f"plugin {entry} failed while loading: {_failure(error)}") from None
        return entry
    if not all(part.isidentifier() for part in entry.split(".")):
        raise ValueError(f"plugin {entry!r} is neither a module name (such as my_package.strategies) nor a .py file")
    try:
        importlib.import_module(entry)
    except ModuleNotFoundError as error:
        if error.name is not None and (entry == error.name or entry.startswith(f"{error.name}.")):
            raise ValueError(
                f"plugin module {entry!r} not found: {error}; install it, or give the path of a .py file"
            ) from None
        raise ValueError(f"plugin {entry} failed while loading: {_failure(error)}") from None
    except Exception as error:
        raise ValueError(f"plugin {entry} failed while loading: {_failure(error)}") from None
    return entry


def _failure(error: BaseException) -> str:
    """`error` in one line, with the plug-in's line that raised it (the innermost outside fedlm)."""
    fedlm_folder = str(Path(__file__).parent)
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith((fedlm_folder, "<frozen importlib"))
    ]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


class RunConfig(Section):
    version: int = Field(CONFIG_VERSION, description="config format version")
    # before every section: pydantic validates fields in order, so the plug-ins' registrations are in place
    plugins: list[Annotated[str, AfterValidator(load_plugin)]] = Field(
        default_factory=list,
        description="modules to import before the rest of the config is validated, in order: importable module "
        "names (my_package.strategies) or paths of .py files (relative to the working directory); their "
        "fedlm.register_strategy and fedlm.register_task calls make new strategy and task kinds selectable. Every process that reads the config "
        "imports them (with --backend flower, the SuperLink's and each SuperNode's too)",
    )
    seed: int = Field(
        0, description="derives every random choice: split, partition, head init, sampling, shuffling, dropout"
    )
    output_dir: Path = Field(Path("runs/latest"), description="where metrics.jsonl, config.yaml and model/ go")
    model: ModelConfig = ModelConfig()
    task: TaskConfig = Field(
        ClassificationTaskConfig(),
        description="what is trained and measured: kind (a registered task, classification by default) and its options",
    )
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    strategy: StrategyConfig = Field(
        FedAvgConfig(), description="the server's aggregation strategy: kind (a registered name) and its options"
    )
    training: TrainingConfig = TrainingConfig()
    peft: AdapterConfig | None = Field(
        None,
        description="train and federate a PEFT adapter instead of all weights; omitted: LoRA for a causal_lm task "
        "averaged by a strategy, none otherwise; null: all weights",
    )
    communication: CommunicationConfig = CommunicationConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    algorithm: AlgorithmConfig | None = Field(
        None, description="distillation or ensemble_distillation; omitted: weight averaging with the strategy"
    )
    dp: DPConfig | None = Field(None, description="client-level differential privacy with privacy accounting")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="mask the updates so that the server only learns their sum"
    )
    homomorphic: HomomorphicConfig | None = Field(
        None, description="encrypt the updates so that the server only adds ciphertexts"
    )

    @field_validator("strategy", mode="plain")
    @classmethod
    def _registered_strategy(cls, value: Any) -> StrategyBase:
        return validate_strategy(value)

    @field_validator("task", mode="plain")
    @classmethod
    def _registered_task(cls, value: Any) -> TaskBase:
        return validate_task(value)

    @model_serializer(mode="wrap")
    def _without_defaults_added_later(self, handler: Any) -> dict[str, Any]:
        # a config without plug-ins, of the default task, dumps as it did before those keys existed
        # (run folders, checkpoints)
        data = handler(self)
        if not self.plugins:
            data.pop("plugins", None)
        if self.task == ClassificationTaskConfig():
            data.pop("task", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _task_default_peft(cls, data: Any) -> Any:
        # a decoder is tuned through LoRA unless the config says otherwise (`peft: null`: all
        # weights); distillation trains whole client models
        if not isinstance(data, dict) or "peft" in data or data.get("algorithm") is not None:
            return data
        task = data.get("task")
        section = TASK_SECTIONS.get(task.get("kind") if isinstance(task, dict) else getattr(task, "kind", None))
        return data if section is None or section.default_peft is None else {**data, "peft": section.default_peft}

    @model_validator(mode="after")
    def _known_version(self) -> RunConfig:
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this fedlm understands ({CONFIG_VERSION})")
        return self

    @model_validator(mode="after")
    def _distillation_fits(self) -> RunConfig:
        if isinstance(self.algorithm, DistillationConfig) and self.peft is not None:
            raise ValueError("algorithm distillation trains whole client models; remove peft (adapters are averaged)")
        if isinstance(self.algorithm, DistillationConfig) and self.task.kind == "causal_lm":
            self._check_decoder_distillation(self.algorithm)
        if self.dp is not None:
            if isinstance(self.algorithm, DistillationConfig) and self.algorithm.client_output != "probabilities":
                raise ValueError(
                    "dp with distillation clips and noises the clients' probabilities: set algorithm.client_output: "
                    "probabilities (logits are unbounded)"
                )
            if isinstance(self.algorithm, EnsembleDistillationConfig):
                raise ValueError("dp with ensemble_distillation: the server distils from the clients' raw models")
            if isinstance(self.algorithm, DistillationConfig) and self.algorithm.soft_labels_cover != "all":
                raise ValueError(
                    "dp with algorithm.soft_labels_cover own_labels: dp releases only the noisy mean of the clients' "
                    "probabilities, and own_labels restricts each client's to its labels; use soft_labels_cover all"
                )
            if self.strategy.robust is not None or self.strategy.kind == "scaffold":
                raise ValueError(
                    "dp sends the strategy one noisy average per round: robust aggregation and scaffold's control "
                    "variates (not privatized) do not combine with it"
                )
            if isinstance(self.peft, LoraConfig) and self.peft.aggregation in ("stack", "svd"):
                raise ValueError(
                    "dp with LoRA needs aggregation fedit or ffa: stack and svd combine the clients' raw factors"
                )
        if self.training.dp_sgd is not None and self.peft is not None and not isinstance(self.peft, LoraConfig):
            raise ValueError(
                f"training.dp_sgd supports full fine-tuning and LoRA adapters, not peft.method {self.peft.method}: "
                "Opacus cannot compute per-example gradients for its parameters"
            )
        if self.model.quantization != "none":
            self._check_quantized_base(self.model.quantization)
        if self.secure_aggregation is not None and self.homomorphic is not None:
            raise ValueError("choose one of secure_aggregation and homomorphic: both hide the updates from the server")
        if self.secure_aggregation is not None:
            self._check_summed_updates("secure_aggregation")
        if self.homomorphic is not None:
            self._check_summed_updates("homomorphic")
        held_out = self.algorithm is not None and self.algorithm.public_data.held_out is not None
        if held_out and isinstance(self.data.partition, PredefinedPartitionConfig):
            raise ValueError(
                "public_data.held_out slices data.dataset; with predefined clients give public_data.dataset"
            )
        return self

    @model_validator(mode="after")
    def _rounds_can_aggregate(self) -> RunConfig:
        """The checks of `cohort_problem` for the clients per round the config states (the runtimes
        check again once they know how many clients there are)."""
        federation, partition = self.federation, self.data.partition
        if isinstance(partition, PredefinedPartitionConfig):
            stated = None if partition.clients is None else len(partition.clients)
        else:
            stated = getattr(partition, "num_clients", None)  # a natural partition's clients come from its data
        if federation.clients_per_round is not None:
            problem = cohort_problem(self, federation.clients_per_round, "federation.clients_per_round")
        elif stated is not None and federation.fraction is None and self.deployment.num_clients is None:
            problem = cohort_problem(self, stated, "data.partition: every client takes part in each round")
        else:
            problem = None
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _packing_fits(self) -> RunConfig:
        if getattr(self.task, "packing", False) and self.training.dp_sgd is not None:
            raise ValueError(
                "task.packing puts several examples in one sequence, and training.dp_sgd clips each sequence's "
                "gradient as one example's: its privacy guarantee would not hold; remove one of them"
            )
        return self

    def _check_decoder_distillation(self, algorithm: DistillationConfig) -> None:
        """Distillation of decoders sends top-k log-probabilities and trains the student on them: the
        options made for class probabilities do not apply."""
        problems = {
            "client_output: probabilities (decoders send their top-k log-probabilities: leave it at logits)": (
                algorithm.client_output != "logits"
            ),
            "digest_epochs > 0 (no digest step for decoders)": algorithm.digest_epochs > 0,
            "weighting other than examples (it weighs class distributions)": algorithm.weighting != "examples",
            "hard_label_weight > 0 (the public responses are the student's targets only through the clients)": (
                algorithm.hard_label_weight > 0
            ),
            "dp (top-k token ids cannot be clipped and noised as one vector)": self.dp is not None,
            "soft_labels_cover: own_labels (a decoder's clients have no label sets)": (
                algorithm.soft_labels_cover != "all"
            ),
        }
        refused = [problem for problem, present in problems.items() if present]
        if refused:
            raise ValueError(f"algorithm distillation with task causal_lm does not take {'; '.join(refused)}")

    def _check_quantized_base(self, bits: str) -> None:
        if not type(self.task).quantizable:
            raise ValueError(f"model.quantization {bits}: task {self.task.kind} loads its models in full precision")
        if self.peft is None:
            raise ValueError(
                f"model.quantization {bits} freezes the quantized base, so a peft adapter must train: give peft "
                "(distillation, which trains whole models, cannot use it)"
            )
        if isinstance(self.peft, LoraConfig) and self.peft.aggregation == "stack":
            raise ValueError(
                f"model.quantization {bits}: LoRA aggregation stack adds the adapters into the base weights, which "
                "stay quantized; use fedit, ffa or svd"
            )

    def _check_summed_updates(self, section: str) -> None:
        needs_updates = {
            "algorithm (distillation)": self.algorithm is not None,
            "strategy.robust": self.strategy.robust is not None,
            "strategy scaffold": self.strategy.kind == "scaffold",
            "peft aggregation stack or svd": isinstance(self.peft, LoraConfig)
            and self.peft.aggregation in ("stack", "svd"),
            "communication.upload": self.communication.upload is not None,
            "dp.adaptive": self.dp is not None and self.dp.adaptive is not None,
        }
        clashes = [name for name, present in needs_updates.items() if present]
        if clashes:
            raise ValueError(f"{section} gives the server only the sum of the updates; {clashes} need each one")
        if self.dp is not None and self.dp.noise != "clients":
            raise ValueError(
                f"with {section} the server cannot add DP noise to updates it never sees: dp.noise: clients"
            )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def cohort_problem(config: RunConfig, cohort: int, source: str) -> str | None:
    """Why no round of `config` could aggregate when `cohort` clients take part in each round
    (`source` says where that number comes from), or None: federation.min_clients above the
    cohort, or secure aggregation over fewer clients than its neighbourhoods and threshold need."""
    min_clients = config.federation.min_clients
    if min_clients > cohort:
        return (
            f"federation.min_clients ({min_clients}) exceeds the {cohort} client(s) taking part in each round "
            f"({source}): every round would be skipped; lower min_clients or let more clients take part"
        )
    settings = config.secure_aggregation
    if settings is None:
        return None
    if cohort < 2:
        return (
            f"secure_aggregation needs at least 2 clients per round to hide each update in a sum; this run has "
            f"{cohort} ({source})"
        )
    from fedlm.privacy.secure_aggregation import SecAggSettings

    defaults = SecAggSettings.for_clients(cohort)  # what the rounds use for the settings the config leaves out
    neighbours = settings.num_neighbours or defaults.num_neighbours
    threshold = settings.threshold or defaults.threshold
    if neighbours > cohort - 1:
        return (
            f"secure_aggregation.num_neighbours ({neighbours}) exceeds the {cohort - 1} other clients in a round of "
            f"{cohort} ({source}); lower it or let more clients take part"
        )
    if threshold > neighbours:
        given = "secure_aggregation.threshold" if settings.threshold else "the default secure_aggregation.threshold"
        return (
            f"{given} ({threshold}) exceeds the {neighbours} neighbours each client has in a round of {cohort} "
            f"({source}); set secure_aggregation.threshold to at most {neighbours}"
        )
    return None


def check_output_dir(path: str | Path) -> None:
    """Refuse an output folder that cannot be made because it, or a folder above it, is a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"output_dir {path}: {folder} is a file, so the run folder cannot be made there; "
                    "choose another output_dir (or --output-dir)"
                )
            return


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(top level)'}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently). Keys merged in with `<<` may still be overridden, as YAML says."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first}); remove one", key_node.start_mark
                )
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


EXAMPLE_CONFIG = "examples/configs/bbc-dirichlet.yaml"


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text: byte 0x{raw[error.start]:02x} at offset {error.start} "
            f"(line {line}); save it as UTF-8"
        ) from None
    loader = UniqueKeyLoader(text)
    loader.name = str(path)  # YAML errors say "in <path>, line N"
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(
            f"config file {path} is empty (or only comments), so it describes no run: start from the demo's config "
            f"(`fedlm demo --print-config > {path.name}`) or an example such as {EXAMPLE_CONFIG} in fedlm's repository"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, federation, training)")
    return parse_config(data, source=str(path))
