"""A training round under secure aggregation: the server learns the weighted sum of the updates
of the clients that finished, never one client's update (`fedlm.privacy.secure_aggregation`).

Four exchanges with the sampled clients: public keys, encrypted key shares (routed by the
server), training with a masked update as the reply, and the unmasking shares. Each client's
update is weighted before masking (by its share of the sampled clients' examples; with
differential privacy, which then adds its noise on the clients, every client counts once) and
the server divides by the weights of the clients that finished. A client that fails or leaves
at any stage is dropped and named; the sum is still recovered while every finished client keeps
`threshold` neighbours that answer, otherwise the round fails with `SecAggError` and the global
model stays unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlm.core.seeding import derive_seed
from fedlm.errors import ConfigError
from fedlm.privacy.secure_aggregation import (
    RING_BITS,
    SecAggClient,
    SecAggError,
    SecAggServer,
    SecAggSettings,
    neighbourhoods,
)
from fedlm.protocol import FitIns, FitRes, StageIns, StageRes, as_bytes, from_bytes

if TYPE_CHECKING:
    from fedlm.server import FedServer


@dataclass
class SecureAggregation:
    """Settings: values clipped to [-clip_range, clip_range] before quantization (weighted
    updates are small; with DP the clipped, noised update must fit), and the neighbourhood size
    and threshold (None: SecAgg+'s defaults for the number of sampled clients)."""

    clip_range: float = 1.0
    num_neighbours: int | None = None
    threshold: int | None = None

    def settings(self, num_clients: int, graph_seed: int) -> SecAggSettings:
        defaults = SecAggSettings.for_clients(num_clients, self.clip_range, graph_seed)
        return SecAggSettings(
            num_clients,
            self.threshold or defaults.threshold,
            self.num_neighbours or defaults.num_neighbours,
            self.clip_range,
            graph_seed,
        )


def secure_fit(
    server: FedServer, messages: dict[str, FitIns], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, FitRes], dict[str, str], dict[str, Any]]:
    """Train the clients of `messages` (their fit instructions) under secure aggregation, each
    update multiplied by its weight. Returns the sum of the finished clients' weighted updates,
    their replies by name (metrics; the update in them is masked), why the others dropped out,
    and a summary for the round's record."""
    names = list(messages)
    round_number = next(iter(messages.values())).config["round"]
    settings = server.secure_aggregation.settings(len(names), derive_seed(server.seed, "secagg", round_number))
    secagg = SecAggServer(settings)
    index = {name: position for position, name in enumerate(names)}
    neighbours = {name: [names[v] for v in secagg.neighbours[index[name]]] for name in names}
    dropped: dict[str, str] = {}
    deadline = server._deadline()

    def exchange(stage: str, messages: dict[str, StageIns]) -> dict[str, StageRes]:
        answers = {}
        for name, reply in server.transport.stage(messages, deadline).items():
            if isinstance(reply, str):
                dropped[name] = f"secure aggregation, {stage}: {reply}"
            else:
                answers[name] = reply
        return answers

    # 1. public keys
    config = {"num_clients": settings.num_clients, "threshold": settings.threshold, "clip_range": settings.clip_range,
              "num_neighbours": settings.num_neighbours, "graph_seed": settings.graph_seed}  # fmt: skip
    keys = exchange("keys", {n: StageIns("secagg_keys", {**config, "index": index[n]}) for n in names})
    secagg.mask_public = {index[n]: as_bytes(reply.tensors["mask"]) for n, reply in keys.items()}
    # 2. key shares, encrypted for each neighbour
    shares = exchange("shares", {
        n: StageIns("secagg_shares", {}, {f"{part}.{index[v]}": keys[v].tensors[part] for v in neighbours[n] if v in keys
                                          for part in ("channel", "mask")})
        for n in keys
    })  # fmt: skip
    # 3. training; each reply is a masked update
    masked_fit = {}
    for name in shares:
        base = messages[name]
        inbox = {
            f"from.{index[sender]}": reply.tensors[f"to.{index[name]}"]
            for sender, reply in shares.items()
            if f"to.{index[name]}" in reply.tensors
        }
        config = {**base.config, "secagg": {"weight": weights[name]}}
        masked_fit[name] = FitIns(base.parameters, config, {**base.tensors, **inbox})
    masked, replies = {}, {}
    for name, reply in server.transport.fit(masked_fit, deadline).items():
        problem = reply if isinstance(reply, str) else _masked_problem(reply, server.spec.numel)
        if problem:
            dropped[name] = problem
        else:
            masked[index[name]] = reply.delta
            replies[name] = reply
    # 4. unmasking shares from the finished clients
    finished = {names[i] for i in masked}
    left = {n for n in shares if n not in finished}
    revealed = exchange("reveal", {
        n: StageIns("secagg_reveal", {"survivors": [index[v] for v in neighbours[n] if v in finished],
                                       "dropped": [index[v] for v in neighbours[n] if v in left]})
        for n in finished
    })  # fmt: skip
    opened = {index[n]: {part: {int(k): int(v) for k, v in reply.meta[part].items()} for part in ("self_seed", "mask_key")}
              for n, reply in revealed.items()}  # fmt: skip
    try:
        total = secagg.unmask(masked, opened, {index[n] for n in shares})
    except SecAggError as error:  # say who went away and why
        reasons = "; ".join(f"{name}: {reason}" for name, reason in dropped.items())
        raise SecAggError(f"{error}{f' (dropped: {reasons})' if reasons else ''}") from None
    summary = {"clients": len(names), "finished": len(finished), "neighbours": settings.num_neighbours,
               "threshold": settings.threshold}  # fmt: skip
    return total, replies, {n: r for n, r in dropped.items() if n not in finished}, summary


def _masked_problem(reply: FitRes, numel: int) -> str | None:
    vector = reply.delta
    if vector.dtype != torch.int64 or vector.dim() != 1 or vector.numel() != numel:
        return f"masked update has dtype {vector.dtype} and shape {list(vector.shape)}, expected int64 [{numel}]"
    if int(vector.min()) < 0 or int(vector.max()) >= 2**RING_BITS:
        return "masked update has values outside the ring"
    return None


def answer_stage(secagg: SecAggClient | None, ins: StageIns, owner: str) -> tuple[SecAggClient, StageRes]:
    """A client's answer to one exchange: its fresh public keys (`secagg_keys`, which starts a
    new `SecAggClient`), its encrypted key shares (`secagg_shares`), or the shares that unmask
    the sum (`secagg_reveal`). Returns the client's secrets for the next exchange and the reply."""
    config = ins.config
    if ins.stage == "secagg_keys":
        settings = SecAggSettings(config["num_clients"], config["threshold"], config["num_neighbours"],
                                  config["clip_range"], config["graph_seed"])  # fmt: skip
        secagg = SecAggClient(config["index"], settings, neighbourhoods(settings)[config["index"]])
        channel, mask = secagg.public_keys()
        return secagg, StageRes({}, {"channel": from_bytes(channel), "mask": from_bytes(mask)})
    if secagg is None:
        raise ConfigError(f"{owner}: secure aggregation stage {ins.stage!r} before its keys")
    if ins.stage == "secagg_shares":
        keys: dict[int, dict[str, bytes]] = {}
        for key, value in ins.tensors.items():
            part, other = key.split(".")
            keys.setdefault(int(other), {})[part] = as_bytes(value)
        sealed = secagg.share_keys({v: (k["channel"], k["mask"]) for v, k in keys.items()})
        return secagg, StageRes({}, {f"to.{v}": from_bytes(ciphertext) for v, ciphertext in sealed.items()})
    if ins.stage == "secagg_reveal":
        shares = secagg.reveal(set(config["survivors"]), set(config["dropped"]))
        return secagg, StageRes({part: {str(k): str(v) for k, v in values.items()} for part, values in shares.items()})
    raise ConfigError(f"{owner}: unknown stage {ins.stage!r}")
