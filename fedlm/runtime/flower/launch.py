"""Submitting a fedlm run to a SuperLink: what `fedlm run CONFIG --backend flower` does.

It writes the Flower app for the config (`write_flower_app`) and a private Flower CLI home whose
`config.toml` names the SuperLink connection, then runs `flwr run APP fedlm --stream`, so the
ServerApp's log streams to this terminal and the exit status is the run's. The run folder rules
(`check_run_folder`) are checked here first, for a SuperLink on this machine (same files), and
again by the ServerApp, which is where the folder is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from fedlm.config import RunConfig
from fedlm.errors import ConfigError
from fedlm.runtime.flower.flower_app import write_flower_app
from fedlm.runtime.rounds import check_run_folder

CONNECTION = "fedlm"
# Flower run config keys of `fedlm run`'s --overwrite and --allow-data-change (read by the ServerApp)
OVERWRITE_KEY = "overwrite"
ALLOW_DATA_CHANGE_KEY = "allow-data-change"
APP_CONFIG_TABLE = "[tool.flwr.app.config]\n"


def absolute_paths(config: RunConfig) -> RunConfig:
    """The config with local relative paths made absolute: the ServerApp runs in another folder
    (on a SuperLink of the same machine, the same files; on another machine, write absolute paths)."""
    data = config.data
    updates = {"output_dir": config.output_dir.absolute()}
    if data.validation_file is not None and Path(data.validation_file).exists():
        updates["data"] = data.model_copy(update={"validation_file": str(Path(data.validation_file).absolute())})
    if Path(config.model.name).exists():
        updates["model"] = config.model.model_copy(update={"name": str(Path(config.model.name).absolute())})
    algorithm = config.algorithm
    if algorithm is not None:
        changes = {}
        if algorithm.public_data.dataset and Path(algorithm.public_data.dataset).exists():
            path = str(Path(algorithm.public_data.dataset).absolute())
            changes["public_data"] = algorithm.public_data.model_copy(update={"dataset": path})
        if getattr(algorithm, "student", None) and Path(algorithm.student).exists():
            changes["student"] = str(Path(algorithm.student).absolute())
        updates["algorithm"] = algorithm.model_copy(update=changes)
    return config.model_copy(update=updates)


def launch_flower_run(
    config: RunConfig,
    superlink: str,
    root_certificates: Path | None,
    insecure: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    allow_data_change: bool = False,
) -> int:
    """Submit `config` as a run to the SuperLink's control API at `superlink` (HOST:PORT) and stream
    its log; returns `flwr run`'s exit status. `resume`, `overwrite` and `allow_data_change` are
    `fedlm run`'s flags, passed on to the ServerApp."""
    if (root_certificates is None) == (not insecure):
        raise ConfigError(
            "give --root-certificates CA.crt (TLS, the SuperLink's CA) or --insecure (plain text, a laptop only)"
        )
    if root_certificates is not None and not root_certificates.is_file():
        raise ConfigError(f"--root-certificates {root_certificates} does not exist")
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if flwr is None:
        raise ConfigError("the Flower CLI `flwr` is not installed; pip install 'fedlm[flower]'")
    config = absolute_paths(config)
    check_run_folder(config, resume, overwrite, allow_data_change)  # before any node is asked to work
    check_superlink(superlink, root_certificates)
    with tempfile.TemporaryDirectory(prefix="fedlm-flower-") as folder:
        app = write_app(Path(folder) / "app", config, resume, overwrite, allow_data_change)
        home = Path(folder) / "flwr-home"
        home.mkdir()
        connection = {"address": superlink}
        if insecure:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(root_certificates.absolute())
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in connection.items()]
        (home / "config.toml").write_text("\n".join(lines) + "\n")
        env = {**os.environ, "FLWR_HOME": str(home)}
        run_id = _stream_run(flwr, app, env)
        if run_id is None:
            return 1
        return _run_status(flwr, run_id, env)


def write_app(folder: Path, config: RunConfig, resume: bool, overwrite: bool, allow_data_change: bool) -> Path:
    """The Flower app for the run (`write_flower_app`), with --overwrite and --allow-data-change
    added to its run config (Flower accepts only the keys an app declares)."""
    app = write_flower_app(folder, config, resume)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    if APP_CONFIG_TABLE not in text:
        raise ConfigError(f"{pyproject} has no {APP_CONFIG_TABLE.strip()} table to pass --overwrite in")
    flags = f"{OVERWRITE_KEY} = {json.dumps(overwrite)}\n{ALLOW_DATA_CHANGE_KEY} = {json.dumps(allow_data_change)}\n"
    pyproject.write_text(text.replace(APP_CONFIG_TABLE, APP_CONFIG_TABLE + flags, 1))
    return app


def check_superlink(address: str, root_certificates: Path | None, timeout: float = 10.0) -> None:
    """Reach the SuperLink and, with TLS, verify its certificate against `root_certificates`, so
    that a wrong address or CA fails here with a message that says which (Flower's CLI reports
    both as an unavailable connection)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--superlink must be HOST:PORT, got {address!r}")
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as error:
        raise ConfigError(
            f"cannot reach the SuperLink at {address}: {error.strerror or error}; is flower-superlink running "
            "there, and is --superlink its --host:--port?"
        ) from None
    with connection:
        if root_certificates is None:
            return
        context = ssl.create_default_context(cafile=str(root_certificates))
        try:
            context.wrap_socket(connection, server_hostname=host.strip("[]")).close()
        except ssl.SSLCertVerificationError as error:
            raise ConfigError(
                f"TLS: the SuperLink at {address} presented a certificate that {root_certificates} does not "
                f"verify ({error.verify_message}); pass the CA certificate that signed the SuperLink's "
                "--ssl-certfile as --root-certificates"
            ) from None
        except ssl.SSLError as error:
            raise ConfigError(
                f"TLS handshake with the SuperLink at {address} failed ({error}); is it running with TLS "
                "(--ssl-certfile), or without (then use --insecure, on a laptop only)?"
            ) from None


def _stream_run(flwr: str, app: Path, env: dict[str, str]) -> str | None:
    """Start the run and echo its log until it ends; returns the run id (None if it did not start)."""
    process = subprocess.Popen(
        [flwr, "run", str(app), CONNECTION, "--stream"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_id = None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        match = re.search(r"started run (\d+)", line)
        if match and run_id is None:
            run_id = match.group(1)
    process.wait()
    return run_id


def _run_status(flwr: str, run_id: str, env: dict[str, str]) -> int:
    """0 when the run finished successfully, else 1 with the SuperLink's account of why.
    (`flwr run --stream` exits 0 even when the ServerApp fails, so ask the SuperLink.)"""
    listing = subprocess.run(
        [flwr, "list", "--run-id", run_id, "--format", "json"], env=env, capture_output=True, text=True
    )
    try:
        run = json.loads(listing.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        print(f"fedlm: cannot read the status of run {run_id}: {listing.stdout}{listing.stderr}", file=sys.stderr)
        return 1
    if run.get("status") == "finished:completed":
        return 0
    print(f"fedlm: run {run_id} ended with status {run.get('status')}: {run.get('status-details')}", file=sys.stderr)
    return 1
