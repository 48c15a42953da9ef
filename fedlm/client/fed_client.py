"""FedClient: one participant's private data and the local training it does on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from fedlm.channels import channel_for_fit, channel_for_stage
from fedlm.channels.homomorphic import HomomorphicAggregation
from fedlm.client.local_training import TrainingOptions, train_locally, training_hooks
from fedlm.core.distillation import fingerprint, soften
from fedlm.core.privacy import clip_delta
from fedlm.core.seeding import derive_seed
from fedlm.data.dataset import value_key
from fedlm.errors import ConfigError, NothingLeftError
from fedlm.models.adapters import add_adapter, is_adapted
from fedlm.models.federated import federated_spec, federated_view, get_federated_vector, set_federated_vector
from fedlm.models.loading import load_tokenizer
from fedlm.privacy.accounting import PrivacyAccountant
from fedlm.privacy.dp_sgd import accountant_from, steps_tensor
from fedlm.privacy.homomorphic import HomomorphicKeys
from fedlm.protocol import EvaluateIns, EvaluateRes, FitIns, FitRes, StageIns, StageRes
from fedlm.tasks import Task, task_for, task_of_model
from fedlm.tasks.distillation import TOP_K_TOKENS, distil, predict_logits, predict_top_k, vocabulary_fingerprint
from fedlm.tasks.text import EncodedDataset, encode, report_encoding

logger = logging.getLogger("fedlm")


class FedClient:
    """A federation participant: its private dataset, a model to train, and its training options.

    `dataset` is a file path (CSV, TSV, JSONL, JSON, Parquet, or a `datasets.save_to_disk` folder),
    a `datasets.Dataset` or a list of dicts, read by `task` (a `fedlm.tasks.Task` or a registered
    kind; sequence classification by default). Text and label (target) columns are detected by
    name (text/sentence/content..., for classification label/category/topic...) or given. Several
    clients may share one
    model object: each `fit` loads the global parameters before training, so a simulation keeps
    one model replica however many clients it has. `test_dataset` (same kinds as `dataset`) is the
    client's own test split, on which `evaluate` reports the global model's metrics. `peft` (a
    `peft.PeftConfig`, e.g. `peft.LoraConfig(r=8)`) wraps the model with that adapter, seeded from
    the training seed so that clients with the same seed start from the same adapter; then only the
    adapter and the classification head train and travel.
    """

    # what a client keeps between rounds (and checkpoints): SCAFFOLD's c_i, error feedback's
    # residual, in federated distillation its own model's parameters, and under DP-SGD the
    # privacy it has spent
    STATE = ("control_variate", "residual", "local_parameters", "privacy_spent")

    def __init__(
        self,
        dataset: Any,
        model: torch.nn.Module,
        tokenizer: Any = None,
        text_column: str | None = None,
        label_column: str | None = None,
        name: str | None = None,
        test_dataset: Any = None,
        peft: Any = None,
        task: Task | str | None = None,
        **training_options: Any,
    ) -> None:
        unknown = set(training_options) - set(TrainingOptions.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"FedClient got unknown options {sorted(unknown)}; valid options are {sorted(TrainingOptions.__dataclass_fields__)}"
            )
        self.options = TrainingOptions(**training_options)
        self.name = name or (Path(dataset).stem if isinstance(dataset, (str, Path)) else None)
        owner = f"client {self.name or '(unnamed)'}"
        self.task = task_of_model(model) if task is None else task_for(task) if isinstance(task, str) else task
        self.data = self.task.read(dataset, text_column, label_column, owner=owner)
        self.test_data = (
            None
            if test_dataset is None
            else self.task.read(test_dataset, text_column, label_column, owner=f"{owner} test set")
        )
        if peft is not None and not is_adapted(model):
            model = add_adapter(model, peft, seed=derive_seed(self.options.seed, "adapter"))
        self.model = model
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(getattr(model, "name_or_path", ""), owner)
        )
        self.metadata: Any = None  # the federation's task metadata (classification: its LabelMap)
        self._has_metadata = False
        self.step_callback: Callable[[int, int], None] | None = None
        self.control_variate: torch.Tensor | None = None  # SCAFFOLD's c_i, kept between rounds
        self.residual: torch.Tensor | None = None  # what error feedback has not sent yet
        self.local_parameters: torch.Tensor | None = None  # its own model, in federated distillation
        self.public_texts: list[str] | None = None  # the public set it predicts on, in distillation
        self.public_targets: list[Any] | None = None  # a decoder's public conversations
        self.sample_privacy: PrivacyAccountant | None = None  # DP-SGD's steps so far, all rounds
        # what the update channels keep on this client, by channel kind (`fedlm.channels`): this
        # round's secure aggregation secrets, the CKKS secret key the clients share
        self.channel_state: dict[str, Any] = {}
        self._instructions: FitIns | None = None
        self._pending: FitRes | None = None
        self._local_train_calls = 0
        self._reported_skips: set[str] = set()  # the splits whose skipped rows were logged

    def __repr__(self) -> str:
        test = 0 if self.test_data is None else len(self.test_data)
        return f"FedClient(name={self.name!r}, examples={len(self.data)}, test_examples={test})"

    @property
    def has_test_data(self) -> bool:
        return self.test_data is not None and len(self.test_data) > 0

    def data_fingerprint(self) -> dict[str, Any]:
        """What this client trains and tests on, so that a resumed run can check it is the same
        data (`fedlm.checkpoint`): its example counts and a sha256 of its rows in order."""
        return FedClient.fingerprint_rows(self.data, self.test_data)

    @staticmethod
    def fingerprint_rows(train: Any, test: Any = None) -> dict[str, Any]:
        """Example counts and a sha256 of the texts and target keys, row by row in order, of a train
        and an optional test `TextDataset`: any added, removed, reordered or edited row (text or
        target) changes it. Cheap next to a round: one pass over the text."""
        digest = hashlib.sha256()
        for split in (train, test):
            digest.update(b"\x1d")  # splits apart: a row moved from train to test changes the hash
            if split is not None:
                for text, label in zip(split.texts, split.labels):
                    digest.update(json.dumps([text, value_key(label)]).encode())
        return {"examples": len(train), "test_examples": 0 if test is None else len(test), "sha256": digest.hexdigest()}

    # ---- targets -----------------------------------------------------------------------------

    def target_keys(self) -> list[str]:
        """What this client's task reports about its training targets (classification: its label keys)."""
        return self.task.target_keys(self.data.labels)

    def set_metadata(self, metadata: Any) -> None:
        """Use the federation's task metadata (the server owns it, classification: the label map);
        checks that this client's targets encode with it and that its model fits it."""
        self.task.encode_targets(metadata, self.data.labels, owner=f"client {self.name}")
        if self.test_data is not None:
            self.task.encode_targets(metadata, self.test_data.labels, owner=f"client {self.name} test set")
        self.task.check_model(self.model, metadata, owner=f"client {self.name}")
        self.metadata, self._has_metadata = metadata, True

    def encoded(self, split: Literal["train", "test"] = "train") -> EncodedDataset:
        """Tokenized examples of the train or test split. Tokenized on demand, not kept: a simulation
        of thousands of clients holds their text, never all their tokens at once."""
        if not self._has_metadata:  # a client on its own: the metadata of its own targets
            self.set_metadata(self.task.metadata(self.target_keys()))
        data = self.data if split == "train" else self.test_data
        owner = f"client {self.name}" + ("" if split == "train" else " test set")
        targets = self.task.encode_targets(self.metadata, data.labels, owner=owner)
        encoded = self.task.encode(self.tokenizer, data.texts, targets, self.options.max_length, owner)
        if split not in self._reported_skips:  # said once per split, not every round
            self._reported_skips.add(split)
            report_encoding(encoded, len(data), owner, self.options.max_length)
        return encoded

    @property
    def homomorphic_keys(self) -> HomomorphicKeys | None:
        """The CKKS secret key the clients share, under homomorphic aggregation."""
        return self.channel_state.get(HomomorphicAggregation.kind)

    @homomorphic_keys.setter
    def homomorphic_keys(self, keys: HomomorphicKeys | None) -> None:
        self.channel_state[HomomorphicAggregation.kind] = keys

    @property
    def privacy_spent(self) -> torch.Tensor | None:
        """DP-SGD's steps so far as (noise multiplier, sampling rate, steps) rows, for checkpoints."""
        return steps_tensor(self.sample_privacy)

    @privacy_spent.setter
    def privacy_spent(self, steps: torch.Tensor | None) -> None:
        kind = self.options.dp_sgd.accountant if self.options.dp_sgd is not None else "rdp"
        self.sample_privacy = None if steps is None else accountant_from(steps, kind)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What this client keeps between rounds (`STATE`), the parts it holds."""
        return {key: getattr(self, key) for key in self.STATE if getattr(self, key) is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take back `state_dict()`'s state; what it lacks is reset to None (not kept yet)."""
        unknown = sorted(set(state) - set(self.STATE))
        if unknown:
            raise ValueError(f"a client has no state {unknown}; its state is {list(self.STATE)}")
        for key in self.STATE:
            setattr(self, key, state[key].clone() if key in state else None)

    # ---- parameters --------------------------------------------------------------------------

    def get_parameters(self) -> torch.Tensor:
        return get_federated_vector(self.model)

    def receive(self, ins: FitIns, load_parameters: bool = True) -> None:
        """Take the round's global parameters and instructions (FedProx's mu, SCAFFOLD's server
        control); the next update is measured from these parameters. `load_parameters=False`
        when this client's (shared) model already holds them."""
        if load_parameters:
            self._load(ins)
        self._instructions = ins

    def _load(self, ins: FitIns | EvaluateIns) -> torch.Tensor:
        """Load the message's parameters into the model (in distillation: this client's own
        parameters, kept between rounds); returns the trainable ones."""
        if "distillation" not in ins.config:
            lora_base = bool(ins.config.get("lora_base"))
            set_federated_vector(self.model, ins.parameters, lora_base=lora_base)
            if not lora_base and ins.parameters.dtype == torch.float32:
                return ins.parameters  # what the model now holds, without another copy (read-only)
        elif self.local_parameters is not None:
            set_federated_vector(self.model, self.local_parameters)
        return self.get_parameters()

    def join_distillation(self, public_texts: list[str], public_targets: list[Any] | None = None) -> None:
        """Take part in federated distillation: predict on `public_texts` (for a decoder, with
        `public_targets`, the conversations as its task read them), and keep this client's own
        model from its current parameters on."""
        self.public_texts = list(public_texts)
        self.public_targets = None if public_targets is None else list(public_targets)
        self.local_parameters = self.get_parameters()

    # ---- the seed API ------------------------------------------------------------------------

    def local_train(self, epochs: int = 1) -> dict[str, float]:
        """Train on this client's data for `epochs` from the last parameters it received; the
        update waits for `aggregate_parameters`."""
        if self._instructions is None:
            self._instructions = FitIns(self.get_parameters(), {})
        self._local_train_calls += 1
        seed = derive_seed(self.options.seed, self._local_train_calls, self.name)
        self._pending = self._train(self._instructions, self._load(self._instructions), epochs, seed)
        return self._pending.metrics

    def take_update(self) -> FitRes | None:
        """The update from `local_train` since the last call, or None if the client has not trained."""
        pending, self._pending = self._pending, None
        return pending

    # ---- the protocol ------------------------------------------------------------------------

    def fit(self, ins: FitIns) -> FitRes:
        """Load the global parameters, train for `ins.config['epochs']`, return the delta (in
        federated distillation: train its own model, return its outputs on the public set)."""
        received = self._load(ins)
        seed = derive_seed(ins.config.get("seed", self.options.seed), ins.config.get("round", 0), self.name)
        if "distillation" in ins.config:
            result = self._distillation_round(ins, received, seed)
        else:
            result = self._train(ins, received, int(ins.config.get("epochs", 1)), seed)
        if "dp_clip_norm" in ins.config:
            result.delta = self._privatize(result.delta, ins.config["dp_clip_norm"], ins.config["dp_noise_std"])
        return channel_for_fit(ins.config).seal(self, result, ins)  # masked, encrypted or compressed

    def stage(self, ins: StageIns) -> StageRes:
        """An update channel's exchanges around `fit` (secure aggregation's keys and shares,
        decrypting a homomorphic sum), answered by the channel that owns the stage."""
        return channel_for_stage(ins.stage).answer(self, ins)

    @staticmethod
    def _privatize(delta: torch.Tensor, clip_norm: float, noise_std: float) -> torch.Tensor:
        """Distributed DP: clip the delta and add this client's share of the Gaussian noise, drawn
        from the operating system's randomness so that nobody, the server included, can
        reproduce and subtract it (a run with client-side noise is not bit-reproducible)."""
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        clipped, _ = clip_delta(delta, clip_norm)
        return clipped + noise_std * torch.randn(delta.shape, generator=generator, dtype=delta.dtype)

    def _distillation_round(self, ins: FitIns, received: torch.Tensor, seed: int) -> FitRes:
        """Digest the consensus (when sent), train on the private data, and return the outputs
        on the public set (logits, or probabilities at the temperature), flattened."""
        settings = ins.config["distillation"]
        public = self._public_set(settings)
        if "soft_labels" in ins.tensors and settings["digest_epochs"] > 0:
            distil(self.model, public, ins.tensors["soft_labels"], settings["temperature"], settings["digest_epochs"],
                   self.options.learning_rate, self.options.batch_size, self._pad_id(), derive_seed(seed, "digest"),
                   self.options.device, max_grad_norm=self.options.max_grad_norm)  # fmt: skip
            received = self.get_parameters()
        schedule = {key: ins.config[key] for key in ("learning_rate",) if key in ins.config}
        result = self._train(FitIns(received, schedule), received, int(ins.config.get("epochs", 1)), seed)
        self.local_parameters = self.get_parameters()
        if settings["output"] == "top_k":  # a decoder: its k likeliest next tokens at each public target
            values, tokens = predict_top_k(self.model, public, settings["top_k"], settings["temperature"],
                                           self.options.batch_size, self._pad_id(), self.options.device)  # fmt: skip
            extras = {TOP_K_TOKENS: tokens.reshape(-1).float()}  # ids below 2^24: exact in float32
            return FitRes(values.reshape(-1), result.num_examples, result.metrics, extras)
        outputs = predict_logits(self.model, public, self.options.batch_size, self._pad_id(), self.options.device)
        if settings["output"] == "probabilities":
            outputs = soften(outputs, settings["temperature"]).float()
        return FitRes(outputs.reshape(-1), result.num_examples, result.metrics)

    def _public_set(self, settings: dict[str, Any]) -> EncodedDataset:
        """The public set, tokenized by this client's tokenizer, after checking that it is the
        server's (same count and fingerprint)."""
        if self.public_texts is None:
            raise ConfigError(f"client {self.name}: no public set to predict on (join_distillation was not called)")
        found = fingerprint(self.public_texts)
        if len(self.public_texts) != settings["public_examples"] or found != settings["public_fingerprint"]:
            raise ConfigError(
                f"client {self.name}: its public set ({len(self.public_texts)} texts, fingerprint {found}) is not the "
                f"server's ({settings['public_examples']} texts, fingerprint {settings['public_fingerprint']}); every "
                "participant must load the same public_data"
            )
        if settings["output"] != "top_k":
            return encode(self.tokenizer, self.public_texts, [-1] * len(self.public_texts), self.options.max_length)
        vocabulary = vocabulary_fingerprint(self.tokenizer)
        if vocabulary != settings["vocabulary"]:
            raise ConfigError(
                f"client {self.name}: its tokenizer's vocabulary (fingerprint {vocabulary}) is not the student's "
                f"({settings['vocabulary']}); distillation of decoders needs every decoder to share the student's"
            )
        owner = f"client {self.name} public set"
        encoded = self.task.encode(
            self.tokenizer, self.public_texts, self.public_targets, self.options.max_length, owner
        )
        if "public" not in self._reported_skips:
            self._reported_skips.add("public")
            report_encoding(encoded, len(self.public_texts), owner, self.options.max_length)
        return encoded

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Metrics of the given parameters on this client's test split (none: zero examples)."""
        if not self.has_test_data:
            return EvaluateRes(0, {})
        self._load(ins)  # in distillation: its own model
        try:
            test = self.encoded("test")
        except NothingLeftError as error:  # each test row too long: nothing to score, said once
            if "test" not in self._reported_skips:
                self._reported_skips.add("test")
                logger.warning("%s; it reports no test results", error)
            return EvaluateRes(0, {})
        metrics = self.task.evaluate(self.model, test, self.options.batch_size, self._pad_id(), self.options.device)
        return EvaluateRes(test.num_examples, metrics)

    # ---- local training ----------------------------------------------------------------------

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _train(self, ins: FitIns, received: torch.Tensor, epochs: int, seed: int) -> FitRes:
        """Local training from the trainable parameters `received` (already loaded), with the hooks
        the round config asks for (FedProx's proximal term, SCAFFOLD's correction)."""
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"client {self.name}: epochs must be a positive integer, got {epochs!r}")
        data, options = self.encoded(), self.options
        if "learning_rate" in ins.config:  # the round's, from the server's schedule
            options = dataclasses.replace(options, learning_rate=round_learning_rate(ins.config, self.name))
        model = self.model.to(options.device)
        hooks = training_hooks(ins, self, received, federated_spec(model))
        trained = train_locally(model, data, options, epochs, seed, self._pad_id(), hooks, self.step_callback)
        metrics = {
            "loss": trained.loss,
            "num_examples": data.num_examples,
            "steps": trained.steps,
            "seconds": trained.seconds,
            "samples_per_second": trained.seen / trained.seconds,
        }
        if data.skipped:
            metrics["skipped_examples"] = data.skipped
        if trained.sampling_rate is not None:
            metrics.update(self._spend_privacy(trained.sampling_rate, trained.steps))
        delta = federated_view(self.model) - received
        extras = {}
        for hook in hooks:
            extras.update(hook.finish(delta, trained.steps, options.learning_rate))
        return FitRes(delta, data.num_examples, metrics, extras)

    def _spend_privacy(self, sampling_rate: float, steps: int) -> dict[str, float]:
        """Account DP-SGD's steps of this round; this client's epsilon over all its rounds so far."""
        settings = self.options.dp_sgd
        if self.sample_privacy is None:
            self.sample_privacy = PrivacyAccountant(settings.accountant)
        self.sample_privacy.step(settings.noise_multiplier, sampling_rate, steps)
        return {"dp_sgd_epsilon": self.sample_privacy.epsilon(settings.delta), "dp_sgd_delta": settings.delta}


def round_learning_rate(config: dict[str, Any], name: str | None) -> float:
    """The learning rate a round's instructions give (a number > 0), else a ConfigError."""
    value = config["learning_rate"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"client {name}: the round's learning_rate must be a number > 0, got {value!r}")
    return float(value)
