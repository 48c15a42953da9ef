"""Writing files so that neither a crash nor a second run destroys what a user has.

- `write_atomic`, `replace_folder`: a new version of a file or folder appears whole or not at
  all (written beside it, then renamed over it).
- `refuse_existing`, `write_new`: key files are created with O_EXCL and their mode from the start,
  and replaced only when the user asked (`--force`).
- `json_text`: strict JSON, never a bare NaN or Infinity.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from fedlm.errors import ConfigError


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON null). Each object that held
    one, directly or in a list, names those keys under "non_finite", so that a null says why."""
    clean, _ = _finite(value)
    return clean


def _finite(value: Any) -> tuple[Any, bool]:
    """(value cleaned, whether a non-finite float was replaced outside a nested object)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, True
    if isinstance(value, dict):
        clean, flagged = {}, []
        for key, item in value.items():
            clean[key], replaced = _finite(item)
            if replaced:
                flagged.append(str(key))
        if flagged:
            clean["non_finite"] = sorted(set(clean.get("non_finite") or []) | set(flagged))
        return clean, False
    if isinstance(value, (list, tuple)):
        items = [_finite(item) for item in value]
        return [item for item, _ in items], any(replaced for _, replaced in items)
    return value, False


def json_text(value: Any, indent: int | None = None) -> str:
    """`value` as strict JSON: non-finite floats as null, flagged (`finite_json`)."""
    return json.dumps(finite_json(value), indent=indent, allow_nan=False)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it: a crash leaves the previous
    file or the new one, never a part of either."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_folder(temporary: Path, folder: Path) -> None:
    """Rename the finished folder `temporary` over `folder`; in between, the previous one is kept
    as `folder`.old (a crash there leaves it, and `load_checkpoint` looks for it)."""
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)


def refuse_existing(paths: list[Path], force: bool) -> None:
    """Keys are never replaced silently: without `force`, refuse before writing anything."""
    existing = [str(path) for path in paths if os.path.lexists(path)]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exist(s): pass --force to replace the old keys for good")


def write_new(path: Path, data: bytes, mode: int, force: bool = False) -> Path:
    """`data` in a new file at `path` with `mode`, created with O_EXCL (never through an existing
    file or link); with `force` the new file is written beside `path` and renamed over it, so that
    an old file's mode never carries over to a new key."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{path} already exists: pass --force to replace it") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if force:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return path
