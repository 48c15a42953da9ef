"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

A checkpoint folder holds the global parameters (and distillation's last soft labels), the
strategy state and the clients' own state (SCAFFOLD variates, error-feedback residuals and
distillation clients' models, which live on the server in a simulation) as safetensors, and the round,
the metric records and the config as JSON. It is written to a temporary folder that is then
renamed over the previous checkpoint, so a crash leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedlm.client import FedClient
from fedlm.errors import ConfigError
from fedlm.server import FedServer

CHECKPOINT_VERSION = 1
# Config fields a resumed run may change: where it writes, how long it runs, how it waits for nodes,
# and the privacy budget it may spend (epsilon is accounted across the resume either way).
RESUMABLE_CHANGES = ("output_dir", "federation.rounds", "federation.checkpoint_every", "deployment", "dp.max_epsilon")


def save_checkpoint(server: FedServer, folder: Path, records: list[dict[str, Any]], config: dict[str, Any]) -> None:
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    previous = folder.with_name(folder.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    global_state = {"parameters": server.global_params.contiguous()}
    if server.distillation is not None and server.distillation.soft_labels is not None:
        global_state["soft_labels"] = server.distillation.soft_labels.contiguous()  # for the clients' digest step
    save_file(global_state, temporary / "global.safetensors")
    save_file({k: v.contiguous() for k, v in server.strategy.state_dict().items()}, temporary / "strategy.safetensors")
    client_state = {
        f"{client.name}/{key}": getattr(client, key).contiguous()
        for client in server.clients
        for key in FedClient.STATE
        if getattr(client, key, None) is not None  # remote clients keep theirs
    }
    save_file(client_state, temporary / "clients.safetensors")
    state = {
        "version": CHECKPOINT_VERSION,
        "round": server.round,
        "strategy": type(server.strategy).__name__,
        "num_parameters": server.spec.numel,
        "clients": [client.name for client in server.clients],
        "config": config,
        "records": records,
        "history": server.history,
        "privacy": None if server.privacy is None else server.privacy.accountant.state(),
    }
    (temporary / "state.json").write_text(json.dumps(state))
    _fsync_folder(temporary)
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(server: FedServer, folder: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Restore `server` from `folder` and return the metric records written so far."""
    folder = Path(folder)
    if not (folder / "state.json").exists() and (folder.with_name(folder.name + ".old") / "state.json").exists():
        folder = folder.with_name(folder.name + ".old")  # interrupted between the two renames
    if not (folder / "state.json").exists():
        raise ConfigError(f"cannot resume: no checkpoint in {folder} (run without --resume to start afresh)")
    try:
        state = json.loads((folder / "state.json").read_text())
        global_state = load_file(folder / "global.safetensors")
        global_params = global_state["parameters"]
        strategy_state = load_file(folder / "strategy.safetensors")
        client_state = load_file(folder / "clients.safetensors")
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ConfigError(f"cannot resume: checkpoint {folder} is corrupt ({error})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"cannot resume: checkpoint {folder} has format version {state.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    differences = config_differences(state["config"], config)
    if differences:
        raise ConfigError(
            f"cannot resume: {folder} was written by a different config ({'; '.join(differences)}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    if state["num_parameters"] != server.spec.numel or global_params.numel() != server.spec.numel:
        raise ConfigError(
            f"cannot resume: checkpoint {folder} holds {global_params.numel()} parameters, the model has {server.spec.numel}"
        )
    if state["clients"] != [client.name for client in server.clients]:
        raise ConfigError(f"cannot resume: checkpoint {folder} was made for other clients")
    server.global_params = global_params
    if server.distillation is not None:
        server.distillation.soft_labels = global_state.get("soft_labels")
    try:
        server.strategy.load_state_dict(strategy_state)
    except ValueError as error:
        raise ConfigError(f"cannot resume: checkpoint {folder}: {error}") from None
    for client in server.clients:
        if isinstance(client, FedClient):  # remote clients keep their own state
            for key in FedClient.STATE:
                setattr(client, key, client_state.get(f"{client.name}/{key}"))
    if server.privacy is not None and state.get("privacy") is not None:
        server.privacy.accountant.load_state(state["privacy"])
    server.round = state["round"]
    server.history = state["history"]
    return state["records"]


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields that differ, ignoring RESUMABLE_CHANGES."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES:
            continue
        before, after = saved.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += config_differences(before, after, prefix=f"{name}.")
        elif before != after:
            differences.append(f"{name}: {before!r} then, {after!r} now")
    return differences


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
