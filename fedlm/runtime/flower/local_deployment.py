"""A Flower deployment on this machine: a SuperLink and SuperNodes as real processes on 127.0.0.1.

What the README's three-terminal walkthrough does, as one object, for tests, benchmarks and
trying deployment on a laptop: TLS with a fresh CA, SuperNode authentication with registered
keys, each process in its own process group with its own Flower home and log file, and a
`stop()` that ends every process it started.

    with LocalDeployment(Path("deploy")) as deployment:
        for name in ("a", "b"):
            deployment.start_node(name, {"dataset": f"data/{name}.csv"})
        deployment.run("config.yaml")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedlm.errors import FedlmError
from fedlm.runtime.flower.certs import make_certificates, make_node_keys

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flower_command(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        raise FedlmError(f"the Flower command {name!r} is not installed; pip install 'fedlm[flower]'")
    return path


def node_config_text(node_config: dict[str, Any]) -> str:
    """`--node-config` text: space-separated TOML key=value pairs."""
    parts = []
    for key, value in node_config.items():
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'{key}="{text}"' if isinstance(value, str | Path) else f"{key}={value}")
    return " ".join(parts)


class LocalDeployment:
    """A SuperLink (TLS, SuperNode authentication) and the SuperNodes started with `start_node`."""

    def __init__(self, folder: Path, authenticate_nodes: bool = True) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs = make_certificates(self.folder / "certs", ["127.0.0.1", "localhost"], force=True)
        self.authenticate_nodes = authenticate_nodes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.cli_home = self._home("cli")
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs["ca.crt"].absolute()}"\n'
        )
        self.superlink = self._start(
            "superlink",
            [
                flower_command("flower-superlink"),
                "--ssl-ca-certfile", str(self.certs["ca.crt"]),
                "--ssl-certfile", str(self.certs["server.pem"]),
                "--ssl-keyfile", str(self.certs["server.key"]),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--disable-runtime-dependency-installation",
                *(["--enable-supernode-auth"] if authenticate_nodes else []),
            ],
        )  # fmt: skip
        self._wait_for_port()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _home(self, name: str) -> Path:
        home = self.folder / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def log(self, name: str) -> str:
        """What process `name` ("superlink" or a node's name) has written so far."""
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def _start(self, name: str, command: list[str], home: Path | None = None) -> subprocess.Popen:
        # Flower starts its helper processes (flower-superexec, flwr-serverapp) from PATH;
        # on loopback, its executors may look for new work every 0.1 s instead of every 1 s
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "FLWR_HOME": str(home or self._home(name)), "PATH": path}
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        with (self.folder / f"{name}.log").open("w") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home or self._home(name),
                start_new_session=True,
            )  # fmt: skip
        self.processes[name] = process
        return process

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise FedlmError(f"the SuperLink exited with {self.superlink.returncode}:\n{self.log('superlink')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise FedlmError(f"the SuperLink did not open port {self.port} within {timeout:.0f} s")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the Flower CLI against this SuperLink."""
        env = {**os.environ, "FLWR_HOME": str(self.cli_home)}
        return subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def start_node(
        self, name: str, node_config: dict[str, Any], root_certificates: Path | None = None, register: bool = True
    ) -> subprocess.Popen:
        """Start SuperNode `name` with `node_config` (its dataset, ...), with a fresh key registered
        with the SuperLink first (`register=False`: an unknown key, which the SuperLink refuses)."""
        command = [
            flower_command("flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(root_certificates or self.certs["ca.crt"]),
            "--port", str(free_port()),
            "--node-config", node_config_text(node_config),
        ]  # fmt: skip
        if self.authenticate_nodes:
            keys = make_node_keys(self.folder / "node-keys", name, force=True)
            registered = self.flwr("supernode", "register", str(keys[f"{name}.pub"])) if register else None
            if registered is not None and registered.returncode != 0:
                raise FedlmError(f"cannot register SuperNode {name}: {registered.stdout}{registered.stderr}")
            command += ["--auth-supernode-private-key", str(keys[f"{name}.key"])]
        return self._start(name, command)

    def run(self, config: Path, *options: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`fedlm run CONFIG --backend flower` against this SuperLink, with TLS; waits for the end."""
        return subprocess.run(self.run_command(config, *options), capture_output=True, text=True, timeout=timeout)

    def run_command(self, config: Path, *options: str) -> list[str]:
        return [
            sys.executable, "-m", "fedlm", "run", str(config), "--backend", "flower",
            "--superlink", self.address, "--root-certificates", str(self.certs["ca.crt"]), *options,
        ]  # fmt: skip

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to process `name`'s whole process group (a SuperNode and the apps it started)."""
        process = self.processes[name]
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop(self) -> None:
        """End every process started here: SuperNodes first, then the SuperLink, then what Flower
        started in sessions of its own (the SuperLink's executor and its ServerApps)."""
        names = [name for name in self.processes if name != "superlink"] + ["superlink"]
        for name in names:
            if self.processes[name].poll() is None:
                try:
                    os.killpg(self.processes[name].pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 15
        for name in names:
            try:
                self.processes[name].wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(name)
        while self.stragglers() and time.monotonic() < deadline:  # they exit once their parent is gone
            time.sleep(0.2)
        for pid in self.stragglers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stragglers(self, program: str = "") -> list[int]:
        """Running processes whose command line names this SuperLink's address (and `program`)."""
        proc = Path("/proc")
        if not proc.is_dir():
            return []
        address = self.address.encode()
        pids = []
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(address in argument for argument in arguments) and (
                not program or any(argument.endswith(program.encode()) for argument in arguments)
            ):
                pids.append(int(entry.name))
        return pids
