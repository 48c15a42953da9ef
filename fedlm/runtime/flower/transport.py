"""The server's side of the Flower runtime: fedlm's round loop reaches SuperNodes through the Grid.

`FlowerTransport` is a `ClientTransport`: it pushes one round's instructions to every named
node at once (they train in parallel), then pulls replies until all are in or the round deadline
passes. A node that raised, went offline or answered with something that is not a valid fedlm
reply gets a reason string instead of a result, and the round loop drops it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedlm.errors import WireError
from fedlm.protocol import (
    TASK_METADATA_KEY,
    ByteCounter,
    ClientInfo,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    StageIns,
    StageRes,
    WireMessage,
)
from fedlm.runtime.flower.records import from_record, record_size, to_record

logger = logging.getLogger("fedlm")

POLL_SECONDS = 0.2
STAGE_MESSAGE = "query.stage"  # the ClientApp's handler for multi-message protocols (secure aggregation)


class FlowerTransport:
    """Reaches each client by name at its SuperNode's node id; `task_metadata` (the federation's
    task metadata as JSON, `Task.metadata_to_json`: classification's label map, key to class id)
    goes with every instruction so that nodes encode targets as the server does."""

    def __init__(
        self, grid: Grid, node_ids: dict[str, int], task_metadata: Any, max_reply_bytes: int | None = None
    ) -> None:
        self.grid = grid
        self.node_ids = node_ids
        self.task_metadata = task_metadata
        self.max_reply_bytes = max_reply_bytes
        self.bytes = ByteCounter()
        self.parallel = True

    def describe(self, name: str) -> str:
        return f"{name} (node {self.node_ids[name]})"

    def fit(self, messages: Mapping[str, FitIns], deadline: float | None) -> dict[str, FitRes | str]:
        return self._exchange("train", messages, FitRes, deadline)

    def evaluate(self, messages: Mapping[str, EvaluateIns], deadline: float | None) -> dict[str, EvaluateRes | str]:
        return self._exchange("evaluate", messages, EvaluateRes, deadline)

    def stage(self, messages: Mapping[str, StageIns], deadline: float | None) -> dict[str, StageRes | str]:
        return self._exchange(STAGE_MESSAGE, messages, StageRes, deadline)

    def _exchange(
        self,
        message_type: str,
        messages: Mapping[str, WireMessage],
        reply_type: type[WireMessage],
        deadline: float | None,
    ) -> dict[str, Any]:
        records: dict[int, RecordDict] = {}  # one record per distinct message
        for ins in messages.values():
            if id(ins) not in records:
                records[id(ins)] = to_record(self._with_metadata(ins))
        by_name = {name: records[id(ins)] for name, ins in messages.items()}
        group = str(next(iter(messages.values())).config.get("round", "")) if messages else ""
        replies, pending = exchange(self.grid, message_type, by_name, self.node_ids, deadline, group)
        for name, record in by_name.items():
            self.bytes.add(name, down=record_size(record))
        answers: dict[str, Any] = {}
        for name in messages:
            reply = replies.get(name)
            answers[name] = pending[name] if reply is None else self._decoded(name, reply, reply_type)
        return answers

    def _decoded(self, name: str, reply: Message, reply_type: type[WireMessage]) -> WireMessage | str:
        """The reply through the validation gate (size first, then `from_record`), or why not."""
        try:
            if reply.has_error():
                return f"Flower error {reply.error.code}: {reply.error.reason}"
            reply_size = record_size(reply.content)
            self.bytes.add(name, up=reply_size)
            if self.max_reply_bytes is not None and reply_size > self.max_reply_bytes:
                return f"reply of {reply_size:,} bytes exceeds the limit of {self.max_reply_bytes:,} bytes"
            return from_record(reply.content, reply_type)
        except WireError as error:
            return str(error)
        except Exception as error:  # a gap in the gate must still not end the run
            return f"undecodable reply: {type(error).__name__}: {error}"

    def _with_metadata(self, ins: WireMessage) -> WireMessage:
        """Instructions carry the federation's task metadata, so that nodes encode targets as the server does."""
        if isinstance(ins, FitIns | EvaluateIns):
            return type(ins)(ins.parameters, {**ins.config, TASK_METADATA_KEY: self.task_metadata}, ins.tensors)
        return ins


def exchange(
    grid: Grid,
    message_type: str,
    records: dict[str, RecordDict],
    node_ids: dict[str, int],
    deadline: float | None,
    group: str = "",
) -> tuple[dict[str, Message], dict[str, str]]:
    """Send each named node its record, wait for replies until `deadline` (None: until all are
    in). Returns the replies by name and, for names without one, why."""
    messages = {name: Message(record, node_ids[name], message_type, group_id=group) for name, record in records.items()}
    sent = dict(zip(grid.push_messages(messages.values()), messages))
    replies: dict[str, Message] = {}
    while len(replies) < len(sent):
        waiting = [message_id for message_id, name in sent.items() if name not in replies]
        for reply in grid.pull_messages(waiting):
            replies[sent[reply.metadata.reply_to_message_id]] = reply
        if len(replies) == len(sent) or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(POLL_SECONDS)
    missing = {name: "timed out: no reply before the round deadline" for name in sent.values() if name not in replies}
    unsent = {
        name: "not sent: the SuperLink did not accept the message" for name in records if name not in sent.values()
    }
    return replies, {**missing, **unsent}


def query_clients(
    grid: Grid, node_ids: list[int], deadline: float | None
) -> tuple[list[tuple[int, ClientInfo]], list[str]]:
    """Ask every node who it is (its client's name, example counts and labels). Returns the
    answers and, for nodes that failed (e.g. a missing dataset), a line naming the node and why."""
    named = {str(node_id): node_id for node_id in node_ids}
    replies, missing = exchange(grid, "query", {key: RecordDict() for key in named}, named, deadline)
    infos, failures = [], [f"node {key}: {reason}" for key, reason in missing.items()]
    for key, reply in replies.items():
        if reply.has_error():
            failures.append(f"node {key}: Flower error {reply.error.code}: {reply.error.reason}")
            continue
        try:
            infos.append((named[key], from_record(reply.content, ClientInfo)))
        except WireError as error:
            failures.append(f"node {key}: {error}")
        except Exception as error:  # a gap in the gate must still not end the run
            failures.append(f"node {key}: undecodable reply: {type(error).__name__}: {error}")
    return infos, failures
