"""How clients' replies enter the server: what each client declared when it joined (replies may
not claim more), what one update's examples count for, and the validation gate every training
reply passes before an algorithm or strategy sees it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlm.client import FedClient
from fedlm.core.update import ClientUpdate
from fedlm.errors import ConfigError, WireError
from fedlm.gate import checked_update

logger = logging.getLogger("fedlm")


@dataclass(frozen=True)
class Declared:
    """The training and test examples and the target keys (classification: the labels) each
    client declared when it joined (a `FedClient`'s data is in process), and `cap`, the most
    examples one client's update counts for (None: what it declared)."""

    examples: dict[str, int]
    test_examples: dict[str, int]
    target_keys: dict[str, list[str]]
    cap: int | None = None

    @classmethod
    def of(cls, clients: Sequence[Any], cap: int | None) -> Declared:
        if cap is not None and cap < 1:
            raise ConfigError(f"max_client_examples must be >= 1, got {cap}")
        examples, test_examples, target_keys = {}, {}, {}
        for client in clients:
            if isinstance(client, FedClient):
                examples[client.name], test_examples[client.name] = len(client.data), len(client.test_data or [])
                target_keys[client.name] = client.target_keys()
            else:
                examples[client.name], test_examples[client.name] = client.num_examples, client.num_test_examples
                target_keys[client.name] = client.target_keys
        return cls(examples, test_examples, target_keys, cap)

    def counted(self, num_examples: int) -> int:
        return num_examples if self.cap is None else min(num_examples, self.cap)

    def weights(self, names: list[str], equal: bool) -> dict[str, float]:
        """Each client's weight in a sum: its share of the (capped) examples, or 1 each when the
        strategy counts clients equally (DP)."""
        examples = {name: self.counted(self.examples[name]) for name in names}
        total = sum(examples.values())
        return {name: 1.0 if equal else count / total for name, count in examples.items()}


def gate_replies(
    replies: dict[str, Any],
    round_number: int,
    declared: Declared,
    summed: bool,
    upload_numel: Callable[[str], int],
    to_global: Callable[[str, torch.Tensor, dict], tuple[torch.Tensor, dict]],
    describe: Callable[[str], str],
    check: Callable[[ClientUpdate], None] = lambda update: None,
) -> tuple[list[ClientUpdate], list[dict[str, str]]]:
    """The replies through the validation gate (`fedlm.gate.checked_update`) into the global layout
    (`to_global`), then the algorithm's own `check` of what the values mean; under a channel that
    only delivers the sum (`summed`), their metrics, weighted by the examples the sum was weighted
    by. A reply that fails the gate or the check (a WireError), or a reason instead of a reply,
    drops the client, named."""
    updates, dropped = [], []
    for name, reply in replies.items():
        try:
            if isinstance(reply, str):
                raise WireError(reply)
            if summed:
                updates.append(
                    ClientUpdate(torch.zeros(0), declared.counted(declared.examples[name]), reply.metrics, client=name)
                )
                continue
            delta, examples, metrics, extras = checked_update(reply, upload_numel(name), declared.examples[name])
            delta, extras = to_global(name, delta, extras)
            update = ClientUpdate(delta, declared.counted(examples), metrics, extras, name)
            check(update)
        except WireError as error:
            logger.warning("round %d: client %s dropped: %s", round_number, describe(name), error)
            dropped.append({"client": name, "reason": str(error)})
            continue
        updates.append(update)
    return updates, dropped
