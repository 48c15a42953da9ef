"""Checkpoints: everything a run needs to continue bit for bit, written atomically and checked on load.

A checkpoint folder holds the global parameters (and distillation's last soft labels), the
strategy state and the clients' own state (SCAFFOLD variates, error-feedback residuals and
distillation clients' models, which live on the server in a simulation) as safetensors, and the round,
the metric records, the config, each file's sha256 and a fingerprint of each client's data as JSON.
It is written to a temporary folder that is then renamed over the previous checkpoint, so a crash
leaves the previous one intact. Loading refuses a checkpoint whose state.json is malformed, whose
files do not match their checksums, whose tensors hold NaN or infinity, or whose clients' data has
changed since (unless the caller allows it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedlm.client import FedClient
from fedlm.errors import ConfigError
from fedlm.files import json_text, replace_folder
from fedlm.server import FedServer

logger = logging.getLogger("fedlm")

CHECKPOINT_VERSION = 2  # 2: file checksums and client data fingerprints
# Config fields a resumed run may change: where it writes, how long it runs, how it waits for nodes,
# and the privacy budget it may spend (epsilon is accounted across the resume either way).
# config fields added after checkpoints were first written, with their defaults: a checkpoint
# without one was written with the default
ADDED_LATER = {
    "training.lr_schedule": "constant", "training.min_learning_rate": 0.0, "training.group_by_length": False,
    "training.gradient_checkpointing": False, "training.mixed_precision": "no",
    "federation.max_total_bytes": None, "algorithm.top_k": 16, "task.rouge_l": False,
    "model.quantization": "none",
}  # fmt: skip
RESUMABLE_CHANGES = (
    "output_dir", "federation.rounds", "federation.checkpoint_every", "federation.max_total_bytes", "deployment",
    "dp.max_epsilon",
)  # fmt: skip
TENSOR_FILES = ("global.safetensors", "strategy.safetensors", "clients.safetensors")
# what state.json must hold, and of which JSON type
STATE_FIELDS: dict[str, type] = {
    "round": int, "strategy": str, "num_parameters": int, "clients": list, "config": dict,
    "records": list, "history": list, "files": dict, "data": dict,
}  # fmt: skip
TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


# ---- writing run outputs ---------------------------------------------------------------------


# ---- checkpoints -----------------------------------------------------------------------------


def data_fingerprints(server: FedServer) -> dict[str, dict[str, Any] | None]:
    """Each client's data fingerprint by name (`FedClient.data_fingerprint`; a remote client's is
    what it reported in its `ClientInfo`, None when it reported none)."""
    return {
        client.name: client.data_fingerprint() if isinstance(client, FedClient) else client.data_fingerprint
        for client in server.clients
    }


def save_checkpoint(
    server: FedServer,
    folder: Path,
    records: list[dict[str, Any]],
    config: dict[str, Any],
    data: dict[str, dict[str, Any] | None] | None = None,
) -> None:
    """Write the server's state to `folder` (atomically). `data`: the clients' data fingerprints
    (`data_fingerprints(server)`, computed when not given)."""
    folder = Path(folder)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    server_state = server.state_dict()
    # the global parameters and the algorithm's own state (distillation's last soft labels) share a file
    tensors = {**server_state, "global": {**server_state["global"], **server_state["algorithm"]}}
    for name in TENSOR_FILES:
        part = tensors[name.removesuffix(".safetensors")]
        save_file({key: value.contiguous() for key, value in part.items()}, temporary / name)
    state = {
        "version": CHECKPOINT_VERSION,
        "round": server_state["round"],
        "strategy": type(server.strategy).__name__,
        "num_parameters": server.global_model.spec.numel,
        "clients": [client.name for client in server.clients],
        "config": config,
        "records": records,
        "history": server_state["history"],
        "privacy": server_state["privacy"],
        "files": {name: _sha256(temporary / name) for name in TENSOR_FILES},
        "data": data_fingerprints(server) if data is None else data,
    }
    (temporary / "state.json").write_text(json_text(state))
    _fsync_folder(temporary)
    replace_folder(temporary, folder)


def load_checkpoint(
    server: FedServer,
    folder: Path,
    config: dict[str, Any],
    data: dict[str, dict[str, Any] | None] | None = None,
    allow_data_change: bool = False,
) -> list[dict[str, Any]]:
    """Restore `server` from `folder` and return the metric records written so far.

    Refuses (ConfigError) a missing checkpoint, a malformed state.json, a file that does not match
    its checksum, non-finite tensors, another config, model or client list, and, unless
    `allow_data_change`, clients whose data differs from the checkpoint's fingerprints (`data`:
    the current ones, computed when not given)."""
    folder = Path(folder)
    if not (folder / "state.json").exists() and (folder.with_name(folder.name + ".old") / "state.json").exists():
        folder = folder.with_name(folder.name + ".old")  # interrupted between the two renames
    if not (folder / "state.json").exists():
        raise ConfigError(f"cannot resume: no checkpoint in {folder} (run without --resume to start afresh)")
    state = _read_state(folder)
    tensors = {}
    for name in TENSOR_FILES:
        path = folder / name
        try:
            if _sha256(path) != state["files"].get(name):
                raise ConfigError(
                    f"cannot resume: checkpoint {folder} is corrupt: {name} does not match its sha256 in state.json "
                    "(the file was changed or damaged); restore the checkpoint, or start afresh with --overwrite"
                )
            tensors[name] = load_file(path)
        except (OSError, SafetensorError) as error:
            raise ConfigError(f"cannot resume: checkpoint {folder} is corrupt ({error})") from None
    _check_finite(tensors, folder)
    global_state, strategy_state, client_state = (tensors[name] for name in TENSOR_FILES)
    differences = config_differences(state["config"], config)
    if differences:
        raise ConfigError(
            f"cannot resume: {folder} was written by a different config ({'; '.join(differences)}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    if state["num_parameters"] != server.global_model.spec.numel:
        raise ConfigError(
            f"cannot resume: checkpoint {folder} holds {state['num_parameters']} parameters, "
            f"the model has {server.global_model.spec.numel}"
        )
    if state["clients"] != [client.name for client in server.clients]:
        raise ConfigError(f"cannot resume: checkpoint {folder} was made for other clients")
    changed = data_changes(state["data"], data_fingerprints(server) if data is None else data)
    if changed and not allow_data_change:
        raise ConfigError(
            f"cannot resume: the data of {'; '.join(changed)} is not what checkpoint {folder} was trained on; "
            "restore it, or pass --allow-data-change (with --resume) to continue on the new data"
        )
    if changed:
        logger.warning("resuming on changed data (--allow-data-change): %s", "; ".join(changed))
    parameters = {"parameters": global_state.pop("parameters")} if "parameters" in global_state else {}
    server_state = {
        "global": parameters,
        "algorithm": global_state,
        "strategy": strategy_state,
        "clients": client_state,
    }
    try:
        server.load_state_dict({**server_state, **{key: state.get(key) for key in ("round", "history", "privacy")}})
    except ValueError as error:
        raise ConfigError(f"cannot resume: checkpoint {folder}: {error}") from None
    return state["records"]


def _read_state(folder: Path) -> dict[str, Any]:
    """state.json, checked to hold every field with its JSON type; a ConfigError naming what is
    wrong otherwise."""
    path = folder / "state.json"
    damaged = "the checkpoint is damaged: restore it, or start afresh with --overwrite"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot resume: checkpoint {folder} is corrupt ({error})") from None
    except ValueError as error:
        raise ConfigError(f"cannot resume: {path} is not JSON ({error}); {damaged}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"cannot resume: {path} holds a JSON {type(state).__name__}, not an object; {damaged}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"cannot resume: checkpoint {folder} has format version {state.get('version')!r}, expected "
            f"{CHECKPOINT_VERSION} (written by another fedlm version); start afresh with --overwrite"
        )
    for key, kind in STATE_FIELDS.items():
        if key not in state:
            raise ConfigError(f"cannot resume: {path} has no {key!r}; {damaged}")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(
                f"cannot resume: {path}: {key!r} must be {TYPE_NAMES[kind]}, got {type(value).__name__}; {damaged}"
            )
    checks = {
        "round": state["round"] >= 0,
        "records": all(
            isinstance(record, dict) and isinstance(record.get("round"), int) for record in state["records"]
        ),
        "clients": all(isinstance(name, str) for name in state["clients"]),
        "data": all(isinstance(value, dict) or value is None for value in state["data"].values()),
    }
    hints = {
        "round": "an integer >= 0",
        "records": "a list of objects, each with an integer 'round'",
        "clients": "a list of client names",
        "data": "an object of client name: fingerprint object or null",
    }
    for key, valid in checks.items():
        if not valid:
            raise ConfigError(f"cannot resume: {path}: {key!r} must be {hints[key]}; {damaged}")
    return state


def _check_finite(tensors: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    for file_name, contents in tensors.items():
        for key, tensor in contents.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                count = int((~torch.isfinite(tensor)).sum())
                raise ConfigError(
                    f"cannot resume: checkpoint {folder}: {file_name} {key!r} holds {count} NaN or infinite "
                    "value(s); the run diverged before this checkpoint and cannot continue from it: start afresh "
                    "with --overwrite (a lower learning rate, or max_grad_norm, may keep it finite)"
                )


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each client whose data fingerprint differs from the saved one, with how (a client that
    reported no fingerprint, then or now, cannot be checked and is not listed)."""
    changes = []
    for name, now in current.items():
        then = saved.get(name)
        if then is None or now is None or then == now:
            continue
        counts = [(fingerprint.get("examples"), fingerprint.get("test_examples")) for fingerprint in (then, now)]
        if counts[0] != counts[1]:
            changes.append(
                f"client {name} ({counts[0][0]} training and {counts[0][1]} test examples then, "
                f"{counts[1][0]} and {counts[1][1]} now)"
            )
        else:
            changes.append(f"client {name} (as many examples, but rows or labels changed or reordered)")
    return changes


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields that differ, ignoring RESUMABLE_CHANGES (and ADDED_LATER fields at
    their defaults that the saved config lacks)."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES:
            continue
        if key not in saved and name in ADDED_LATER and current.get(key) == ADDED_LATER[name]:
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


def _sha256(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
