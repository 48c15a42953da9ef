"""Predefined partitioning: the data already comes as one file or folder per client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedlm.data.dataset import FILE_SUFFIXES, TextDataset, concatenate
from fedlm.data.partition.base import Partition
from fedlm.errors import DatasetError


def client_sources(sources: list[str] | None, folder: str | None) -> list[Path]:
    """The per-client files: the listed ones, or every data file and saved-dataset folder in `folder`."""
    if (sources is None) == (folder is None):
        raise DatasetError("a predefined partition needs exactly one of 'clients' (a list of files) or 'folder'")
    if sources is not None:
        return [Path(source) for source in sources]
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"predefined partition folder {root} does not exist")
    found = sorted(
        path for path in root.iterdir() if path.suffix.lower() in FILE_SUFFIXES or (path / "dataset_info.json").exists()
    )
    if not found:
        raise DatasetError(
            f"predefined partition folder {root} holds no {', '.join(FILE_SUFFIXES)} files or saved datasets"
        )
    return found


def load_predefined(
    sources: list[Path],
    text_column: str | None,
    label_column: str | None,
    read: Callable[..., TextDataset],
) -> tuple[TextDataset, Partition, list[str]]:
    """All clients' data in one dataset, the index list of each client, and client names (file stems);
    `read` reads each file (a task's `read`: which columns, what a target may be)."""
    parts = [read(path, text_column, label_column, owner=f"client {path.stem}") for path in sources]
    names = [path.stem for path in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"predefined client files must have distinct names; {duplicates} appear more than once")
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + len(part))
    partition = [list(range(start, end)) for start, end in zip(bounds, bounds[1:])]
    return concatenate(parts, source="predefined clients"), partition, names
