"""Federated distillation: the server learns from the clients' predictions on a public set.

`FederatedDistillation` replaces weight averaging (FedMD, Li and Wang 2019, arXiv:1910.03581;
FedKD-style soft labels, Wu et al. 2022, arXiv:2108.13323). Each round:
  1. every sampled client, with its own model of any architecture, first digests the last
     consensus (distils from the soft labels on the public set: FedMD's digest step) when
     `digest_epochs` > 0, trains on its private data, and sends its logits on the public set
     (or its probabilities at the temperature): public examples x classes values, not weights;
  2. the server softens them at temperature T and averages them into soft labels, weighted by
     the clients' example counts, confidence or certainty (`fedlm.core.distillation`);
  3. the server trains the student (its own architecture) on the public set with the KD loss;
     with `soft_labels_cover="own_labels"` (clients that are experts on different label sets or
     domains) each client's soft labels cover only the labels of its own data, and the student,
     whose classes are the union of theirs, matches each client over that client's labels only
     (`MaskedSoftLabels`);
  4. the student is the global model: evaluated on the federated validation set, saved, and
     the model every participant gets at the end.
Clients keep their own model between rounds (`FedClient.local_parameters`, checkpointed, and on
Flower kept in the node's state), so simulated clients can still share one model replica.

`EnsembleDistillation` (FedDF, Lin et al. 2020, arXiv:2006.07242) keeps weight averaging for
clients of one architecture and then refines the average on the public set by distilling from
the ensemble of the clients' models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedlm.algorithms.averaging import WeightAveraging
from fedlm.core.compression import Codec
from fedlm.core.distillation import (
    SOFT_LABEL_WEIGHTINGS,
    MaskedSoftLabels,
    aggregate_soft_labels,
    fingerprint,
    soften,
)
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import Strategy
from fedlm.core.update import ClientUpdate
from fedlm.data.dataset import TextDataset, load_public_set
from fedlm.errors import ConfigError
from fedlm.protocol import EvaluateIns, FitIns
from fedlm.tasks.distillation import distil, predict_logits
from fedlm.tasks.text import EncodedDataset

if TYPE_CHECKING:  # the server's global model, used through its methods only
    from fedlm.server.global_model import GlobalModel

logger = logging.getLogger("fedlm")

CLIENT_OUTPUTS = ("logits", "probabilities")
# what each client's soft labels speak for: every class of the federation, or the labels of its own data
SOFT_LABELS_COVER = ("all", "own_labels")


@dataclass
class PublicSet:
    """The public (proxy) set's texts, its labels if it has them (else None each), and a
    fingerprint that clients check so that everyone predicts on the same texts."""

    texts: list[str]
    labels: list[Any]
    fingerprint: str
    _encoded: EncodedDataset | None = field(default=None, repr=False)

    @classmethod
    def load(cls, data: Any, text_column: str | None = None, label_column: str | None = None) -> PublicSet:
        dataset = data if isinstance(data, TextDataset) else load_public_set(data, text_column, label_column)
        return cls(dataset.texts, dataset.labels, fingerprint(dataset.texts))

    def encoded(self, model: GlobalModel, with_labels: bool) -> EncodedDataset:
        """Tokenized with the global model's tokenizer (once); labels by the federation's label
        map when `with_labels` (an error if the set has none), else -1."""
        if self._encoded is None:
            labels = [-1] * len(self.texts)
            if with_labels:
                if any(label is None for label in self.labels):
                    raise ConfigError("hard_label_weight > 0 needs a public set with labels")
                labels = model.encode_targets(self.labels, owner="public set")
            self._encoded = model.encode(self.texts, labels)
        return self._encoded


def num_classes(model: GlobalModel) -> int:
    """The classes of the federation's label map; a ConfigError when its task has no class labels
    (distillation averages class probabilities)."""
    if not model.task.class_labels:
        raise ConfigError(
            f"federated distillation averages class probabilities, and task {model.task.kind!r} has no class "
            "labels; use weight averaging (no algorithm) or a classification task"
        )
    return model.metadata.num_labels


@dataclass
class DistillationSettings:
    """What the student (or the refined average) trains with."""

    temperature: float = 2.0
    weighting: str = "examples"
    epochs: int = 1
    learning_rate: float = 5e-5
    batch_size: int = 16
    hard_label_weight: float = 0.0

    def check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.weighting not in SOFT_LABEL_WEIGHTINGS:
            raise ConfigError(
                f"soft-label weighting must be one of {list(SOFT_LABEL_WEIGHTINGS)}, got {self.weighting!r}"
            )
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError("distillation epochs and batch_size must be >= 1 and learning_rate > 0")
        if not 0 <= self.hard_label_weight <= 1:
            raise ConfigError(f"hard_label_weight must be in [0, 1], got {self.hard_label_weight}")

    def train(self, model: GlobalModel, public: EncodedDataset, soft_labels: torch.Tensor, seed: int) -> float:
        """Distil the global model towards `soft_labels` on the encoded public set, its parameters
        becoming the global parameters; the last epoch's loss."""
        trained = model.model()
        loss = distil(
            trained, public, soft_labels, self.temperature, self.epochs, self.learning_rate, self.batch_size,
            model.pad_id, seed, model.options.device, self.hard_label_weight,
        )  # fmt: skip
        model.params = model.read(trained)
        return loss


class FederatedDistillation:
    """Clients send predictions on `public_data` instead of weights; the server trains `student`.

    `public_data`: a file, a `datasets.Dataset`, a list of dicts or of texts (labels optional,
    used only with `hard_label_weight`). `student`: a sequence classifier (any architecture) and
    its `tokenizer` (default: loaded from the student's folder). `client_output`: "logits", or
    "probabilities" (softmax at the temperature, computed by the client). `digest_epochs`: FedMD's
    digest, epochs each client distils from the last consensus before training on its own data.
    `soft_labels_cover`: "all" classes, or each client's "own_labels" (the labels it declared when
    it joined; the federation's label map is their union, sorted): then the consensus it digests
    is the student's own prediction.
    The rest (`temperature`, `weighting` of the soft labels, the student's `epochs`,
    `learning_rate`, `batch_size`, `hard_label_weight`) is `DistillationSettings`.
    """

    replaces_weights = True  # clients send outputs on the public set; the student is the global model

    def __init__(
        self,
        public_data: Any,
        student: torch.nn.Module,
        tokenizer: Any = None,
        *,
        client_output: str = "logits",
        digest_epochs: int = 0,
        soft_labels_cover: str = "all",
        text_column: str | None = None,
        label_column: str | None = None,
        **settings: Any,
    ) -> None:
        self.settings = DistillationSettings(**settings)
        self.settings.check()
        if client_output not in CLIENT_OUTPUTS:
            raise ConfigError(f"client_output must be one of {list(CLIENT_OUTPUTS)}, got {client_output!r}")
        if soft_labels_cover not in SOFT_LABELS_COVER:
            raise ConfigError(f"soft_labels_cover must be one of {list(SOFT_LABELS_COVER)}, got {soft_labels_cover!r}")
        if digest_epochs < 0:
            raise ConfigError(f"digest_epochs must be >= 0, got {digest_epochs}")
        self.public = PublicSet.load(public_data, text_column, label_column)
        self.student = student
        self.tokenizer = tokenizer
        self.client_output = client_output
        self.digest_epochs = digest_epochs
        self.soft_labels_cover = soft_labels_cover
        self.client_labels: dict[str, list[str]] = {}  # each client's declared labels
        self.soft_labels: torch.Tensor | None = None  # the last consensus, for the digest step

    def client_config(self) -> dict[str, Any]:
        """What a client needs to take part, sent with every instruction."""
        return {
            "temperature": self.settings.temperature,
            "output": self.client_output,
            "digest_epochs": self.digest_epochs,
            "public_examples": len(self.public.texts),
            "public_fingerprint": self.public.fingerprint,
        }

    def join(self, clients: list[Any], target_keys: dict[str, list[str]]) -> None:
        """Note each client's declared labels (`target_keys`, by name, of in-process and remote
        clients); in process, every client (`clients`) predicts on the public set from now on."""
        self.client_labels = dict(target_keys)
        if self.soft_labels_cover == "own_labels":
            log_label_sets(self.client_labels, self.settings.hard_label_weight > 0)
        for client in clients:
            client.join_distillation(self.public.texts)

    def fit_messages(
        self, model: GlobalModel, strategy: Strategy, names: list[str], base: dict[str, Any], codec: Codec | None
    ) -> dict[str, FitIns]:
        """One message for every client: no parameters, the public set's description, the last
        consensus for the digest step, and DP's clipping and noise shares when clients add them."""
        config, _ = strategy.configure_fit(model.params)
        tensors = {}
        if self.digest_epochs > 0 and self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.float()
        message = FitIns(torch.zeros(0), {**base, **config, "distillation": self.client_config()}, tensors)
        return dict.fromkeys(names, message)

    def evaluate_messages(self, model: GlobalModel, names: list[str], round_number: int) -> dict[str, EvaluateIns]:
        """Each client evaluates its own model."""
        config = {"round": round_number, "distillation": self.client_config()}
        return dict.fromkeys(names, EvaluateIns(torch.zeros(0), config))

    def upload_numel(self, model: GlobalModel, name: str | None = None) -> int:
        return len(self.public.texts) * num_classes(model)

    def check_update(self, model: GlobalModel, update: ClientUpdate) -> None:
        """Any finite logits or probabilities (the gate checked that) make soft labels."""
        return None

    def aggregate(
        self,
        model: GlobalModel,
        strategy: Strategy,
        updates: list[ClientUpdate],
        seed: int,
        round_number: int,
        summed: None = None,
    ) -> dict[str, Any]:
        """Soft labels from the clients' outputs, then the student trained on them; the student's
        parameters become the global parameters. Returns the round's distillation metrics."""
        num_labels = num_classes(model)
        public = self.public.encoded(model, self.settings.hard_label_weight > 0)
        student_seed = derive_seed(seed, "student", round_number)
        if self.soft_labels_cover == "own_labels":
            if strategy.weights_clients_equally:  # a DP strategy: it would release only a noisy mean
                raise ConfigError(
                    "soft_labels_cover own_labels restricts each client's probabilities to its labels, and dp "
                    "releases only their noisy mean; use soft_labels_cover all with dp"
                )
            experts = MaskedSoftLabels.of(
                self._probabilities(updates, num_labels), self._label_masks(model, updates, num_labels),
                [update.num_examples for update in updates], self.settings.weighting,
            )  # fmt: skip
            loss = self.settings.train(model, public, experts, student_seed)
            self.soft_labels = None
            if self.digest_epochs > 0:  # the consensus the clients digest: the student's own prediction
                student = predict_logits(model.model(), public, self.settings.batch_size, model.pad_id,
                                         model.options.device)  # fmt: skip
                self.soft_labels = soften(student, self.settings.temperature)
            return {"student_loss": loss, "soft_label_confidence": experts.confidence()}
        noisy = strategy.private_mean([update.delta for update in updates])
        if noisy is not None:
            # clipped, noised, equally weighted probabilities, as for weight updates; accounted alike
            noisy = noisy.view(-1, num_labels)
            clean = noisy.double().clamp_min(0)
            clean[clean.sum(dim=-1) == 0] = 1.0  # noise took every class below 0: no information, uniform
            self.soft_labels = clean / clean.sum(dim=-1, keepdim=True)
        else:
            counts = [update.num_examples for update in updates]
            outputs = self._probabilities(updates, num_labels)
            self.soft_labels = aggregate_soft_labels(outputs, counts, self.settings.weighting)
        loss = self.settings.train(model, public, self.soft_labels, student_seed)
        confidence = float(self.soft_labels.max(dim=-1).values.mean())
        return {"student_loss": loss, "soft_label_confidence": confidence}

    def _probabilities(self, updates: list[ClientUpdate], num_labels: int) -> list[torch.Tensor]:
        """Each client's outputs as probabilities (public examples x classes): softened logits, or
        the probabilities it sent."""
        outputs = [update.delta.view(-1, num_labels) for update in updates]
        if self.client_output == "logits":
            outputs = [soften(output, self.settings.temperature) for output in outputs]
        return outputs

    def _label_masks(self, model: GlobalModel, updates: list[ClientUpdate], num_labels: int) -> torch.Tensor:
        """Clients x classes, True on the labels each client declared when it joined."""
        masks = torch.zeros(len(updates), num_labels, dtype=torch.bool)
        for row, update in enumerate(updates):
            masks[row, model.encode_targets(self.client_labels[update.client], f"client {update.client}")] = True
        return masks

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The last consensus, for the clients' digest step after a resume."""
        return {} if self.soft_labels is None else {"soft_labels": self.soft_labels.contiguous()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.soft_labels = state.get("soft_labels")


def log_label_sets(client_labels: dict[str, list[str]], labelled_public_set: bool) -> None:
    """Log the union label space and what each client covers of it, and warn when the clients'
    label sets fall into groups that share no label: their soft labels then say how each group's
    labels rank, never which group a text belongs to (unless the public set's labels say it)."""
    union = sorted({key for keys in client_labels.values() for key in keys})
    logger.info(
        "distillation over the union of the clients' labels (%d: %s); each client's soft labels cover its own: %s",
        len(union), ", ".join(union), "; ".join(f"{name}: {', '.join(keys)}" for name, keys in client_labels.items()),
    )  # fmt: skip
    groups: list[set[str]] = []
    for keys in client_labels.values():
        joined = set(keys)
        for group in [group for group in groups if group & joined]:
            groups.remove(group)
            joined |= group
        groups.append(joined)
    if len(groups) > 1 and not labelled_public_set:
        described = " | ".join(", ".join(sorted(group)) for group in groups)
        logger.warning(
            "the clients' label sets form %d groups that share no label (%s): their soft labels cannot tell the "
            "student which group a public text belongs to; give public_data.label_column with hard_label_weight > 0, "
            "or clients whose label sets overlap",
            len(groups), described,
        )  # fmt: skip


class EnsembleDistillation(WeightAveraging):
    """FedDF: after averaging, distil the averaged model from the ensemble of the clients'
    models (global + each client's delta) on `public_data` (labels not needed)."""

    def __init__(
        self, public_data: Any, *, text_column: str | None = None, label_column: str | None = None, **settings: Any
    ) -> None:
        self.settings = DistillationSettings(**settings)
        self.settings.check()
        self.public = PublicSet.load(public_data, text_column, label_column)

    def aggregate(
        self,
        model: GlobalModel,
        strategy: Strategy,
        updates: list[ClientUpdate],
        seed: int,
        round_number: int,
        summed: None = None,
    ) -> dict[str, Any]:
        """Weight averaging, then the average distilled from the clients' ensemble (`refine`)."""
        previous = model.params
        summary = super().aggregate(model, strategy, updates, seed, round_number)
        return {**summary, **self.refine(model, previous, updates, seed, round_number)}

    def refine(
        self, model: GlobalModel, previous: torch.Tensor, updates: list[ClientUpdate], seed: int, round_number: int
    ) -> dict[str, float]:
        """Distil the averaged global parameters towards the ensemble of the clients' models
        (`previous` + each update) on the public set; the distillation's loss."""
        num_classes(model)  # the ensemble's outputs are class probabilities
        public = self.public.encoded(model, self.settings.hard_label_weight > 0)
        outputs = []
        for update in updates:
            client_model = model.model(previous + update.delta)
            logits = predict_logits(client_model, public, self.settings.batch_size, model.pad_id, model.options.device)
            outputs.append(soften(logits, self.settings.temperature))
        soft_labels = aggregate_soft_labels(outputs, [u.num_examples for u in updates], self.settings.weighting)
        loss = self.settings.train(model, public, soft_labels, derive_seed(seed, "ensemble", round_number))
        return {"ensemble_distillation_loss": loss}
