"""FedServer: the round loop over a global model, a strategy, an algorithm and an update channel.

A round, top to bottom (`run_round`):
  1. sample clients (seeded by run seed and round) and build their instructions (the algorithm);
  2. send them through the update channel and collect the replies (or only their sum);
  3. drop clients that raised or sent a malformed update (the validation gate), naming the reason;
  4. aggregate the remaining updates (the algorithm, with the strategy; FedAvg by default);
  5. evaluate the new global model on the federated validation set and the clients' test splits;
  6. record the round's metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedlm.algorithms import WeightAveraging
from fedlm.channels import PlainChannel, RoundContext, UpdateChannel
from fedlm.client import FedClient
from fedlm.core.compression import codec_from_spec
from fedlm.core.schedule import LearningRateSchedule
from fedlm.core.seeding import derive_seed
from fedlm.core.strategies import FedAvg, Strategy
from fedlm.core.update import ClientUpdate, train_summary
from fedlm.errors import ConfigError
from fedlm.privacy.accounting import RoundAccounting
from fedlm.protocol import ClientTransport, FitIns, LoopbackTransport
from fedlm.server.evaluation import encode_dataset, evaluate_dataset, evaluate_on_clients
from fedlm.server.global_model import GlobalModel, global_model_of
from fedlm.server.intake import Declared, gate_replies
from fedlm.server.seed_api import SeedApi
from fedlm.tasks.text import EncodedDataset

logger = logging.getLogger("fedlm")


class FedServer(SeedApi):
    """Runs rounds over `clients` with `strategy` (FedAvg), `algorithm` (weight averaging) and
    `channel` (updates in the clear); `privacy` accounts each aggregated round (client-level DP),
    `download_codec` compresses the parameters sent for training, `learning_rates` gives each
    round's local learning rate (the clients' own when None), and `max_total_bytes` is the
    communication budget of the training rounds (`budget_stop_reason`).

    Given `FedClient`s it builds the `GlobalModel` from them (`global_model_of`), reaches them
    through a `LoopbackTransport` and broadcasts the global parameters; over remote clients
    (`ClientInfo`s) pass the `transport` that reaches them and the `global_model`.
    """

    def __init__(
        self,
        clients: Sequence[Any],
        strategy: Strategy | None = None,
        *,
        seed: int = 0,
        min_clients: int = 1,
        round_timeout: float | None = None,
        max_client_examples: int | None = None,
        lora_aggregation: str = "fedit",
        algorithm: Any = None,
        channel: UpdateChannel | None = None,
        privacy: RoundAccounting | None = None,
        download_codec: dict[str, Any] | None = None,
        transport: ClientTransport | None = None,
        global_model: GlobalModel | None = None,
        learning_rates: LearningRateSchedule | None = None,
        max_total_bytes: int | None = None,
    ) -> None:
        if not clients:
            raise ConfigError("FedServer needs at least one client")
        if min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients}")
        if max_total_bytes is not None and max_total_bytes < 1:
            raise ConfigError(f"max_total_bytes must be >= 1, got {max_total_bytes}")
        self.clients = list(clients)
        self.algorithm = algorithm or WeightAveraging()
        in_process = transport is None  # the clients are FedClients
        if in_process:
            _name_clients(self.clients)
            global_model = global_model_of(self.clients, lora_aggregation, self.algorithm)
            transport = LoopbackTransport(self.clients)
        self.global_model, self.transport = global_model, transport
        self.strategy, self.channel = strategy or FedAvg(), channel or PlainChannel()
        self.seed, self.min_clients, self.round_timeout = seed, min_clients, round_timeout
        self.privacy, self.download_codec = privacy, download_codec
        self.learning_rates, self.max_total_bytes = learning_rates, max_total_bytes
        self.round, self.history, self.stop_reason = 0, [], None
        self.declared = Declared.of(self.clients, max_client_examples)  # replies may not claim more
        self.transport.max_reply_bytes = self.channel.max_reply_bytes(self.upload_numel())
        if self.algorithm.replaces_weights:
            self.algorithm.join(self.clients if in_process else [], self.declared.target_keys)
        elif in_process:
            self.broadcast_model()

    @property
    def global_params(self) -> torch.Tensor:
        return self.global_model.params

    def upload_numel(self, name: str | None = None) -> int:
        """How many values a client's update holds (`name`'s, or the largest)."""
        return self.algorithm.upload_numel(self.global_model, name)

    def state_dict(self) -> dict[str, Any]:
        """What a run needs to continue bit for bit (`fedlm.checkpoint` writes it): tensors by part,
        and the round, the history and the privacy accountant as JSON values."""
        return {
            "global": self.global_model.state_dict(), "algorithm": self.algorithm.state_dict(),
            "strategy": self.strategy.state_dict(), "clients": _client_state(self.clients),
            "round": self.round, "history": self.history,
            "privacy": None if self.privacy is None else self.privacy.accountant.state(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s state; a ValueError names what does not fit."""
        for part, owner in (("global", self.global_model), ("algorithm", self.algorithm), ("strategy", self.strategy)):
            owner.load_state_dict(state[part])
        _load_client_state(self.clients, state["clients"])
        if self.privacy is not None and state["privacy"] is not None:
            self.privacy.accountant.load_state(state["privacy"])
        self.round, self.history = state["round"], list(state["history"])

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
        """Run `rounds` rounds (see `run_round`), stopping before a round that would exceed the
        privacy or the communication budget; returns one metrics dict per round (also kept in
        `history`)."""
        if rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {rounds}")
        encoded = None if validation is None else self.encode_dataset(validation)
        records = []
        for _ in range(rounds):
            self.stop_reason = None if self.privacy is None else self.privacy.stop_reason(self.round + 1)
            self.stop_reason = self.stop_reason or self.budget_stop_reason()
            if self.stop_reason is not None:
                logger.warning("%s", self.stop_reason)
                break
            records.append(self.run_round(local_epochs, clients_per_round, encoded, clients_per_evaluation))
            if on_round_end is not None:
                on_round_end(records[-1])
        return records

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
        start, bytes_before = time.perf_counter(), self.transport.bytes.snapshot()
        record: dict[str, Any] = {"round": round_number}
        if self.learning_rates is not None:
            record["learning_rate"] = self.learning_rates(round_number)

        # 1-2. sample, send the instructions through the channel, collect the replies
        names = [client.name for client in self.sample_clients(round_number, clients_per_round)]
        messages = self._fit_messages(names, round_number, local_epochs)
        collected = self.channel.collect(self._round_context(round_number, names), messages)
        if collected.error is not None:
            logger.warning("round %d: %s failed: %s; global model unchanged", round_number, self.channel.kind, collected.error)  # fmt: skip
        if collected.summary is not None or collected.error is not None:
            record[self.channel.kind] = collected.summary or {"error": collected.error}

        # 3. the validation gate: keep the valid updates, drop the rest by name
        updates, dropped = self._gated(collected.replies, round_number)
        record.update(_client_epsilons(collected.replies))
        record.update({"clients": len(updates), "dropped": dropped})

        # 4. aggregate, or skip the round when too few clients remain
        summed = None if collected.total is None else (collected.total, collected.total_weight)
        if len(updates) >= self.min_clients and (not self.channel.sums or summed is not None):
            step = self.algorithm.aggregate(self.global_model, self.strategy, updates, self.seed, round_number, summed)
            record.update({**train_summary(updates), **step})
            if self.privacy is not None:  # a released aggregate: the round costs privacy
                record.update(self.privacy.spend_round(self.strategy.round_noise_multiplier(len(updates))))
                record.update(self.strategy.round_metrics())
        else:
            logger.warning(
                "round %d skipped: %d client(s) sent a valid update, min_clients is %d; global model unchanged",
                round_number, len(updates), self.min_clients,
            )  # fmt: skip
            record["skipped"] = True
        self.round = round_number

        # 5. evaluate: federated validation set, then the clients' own test splits
        eval_start = time.perf_counter()
        record.update(self.evaluate_global_model(validation, clients_per_evaluation))
        record["eval_seconds"] = time.perf_counter() - eval_start

        # 6. record: bytes moved and time, and what the round cost beyond training and evaluation
        # (clients train one after the other in process, side by side in a deployment)
        record.update(self.transport.bytes.since(bytes_before))
        record["seconds"] = time.perf_counter() - start
        training = record.get("train_seconds_max" if self.transport.parallel else "train_seconds", 0.0)
        record["overhead_seconds"] = record["seconds"] - record["eval_seconds"] - training
        self.history.append(record)
        return record

    def bytes_spent(self) -> int:
        """Bytes sent and received in the training rounds so far (each round's evaluation included)."""
        return sum(record.get("bytes_up", 0) + record.get("bytes_down", 0) for record in self.history)

    def budget_stop_reason(self) -> str | None:
        """Why the next round may not run under `max_total_bytes`: the bytes so far plus the
        largest round's would exceed it. Nothing to go by before the first round, which runs."""
        if self.max_total_bytes is None or not self.history:
            return None
        spent = self.bytes_spent()
        largest = max(record.get("bytes_up", 0) + record.get("bytes_down", 0) for record in self.history)
        if spent + largest <= self.max_total_bytes:
            return None
        return (
            f"communication budget: round {self.round + 1} would exceed federation.max_total_bytes "
            f"{self.max_total_bytes:,} ({spent:,} bytes spent in {len(self.history)} rounds, the largest round "
            f"{largest:,} bytes)"
        )

    def sample_clients(self, round_number: int, count: int | None, purpose: str = "fit") -> list[Any]:
        """`count` clients (all when None), drawn with a seed from the run seed, purpose and round."""
        return sample(self.clients, count, derive_seed(self.seed, purpose, round_number))

    def _fit_messages(
        self, names: list[str], round_number: int, epochs: int, compress: bool = True
    ) -> dict[str, FitIns]:
        """Each named client's instructions; `compress` applies the download codec (only to messages
        that travel: `broadcast_model` hands clients the exact parameters)."""
        base = {"round": round_number, "epochs": epochs, "seed": self.seed, **self.channel.fit_config()}
        if self.learning_rates is not None:
            base["learning_rate"] = self.learning_rates(round_number)
        codec = codec_from_spec(self.download_codec) if compress and self.download_codec is not None else None
        return self.algorithm.fit_messages(self.global_model, self.strategy, names, base, codec)

    def _round_context(self, round_number: int, names: list[str]) -> RoundContext:
        weights = self.declared.weights(names, self.strategy.weights_clients_equally)
        return RoundContext(self.transport, round_number, self.seed, self.global_model.spec.numel,
                            self._deadline(), weights, self.declared.examples)  # fmt: skip

    def _gated(self, replies: dict[str, Any], round_number: int) -> tuple[list[ClientUpdate], list[dict[str, str]]]:
        return gate_replies(replies, round_number, self.declared, self.channel.sums, self.upload_numel,
                            self.global_model.to_global, self.transport.describe,
                            lambda update: self.algorithm.check_update(self.global_model, update))  # fmt: skip

    def _deadline(self) -> float | None:
        return None if self.round_timeout is None else time.monotonic() + self.round_timeout

    # ---- evaluation --------------------------------------------------------------------------

    def encode_dataset(self, dataset: Any, text_column: str | None = None, label_column: str | None = None):
        """Read and tokenize a dataset for the federation's task (encoded ones pass through)."""
        return encode_dataset(self.global_model, dataset, text_column, label_column)

    def evaluate_global_model(self, validation: EncodedDataset | None, clients_per_evaluation: int | None = None):
        """`val_*` metrics on the federated validation set (if any) and `client_*` metrics on the test
        splits of `clients_per_evaluation` clients (all when None, none when 0)."""
        validated = {} if validation is None else evaluate_dataset(self.global_model, validation)
        metrics: dict[str, Any] = {f"val_{key}": value for key, value in validated.items()}
        if clients_per_evaluation != 0:
            sampled = self.sample_clients(self.round, clients_per_evaluation, purpose="evaluate")
            names = [client.name for client in sampled if client.has_test_data]
            messages = self.algorithm.evaluate_messages(self.global_model, names, self.round)
            metrics.update(evaluate_on_clients(self.transport, messages, self.declared.test_examples,
                                               self._deadline(), self.round, self.global_model.task))  # fmt: skip
        return metrics


def _name_clients(clients: list[FedClient]) -> None:
    for index, client in enumerate(clients):
        if client.name is None:
            client.name = f"client-{index}"
    names = [client.name for client in clients]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"client names must be unique; {duplicates} appear more than once (pass name=...)")


def sample(clients: list[Any], count: int | None, seed: int) -> list[Any]:
    """`count` of `clients` (all when None) drawn with `seed`, in their order."""
    if count is None or count >= len(clients):
        return list(clients)
    if count < 0:
        raise ConfigError(f"the number of clients to sample must be >= 0, got {count}")
    chosen = torch.randperm(len(clients), generator=torch.Generator().manual_seed(seed))[:count]
    return [clients[index] for index in sorted(chosen.tolist())]


def _client_state(clients: list[Any]) -> dict[str, torch.Tensor]:
    """The in-process clients' state, keyed "name/key" (remote clients keep their own)."""
    local = [client for client in clients if isinstance(client, FedClient)]
    return {f"{client.name}/{key}": value for client in local for key, value in client.state_dict().items()}


def _load_client_state(clients: list[Any], state: dict[str, torch.Tensor]) -> None:
    for client in clients:
        if isinstance(client, FedClient):
            prefix = f"{client.name}/"
            client.load_state_dict(
                {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            )


def _client_epsilons(replies: dict[str, Any]) -> dict[str, Any]:
    """DP-SGD: each client's own epsilon after this round, by name (clients account for
    themselves), and the largest, which holds for every client."""
    trained = [(name, reply.metrics) for name, reply in replies.items() if not isinstance(reply, str)]
    epsilons = {name: metrics["dp_sgd_epsilon"] for name, metrics in trained if "dp_sgd_epsilon" in metrics}
    if not epsilons:
        return {}
    delta = max(metrics["dp_sgd_delta"] for _, metrics in trained if "dp_sgd_delta" in metrics)
    return {"client_dp_sgd_epsilon": epsilons, "dp_sgd_epsilon_max": max(epsilons.values()), "dp_sgd_delta": delta}
