"""The secure aggregation channel: the server learns the weighted sum of the updates of the
clients that finished, never one client's update (SecAgg+, `fedlm.privacy.secure_aggregation`).

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
from typing import Any, ClassVar

import torch

from fedlm import gate
from fedlm.channels.base import ChannelParty, CollectedReplies, RoundContext, UpdateChannel
from fedlm.core.seeding import derive_seed
from fedlm.errors import ConfigError, WireError
from fedlm.privacy.secure_aggregation import (
    PRIME,
    PUBLIC_KEY_BYTES,
    RING_BITS,
    SEALED_SHARE_BYTES,
    SecAggClient,
    SecAggError,
    SecAggServer,
    SecAggSettings,
    neighbourhoods,
    public_key_problem,
)
from fedlm.protocol import FitIns, FitRes, StageIns, StageRes, as_bytes, from_bytes


@dataclass
class SecureAggregation(UpdateChannel):
    """Settings: values clipped to [-clip_range, clip_range] before quantization (weighted
    updates are small; with DP the clipped, noised update must fit), and the neighbourhood size
    and threshold (None: SecAgg+'s defaults for the number of sampled clients)."""

    kind: ClassVar[str] = "secure_aggregation"
    sums: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = ("secagg_keys", "secagg_shares", "secagg_reveal")

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

    def collect(self, context: RoundContext, messages: dict[str, FitIns]) -> CollectedReplies:
        """Train the clients of `messages` under secure aggregation (`secure_round`); a round whose
        sum cannot be unmasked comes back with its `error` and no sum."""
        try:
            total, replies, failed, summary = secure_round(self, context, messages)
        except SecAggError as error:
            return CollectedReplies({}, error=str(error))
        return CollectedReplies({**failed, **replies}, total, sum(context.weights[name] for name in replies), summary)

    @classmethod
    def seal(cls, party: ChannelParty, result: FitRes, ins: FitIns) -> FitRes:
        """The weighted update masked with this round's secrets (which now hold the neighbours' shares)."""
        inbox = {
            int(key.split(".")[1]): as_bytes(value) for key, value in ins.tensors.items() if key.startswith("from.")
        }
        weighted = result.delta * float(ins.config["channel"]["weight"])
        secrets = party.channel_state.get(cls.kind)
        if secrets is None:
            raise ConfigError(f"client {party.name}: a masked update asked for before secure aggregation's keys")
        return FitRes(secrets.masked_input(weighted, inbox), result.num_examples, result.metrics, result.extras)

    @classmethod
    def answer(cls, party: ChannelParty, ins: StageIns) -> StageRes:
        secrets, reply = answer_stage(party.channel_state.get(cls.kind), ins, f"client {party.name}")
        party.channel_state[cls.kind] = secrets
        return reply


def secure_round(
    channel: SecureAggregation, context: RoundContext, messages: dict[str, FitIns]
) -> tuple[torch.Tensor, dict[str, FitRes], dict[str, str], dict[str, Any]]:
    """Train the clients of `messages` (their fit instructions) under secure aggregation, each
    update multiplied by its weight. Returns the sum of the finished clients' weighted updates,
    their replies by name (metrics; the update in them is masked), why the others dropped out,
    and a summary for the round's record."""
    names = list(messages)
    settings = channel.settings(len(names), derive_seed(context.seed, "secagg", context.round))
    secagg = SecAggServer(settings)
    index = {name: position for position, name in enumerate(names)}
    neighbours = {name: [names[v] for v in secagg.neighbours[index[name]]] for name in names}
    dropped: dict[str, str] = {}
    deadline = context.deadline

    def exchange(stage: str, messages: dict[str, StageIns], check) -> dict[str, Any]:
        """The replies that pass `check` (the protocol's expected shape for this stage; it
        returns what the server keeps of a reply); the others' senders are dropped, named."""
        answers = {}
        for name, reply in context.transport.stage(messages, deadline).items():
            try:
                if isinstance(reply, str):
                    raise WireError(reply)
                answers[name] = check(name, reply)
            except WireError as error:
                dropped[name] = f"secure aggregation, {stage}: {error}"
        return answers

    # 1. public keys
    config = {"num_clients": settings.num_clients, "threshold": settings.threshold, "clip_range": settings.clip_range,
              "num_neighbours": settings.num_neighbours, "graph_seed": settings.graph_seed}  # fmt: skip
    keys = exchange("keys", {n: StageIns("secagg_keys", {**config, "index": index[n]}) for n in names}, _public_keys)
    secagg.mask_public = {index[n]: as_bytes(reply.tensors["mask"]) for n, reply in keys.items()}

    # 2. key shares, encrypted for each neighbour
    def sealed_shares(name: str, reply: StageRes) -> StageRes:
        expected = {f"to.{index[v]}" for v in neighbours[name] if v in keys}
        if set(reply.tensors) != expected or reply.meta:
            raise WireError(f"expected sealed shares {sorted(expected)} only, got {sorted(reply.tensors)[:20]}")
        for key in expected:
            gate.byte_string(reply.tensors, key, SEALED_SHARE_BYTES)
        return reply

    shares = exchange("shares", {
        n: StageIns("secagg_shares", {}, {f"{part}.{index[v]}": keys[v].tensors[part] for v in neighbours[n] if v in keys
                                          for part in ("channel", "mask")})
        for n in keys
    }, sealed_shares)  # fmt: skip
    # 3. training; each reply is a masked update
    masked_fit = {}
    for name in shares:
        base = messages[name]
        inbox = {
            f"from.{index[sender]}": reply.tensors[f"to.{index[name]}"]
            for sender, reply in shares.items()
            if f"to.{index[name]}" in reply.tensors
        }
        config = {**base.config, "channel": {"kind": channel.kind, "weight": context.weights[name]}}
        masked_fit[name] = FitIns(base.parameters, config, {**base.tensors, **inbox})
    masked, replies = {}, {}
    for name, reply in context.transport.fit(masked_fit, deadline).items():
        problem = (
            reply if isinstance(reply, str) else _masked_problem(reply, context.numel, context.declared_examples[name])
        )
        if problem:
            dropped[name] = problem
        else:
            masked[index[name]] = reply.delta
            replies[name] = reply
    # 4. unmasking shares from the finished clients
    finished = {names[i] for i in masked}
    left = {n for n in shares if n not in finished}
    requests = {
        n: StageIns("secagg_reveal", {"survivors": [index[v] for v in neighbours[n] if v in finished],
                                       "dropped": [index[v] for v in neighbours[n] if v in left]})
        for n in finished
    }  # fmt: skip
    opened = exchange("reveal", requests, lambda name, reply: _revealed_shares(reply, requests[name].config))
    opened = {index[name]: shares_of for name, shares_of in opened.items()}
    try:
        total = secagg.unmask(masked, opened, {index[n] for n in shares})
    except SecAggError as error:  # say who went away and why
        reasons = "; ".join(f"{name}: {reason}" for name, reason in dropped.items())
        raise SecAggError(f"{error}{f' (dropped: {reasons})' if reasons else ''}") from None
    summary = {"clients": len(names), "finished": len(finished), "neighbours": settings.num_neighbours,
               "threshold": settings.threshold}  # fmt: skip
    refused = {n: r for n, r in dropped.items() if n in finished}  # summed, but their shares were not used
    if refused:
        summary["refused_reveals"] = refused
    return total, replies, {n: r for n, r in dropped.items() if n not in finished}, summary


def _public_keys(name: str, reply: StageRes) -> StageRes:
    """A keys reply: exactly a channel and a mask public key, each a valid X25519 key."""
    if set(reply.tensors) != {"channel", "mask"} or reply.meta:
        raise WireError(f"expected public keys 'channel' and 'mask' only, got {sorted(reply.tensors)[:20]}")
    for part in ("channel", "mask"):
        problem = public_key_problem(as_bytes(gate.byte_string(reply.tensors, part, PUBLIC_KEY_BYTES)))
        if problem:
            raise WireError(f"{part} key: {problem}")
    return reply


def _revealed_shares(reply: StageRes, request: dict[str, list[int]]) -> dict[str, dict[int, int]]:
    """A reveal reply as shares by client index: shares of the self-mask seeds of the survivors
    asked for and of the mask keys of the dropped clients asked for, each a field element."""
    if set(reply.meta) != {"self_seed", "mask_key"} or reply.tensors:
        raise WireError(f"expected 'self_seed' and 'mask_key' shares only, got {sorted(reply.meta)[:20]}")
    opened = {}
    for part, asked in (("self_seed", request["survivors"]), ("mask_key", request["dropped"])):
        values = gate.mapping(reply.meta[part], part)
        allowed = {str(u) for u in asked}
        if not set(values) <= allowed:
            raise WireError(f"{part} shares for clients {sorted(set(values) - allowed)[:10]} that were not asked for")
        opened[part] = {int(u): _field_element(value, f"{part}[{u}]") for u, value in values.items()}
    return opened


def _field_element(value: Any, field: str) -> int:
    if not isinstance(value, str) or not value.isdecimal() or len(value) > 160 or not 0 <= int(value) < PRIME:
        raise WireError(f"{field} must be a decimal string of a number below 2^521 - 1, got {value!r:.40}")
    return int(value)


def _masked_problem(reply: FitRes, numel: int, max_examples: int) -> str | None:
    vector = reply.delta
    if not isinstance(vector, torch.Tensor):
        return "masked update must be sent as a plain int64 vector, not compressed"
    if not 1 <= reply.num_examples <= max_examples:
        return f"update reports {reply.num_examples:,} training examples, expected 1 to {max_examples:,}"
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
