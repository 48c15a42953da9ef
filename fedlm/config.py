"""The run config: one YAML file, validated into typed models whose errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlm.errors import ConfigError

CONFIG_VERSION = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    name: str = Field("minilm", description="a bundled model name (minilm) or a local Hugging Face folder")


class DataConfig(Section):
    dataset: str = Field(
        "bbc-news", description="a bundled dataset name (bbc-news) or a CSV/JSONL/Parquet file or saved folder"
    )
    text_column: str | None = Field(None, description="the text column; detected by name when omitted")
    label_column: str | None = Field(None, description="the label column; detected by name when omitted")
    validation_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share held out as the federated validation set"
    )
    max_examples: int | None = Field(None, ge=2, description="use a seeded random subset of this many examples")
    partition: Literal["iid"] = Field("iid", description="how the training part is split into clients")


class FederationConfig(Section):
    num_clients: int = Field(5, ge=1, description="number of simulated clients")
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round; all when omitted")
    rounds: int = Field(3, ge=1, description="federated rounds")
    min_clients: int = Field(1, ge=1, description="fewest valid updates a round needs to aggregate")

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})")
        return self


class StrategyConfig(Section):
    kind: Literal["fedavg"] = Field("fedavg", description="aggregation strategy")
    server_lr: float = Field(1.0, gt=0, description="server learning rate applied to the mean update")


class TrainingConfig(Section):
    local_epochs: int = Field(1, ge=1, description="local epochs per round")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    max_length: int = Field(128, ge=8, description="tokens per example after truncation")
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null disables it")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; torch's default when omitted")


class RunConfig(Section):
    version: int = Field(CONFIG_VERSION, description="config format version")
    seed: int = Field(
        0, description="derives every random choice: split, partition, head init, sampling, shuffling, dropout"
    )
    output_dir: Path = Field(Path("runs/latest"), description="where metrics.jsonl, config.yaml and model/ go")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    strategy: StrategyConfig = StrategyConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _known_version(self) -> RunConfig:
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this fedlm understands ({CONFIG_VERSION})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(top level)'}: {item['msg']}" for item in error.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, federation, training)")
    return parse_config(data, source=str(path))
