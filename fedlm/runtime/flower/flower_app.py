"""The Flower app that `flwr run` ships to the SuperLink: a `pyproject.toml` naming fedlm's
ServerApp and ClientApp, with the fedlm run config carried in Flower's run config.

The app holds no code of its own: both components live in the installed `fedlm` package, which
every SuperLink and SuperNode machine has installed (`pip install fedlm[flower]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlm.config import RunConfig, parse_config
from fedlm.errors import ConfigError

RUN_CONFIG_KEY = "fedlm-config"
RESUME_KEY = "resume"


def config_from_run_config(run_config: dict[str, Any], allowed_plugins: set[str] | None = None) -> RunConfig:
    """The fedlm `RunConfig` a Flower run carries (JSON text under `fedlm-config`). On a SuperNode
    (`allowed_plugins` given) a plug-in the run config lists is imported only when the node's own
    config allows it: whoever submits a run must not choose what code every node imports."""
    text = run_config.get(RUN_CONFIG_KEY)
    if not text:
        raise ConfigError(
            f"the Flower run config has no {RUN_CONFIG_KEY!r}: start deployments with "
            "`fedlm run CONFIG --backend flower`, which sends the config along"
        )
    try:
        data = json.loads(str(text))
    except ValueError as error:
        raise ConfigError(f"Flower run config {RUN_CONFIG_KEY!r} is not JSON: {error}") from None
    plugins = data.get("plugins") if isinstance(data, dict) else None
    refused = [entry for entry in plugins or [] if allowed_plugins is not None and entry not in allowed_plugins]
    if refused:
        raise ConfigError(
            f"the run config lists plugins {refused}, which this SuperNode does not allow; start it with "
            f"--node-config \"plugins='{','.join(map(str, refused))}'\" to import them"
        )
    return parse_config(data, source=f"Flower run config {RUN_CONFIG_KEY!r}")


def write_flower_app(folder: Path, config: RunConfig, resume: bool) -> Path:
    """Write the Flower app folder for one run of `config` (fedlm's components, the config inline)."""
    import fedlm

    folder.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config.model_dump(mode="json"))
    # a JSON string literal is also a valid TOML basic string
    pyproject = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedlm-run"
version = "{fedlm.__version__}"
description = "A fedlm federated fine-tuning run"
license = "Apache-2.0"
dependencies = ["fedlm[flower]=={fedlm.__version__}"]

[tool.flwr.app]
publisher = "fedlm"

[tool.flwr.app.components]
serverapp = "fedlm.runtime.flower.server_app:app"
clientapp = "fedlm.runtime.flower.client_app:app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = {json.dumps(config_json)}
{RESUME_KEY} = {"true" if resume else "false"}
"""
    (folder / "pyproject.toml").write_text(pyproject)
    return folder
