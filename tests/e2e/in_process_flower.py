"""fedlm's Flower ServerApp and ClientApps in one process: a Grid that hands each message to the
ClientApp of the node it is addressed to, as a SuperLink and SuperNodes would.

What crosses the Grid is what crosses the wire: every message's content and every node's state
go through Flower's protobuf serialization (records.py's encoding included), each node keeps its
Flower `Context` (node config, per-run state) between messages, and a ClientApp that raises
becomes a Flower error reply. What it leaves out is processes and sockets: TLS, node
authentication, a node dying, a ServerApp killed mid-run; test_deployment.py runs those on a
real SuperLink and SuperNodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlm.config import load_config
from fedlm.runtime.flower import client_app as fedlm_client_app
from fedlm.runtime.flower import server_app as fedlm_server_app
from fedlm.runtime.flower.flower_app import RESUME_KEY, RUN_CONFIG_KEY
from fedlm.runtime.flower.launch import ALLOW_DATA_CHANGE_KEY, OVERWRITE_KEY, absolute_paths

RUN_ID = 1
FLOWER_ERROR_CODE = 0  # ErrorCode.UNKNOWN: what a SuperNode reports for an exception it caught


def over_the_wire(record: RecordDict) -> RecordDict:
    """`record` as the receiving side sees it: serialized to protobuf bytes and parsed back."""
    proto = recorddict_to_proto(record)
    return recorddict_from_proto(type(proto).FromString(proto.SerializeToString()))


@dataclass
class InProcessNode:
    """One SuperNode: the ClientApp it runs and its Flower context, kept between messages."""

    node_id: int
    node_config: dict[str, Any]
    app: ClientApp = fedlm_client_app.app
    state: RecordDict = field(default_factory=RecordDict)

    def handle(self, message: Message, run_config: dict[str, Any]) -> Message:
        delivered = Message(metadata=deepcopy(message.metadata), content=over_the_wire(message.content))
        context = Context(RUN_ID, self.node_id, dict(self.node_config), over_the_wire(self.state), run_config)
        try:
            reply = self.app(delivered, context)
        except Exception as error:
            return Message(Error(FLOWER_ERROR_CODE, f"{type(error).__name__}: {error}"), reply_to=delivered)
        self.state = over_the_wire(context.state)
        if reply.has_error():
            return reply
        return Message(metadata=reply.metadata, content=over_the_wire(reply.content))


class InProcessGrid(Grid):
    """A Grid over in-process nodes; a pushed message is answered at once (nodes take turns)."""

    def __init__(self, nodes: Iterable[InProcessNode], run_config: dict[str, Any]) -> None:
        self.nodes = {node.node_id: node for node in nodes}
        self.run_config = run_config
        self.replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        raise NotImplementedError("the in-process grid has one run")

    @property
    def run(self) -> Run:
        return Run.create_empty(RUN_ID)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        message_ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = str(uuid4())
            self.replies[message_id] = self.nodes[message.metadata.dst_node_id].handle(message, self.run_config)
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def flower_run_config(config_path: Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The Flower run config `fedlm run CONFIG --backend flower` submits (launch.write_app)."""
    config = absolute_paths(load_config(config_path))
    return {
        RUN_CONFIG_KEY: json.dumps(config.model_dump(mode="json")),
        RESUME_KEY: resume,
        OVERWRITE_KEY: overwrite,
        ALLOW_DATA_CHANGE_KEY: False,
    }


def run_in_process(
    config_path: Path, node_configs: dict[str, dict[str, Any]], apps: dict[str, ClientApp] | None = None
) -> None:
    """Run fedlm's ServerApp for `config_path` over one in-process node per entry of
    `node_configs` (name: node config), each running fedlm's ClientApp or `apps[name]`."""
    run_config = flower_run_config(config_path)
    nodes = [
        InProcessNode(100 + index, node_config, (apps or {}).get(name, fedlm_client_app.app))
        for index, (name, node_config) in enumerate(node_configs.items())
    ]
    # what a ServerApp process learns from the SuperLink, and Flower's messages read
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        server_context = Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), run_config)
        fedlm_server_app.app(InProcessGrid(nodes, run_config), server_context)
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
