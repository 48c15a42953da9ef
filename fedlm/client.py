"""FedClient: one participant's private data and the local training it does on it."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedlm.core.compression import ErrorFeedback, codec_from_spec, codec_spec
from fedlm.core.distillation import fingerprint, soften
from fedlm.core.params import unflatten
from fedlm.core.privacy import clip_delta
from fedlm.core.seeding import derive_seed
from fedlm.data.dataset import load_text_dataset
from fedlm.data.labels import LabelMap, label_key
from fedlm.errors import ConfigError
from fedlm.models.adapters import add_adapter, is_adapted
from fedlm.models.federated import federated_spec, get_federated_vector, set_federated_vector
from fedlm.models.loading import load_tokenizer
from fedlm.privacy.accounting import PrivacyAccountant
from fedlm.privacy.dp_sgd import PrivateTraining, SampleLevelDP, accountant_from, steps_tensor
from fedlm.privacy.homomorphic import HomomorphicKeys
from fedlm.privacy.homomorphic_round import decrypt_sum, encrypted_update
from fedlm.privacy.secure_aggregation import SecAggClient
from fedlm.privacy.secure_round import answer_stage
from fedlm.protocol import (
    Compressed,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    StageIns,
    StageRes,
    as_bytes,
)
from fedlm.tasks.classification import EncodedDataset, batches, encode, evaluate_model
from fedlm.tasks.distillation import distil, predict_logits


@dataclass
class TrainingOptions:
    """Local training settings; defaults suit fine-tuning a BERT-sized encoder."""

    batch_size: int = 16
    learning_rate: float = 5e-5
    max_length: int = 128
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # sample-level DP: train with DP-SGD (per-example clipping replaces max_grad_norm)
    dp_sgd: SampleLevelDP | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dp_sgd, dict):  # from a run config
            self.dp_sgd = SampleLevelDP(**self.dp_sgd)
        for field_name in ("batch_size", "max_length"):
            if not isinstance(getattr(self, field_name), int) or getattr(self, field_name) < 1:
                raise ConfigError(f"{field_name} must be a positive integer, got {getattr(self, field_name)!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")


class FedClient:
    """A federation participant: its private dataset, a model to train, and its training options.

    `dataset` is a file path (CSV, TSV, JSONL, JSON, Parquet, or a `datasets.save_to_disk` folder),
    a `datasets.Dataset` or a list of dicts. Text and label columns are detected by name
    (text/sentence/content..., label/category/topic...) or given. Several clients may share one
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
        self.data = load_text_dataset(dataset, text_column, label_column, owner=owner)
        self.test_data = (
            None
            if test_dataset is None
            else load_text_dataset(test_dataset, text_column, label_column, owner=f"{owner} test set")
        )
        if peft is not None and not is_adapted(model):
            model = add_adapter(model, peft, seed=derive_seed(self.options.seed, "adapter"))
        self.model = model
        self.tokenizer = (
            tokenizer if tokenizer is not None else load_tokenizer(getattr(model, "name_or_path", ""), owner)
        )
        self.label_map: LabelMap | None = None
        self.step_callback: Callable[[int, int], None] | None = None
        self.control_variate: torch.Tensor | None = None  # SCAFFOLD's c_i, kept between rounds
        self.residual: torch.Tensor | None = None  # what error feedback has not sent yet
        self.local_parameters: torch.Tensor | None = None  # its own model, in federated distillation
        self.public_texts: list[str] | None = None  # the public set it predicts on, in distillation
        self.sample_privacy: PrivacyAccountant | None = None  # DP-SGD's steps so far, all rounds
        self.homomorphic_keys: HomomorphicKeys | None = None  # the CKKS secret key the clients share
        self._secure_aggregation: SecAggClient | None = None  # this round's secrets, when masking
        self._instructions: FitIns | None = None
        self._pending: FitRes | None = None
        self._local_train_calls = 0

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
        """Example counts and a sha256 of the texts and label keys, row by row in order, of a train
        and an optional test `TextDataset`: any added, removed, reordered or edited row (text or
        label) changes it. Cheap next to a round: one pass over the text."""
        digest = hashlib.sha256()
        for split in (train, test):
            digest.update(b"\x1d")  # splits apart: a row moved from train to test changes the hash
            if split is not None:
                for text, label in zip(split.texts, split.labels):
                    digest.update(json.dumps([text, label_key(label)]).encode())
        return {"examples": len(train), "test_examples": 0 if test is None else len(test), "sha256": digest.hexdigest()}

    # ---- labels ------------------------------------------------------------------------------

    def label_values(self) -> set[str]:
        return {label_key(value) for value in self.data.labels}

    def set_label_map(self, label_map: LabelMap) -> None:
        """Use the federation's label map (the server owns it); checks this client's labels fit."""
        label_map.encode(self.data.labels, owner=f"client {self.name}")
        if self.test_data is not None:
            label_map.encode(self.test_data.labels, owner=f"client {self.name} test set")
        label_map.check_fits(self.model.config.num_labels, owner=f"client {self.name}")
        self.label_map = label_map

    def encoded(self, split: Literal["train", "test"] = "train") -> EncodedDataset:
        """Tokenized examples of the train or test split. Tokenized on demand, not kept: a simulation
        of thousands of clients holds their text, never all their tokens at once."""
        if self.label_map is None:
            self.set_label_map(LabelMap.from_values(self.data.labels))
        data = self.data if split == "train" else self.test_data
        labels = self.label_map.encode(data.labels, owner=f"client {self.name}")
        return encode(self.tokenizer, data.texts, labels, self.options.max_length)

    @property
    def privacy_spent(self) -> torch.Tensor | None:
        """DP-SGD's steps so far as (noise multiplier, sampling rate, steps) rows, for checkpoints."""
        return steps_tensor(self.sample_privacy)

    @privacy_spent.setter
    def privacy_spent(self, steps: torch.Tensor | None) -> None:
        kind = self.options.dp_sgd.accountant if self.options.dp_sgd is not None else "rdp"
        self.sample_privacy = None if steps is None else accountant_from(steps, kind)

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
            set_federated_vector(self.model, ins.parameters, lora_base=bool(ins.config.get("lora_base")))
        elif self.local_parameters is not None:
            set_federated_vector(self.model, self.local_parameters)
        return self.get_parameters()

    def join_distillation(self, public_texts: list[str]) -> None:
        """Take part in federated distillation: predict on `public_texts`, and keep this client's
        own model from its current parameters on."""
        self.public_texts = list(public_texts)
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
        if "secagg" in ins.config:  # the server gets the update only masked, to be summed
            inbox = {
                int(key.split(".")[1]): as_bytes(value) for key, value in ins.tensors.items() if key.startswith("from.")
            }
            weighted = result.delta * float(ins.config["secagg"]["weight"])
            result.delta = self._secure_aggregation.masked_input(weighted, inbox)
        elif "homomorphic" in ins.config:  # the server gets the update only encrypted, to be summed
            weight = float(ins.config["homomorphic"]["weight"])
            encrypted = encrypted_update(self._homomorphic_keys(), result.delta, weight)
            result = FitRes(torch.zeros(0), result.num_examples, result.metrics, encrypted)
        if "upload_codec" in ins.config:
            result.delta = self._compress(result.delta, ins.config["upload_codec"])
        return result

    def stage(self, ins: StageIns) -> StageRes:
        """Secure aggregation's exchanges around `fit`: public keys, encrypted key shares, and
        the shares that let the server unmask the sum (`fedlm.privacy.secure_round`); under
        homomorphic aggregation, decrypting the sum of the encrypted updates."""
        if ins.stage == "he_decrypt":
            return decrypt_sum(self._homomorphic_keys(), ins)
        self._secure_aggregation, reply = answer_stage(self._secure_aggregation, ins, f"client {self.name}")
        return reply

    def _homomorphic_keys(self) -> HomomorphicKeys:
        if self.homomorphic_keys is None:
            raise ConfigError(
                f"client {self.name}: homomorphic aggregation needs the clients' CKKS secret key "
                "(FedClient.homomorphic_keys, a fedlm.privacy.homomorphic.HomomorphicKeys)"
            )
        return self.homomorphic_keys

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
        result = self._train(FitIns(received, {}), received, int(ins.config.get("epochs", 1)), seed)
        self.local_parameters = self.get_parameters()
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
        return encode(self.tokenizer, self.public_texts, [-1] * len(self.public_texts), self.options.max_length)

    def _compress(self, delta: torch.Tensor, spec: dict[str, Any]) -> Compressed:
        """The delta through the server's upload codec; with error feedback, what the codec drops
        is kept here (`residual`) and added to the next round's delta."""
        codec = codec_from_spec(spec)
        if not spec.get("error_feedback"):
            return Compressed.encode(codec, delta)
        feedback = ErrorFeedback(codec, self.residual)
        parts = feedback.encode(delta)
        self.residual = feedback.residual
        return Compressed(codec_spec(codec), parts, delta.numel())

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Metrics of the given parameters on this client's test split (none: zero examples)."""
        if not self.has_test_data:
            return EvaluateRes(0, {})
        self._load(ins)  # in distillation: its own model
        test = self.encoded("test")
        metrics = evaluate_model(self.model, test, self.options.batch_size, self._pad_id(), self.options.device)
        return EvaluateRes(len(test), metrics)

    # ---- local training ----------------------------------------------------------------------

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _train(self, ins: FitIns, received: torch.Tensor, epochs: int, seed: int) -> FitRes:
        """Local training from the trainable parameters `received` (already loaded), with FedProx's
        proximal term and SCAFFOLD's gradient correction when `ins` asks for them."""
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"client {self.name}: epochs must be a positive integer, got {epochs!r}")
        data, options = self.encoded(), self.options
        model = self.model.to(options.device)
        params = [param for param in model.parameters() if param.requires_grad]
        spec = federated_spec(model)
        proximal_mu = float(ins.config.get("proximal_mu", 0.0))
        centers = unflatten(received, spec) if proximal_mu > 0 else None
        correction = None
        if ins.config.get("scaffold"):
            if self.control_variate is None:
                self.control_variate = torch.zeros_like(received)
            correction = unflatten(ins.tensors["server_control"] - self.control_variate, spec)
        optimizer = self._optimizer(params)
        private = None
        if options.dp_sgd is not None:
            private = PrivateTraining(options.dp_sgd, model, optimizer, len(data), options.batch_size)
        steps_per_epoch = -(-len(data) // options.batch_size) if private is None else private.steps_per_epoch
        total_steps, step, seen, loss_sum = epochs * steps_per_epoch, 0, 0, torch.zeros((), device=options.device)
        start = time.perf_counter()
        model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # dropout
                generator = torch.Generator().manual_seed(seed)
                for batch in self._batches(data, epochs, generator, private):
                    if batch is not None:
                        batch = {key: value.to(options.device) for key, value in batch.items()}
                        loss = model(**batch).loss if private is None else private.loss(batch)
                        loss.backward()
                        loss_sum += loss.detach() * len(batch["labels"])
                        seen += len(batch["labels"])
                    if private is not None:  # per-example clipping and noise, before any other change
                        private.noisy_gradients(sampled_nothing=batch is None)
                    if centers is not None or correction is not None:
                        self._adjust_gradients(params, proximal_mu, centers, correction)
                    if private is None and options.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                    optimizer.step()
                    (optimizer if private is None else private.optimizer).zero_grad(set_to_none=True)
                    step += 1
                    if self.step_callback is not None:
                        self.step_callback(step, total_steps)
        finally:
            if private is not None:
                private.close()
        seconds = time.perf_counter() - start
        metrics = {
            "loss": float(loss_sum) / max(seen, 1),
            "num_examples": len(data),
            "steps": step,
            "seconds": seconds,
            "samples_per_second": seen / seconds,
        }
        if private is not None:
            metrics.update(self._spend_privacy(private.sampling_rate, step))
        delta = self.get_parameters() - received
        extras = {}
        if correction is not None:
            # SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K lr)
            new_control = self.control_variate - ins.tensors["server_control"] - delta / (step * options.learning_rate)
            extras["control_delta"] = new_control - self.control_variate
            self.control_variate = new_control
        return FitRes(delta, len(data), metrics, extras)

    def _batches(self, data: EncodedDataset, epochs: int, generator: torch.Generator, private: PrivateTraining | None):
        """The training batches: `epochs` shuffled passes, or under DP-SGD Poisson-sampled steps
        (None for a step that sampled no example)."""
        if private is None:
            for _ in range(epochs):
                order = torch.randperm(len(data), generator=generator).tolist()
                yield from batches(data, self.options.batch_size, self._pad_id(), order)
            return
        for chosen in private.sampled_steps(epochs):
            yield next(batches(data, len(chosen), self._pad_id(), chosen)) if chosen else None

    def _spend_privacy(self, sampling_rate: float, steps: int) -> dict[str, float]:
        """Account DP-SGD's steps of this round; this client's epsilon over all its rounds so far."""
        settings = self.options.dp_sgd
        if self.sample_privacy is None:
            self.sample_privacy = PrivacyAccountant(settings.accountant)
        self.sample_privacy.step(settings.noise_multiplier, sampling_rate, steps)
        return {"dp_sgd_epsilon": self.sample_privacy.epsilon(settings.delta), "dp_sgd_delta": settings.delta}

    @staticmethod
    @torch.no_grad()
    def _adjust_gradients(params, proximal_mu, centers, correction) -> None:
        for index, param in enumerate(params):
            if centers is not None:  # gradient of mu/2 ||w - w_global||^2
                param.grad.add_(param - centers[index], alpha=proximal_mu)
            if correction is not None:  # SCAFFOLD: g - c_i + c
                param.grad.add_(correction[index])

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        options = self.options
        if options.optimizer == "sgd":
            return torch.optim.SGD(params, lr=options.learning_rate, weight_decay=options.weight_decay)
        return torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": options.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=options.learning_rate,
        )
