"""Token classification: a tag per word (named entities, parts of speech), a token-classification
head, entity-level precision, recall and F1 (seqeval) and token accuracy.

Rows are words and their tags: `tokens` and `tags` columns (JSONL, Parquet, a list of dicts; the
tags as strings, or as ids with `task.tag_names`), or a CoNLL file (`.conll`, `.iob`, `.bio`: a
word and its tag per line, the tag last, a blank line between sentences, `-DOCSTART-` lines
ignored). A language written without spaces is tagged by character: each character is a word.

Tags follow BIO (B-TYPE starts an entity, I-TYPE continues it, O is outside) or IOBES (also
E-TYPE ends one, S-TYPE is a single-word entity). A tag of neither form is an error. An entity that
does not begin as its scheme says (I-PER after O, as the first IOB1 files write it) is repaired to
its scheme and counted (`invalid_spans: repair`), or refused with its row (`invalid_spans: error`).

Each word's tag is the target of its first sub-word token; its other sub-word tokens and the
special tokens get -100, which the loss ignores. Words cut off by `max_length` are counted; in
evaluation they are predicted O, so a truncated sentence costs recall rather than shifting tags.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fedlm.data.dataset import TextDataset, read_columns
from fedlm.errors import ConfigError, DatasetError, ModelError
from fedlm.models.loading import load_pretrained
from fedlm.tasks.base import Task
from fedlm.tasks.classification import LabelMap, LabelMapMetadata
from fedlm.tasks.text import IGNORED_TARGET, EncodedDataset, batches

logger = logging.getLogger("fedlm")

CONLL_SUFFIXES = (".conll", ".iob", ".bio")
TAG = re.compile(r"O|([BIES])-(.+)")
OUTSIDE = "O"


@dataclass
class TaggedDataset(EncodedDataset):
    """Encoded sentences, each with the tag ids of its words that `max_length` cut off
    (`cut_tags`, empty when it fits): evaluation predicts them O."""

    cut_tags: list[list[int]] = field(default_factory=list)


def read_conll(path: Path, owner: str) -> dict[str, list]:
    """The sentences of a CoNLL file as `tokens` and `tags` columns."""
    sentences: list[tuple[list[str], list[str]]] = [([], [])]
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if sentences[-1][0]:
                    sentences.append(([], []))
                continue
            if len(fields) < 2:
                raise DatasetError(
                    f"{owner}: {path} line {number} has a word and no tag ({line.strip()!r}); each line of a CoNLL "
                    "file is a word and its tag (the last column), a blank line between sentences"
                )
            sentences[-1][0].append(fields[0])
            sentences[-1][1].append(fields[-1])
    sentences = [sentence for sentence in sentences if sentence[0]]
    return {"tokens": [words for words, _ in sentences], "tags": [tags for _, tags in sentences]}


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The (type, first word, last word) of each entity in `tags`, read leniently as CoNLL's
    evaluation reads them: an I- or E- that does not continue an entity of its type starts one."""
    found: list[list] = []
    open_entity = False
    for index, tag in enumerate(tags):
        if tag == OUTSIDE:
            open_entity = False
            continue
        prefix, kind = tag[0], tag[2:]
        if prefix in "BS" or not open_entity or found[-1][0] != kind:
            found.append([kind, index, index])
        else:
            found[-1][2] = index
        open_entity = prefix in "BI"
    return [(kind, first, last) for kind, first, last in found]


def written(spans: list[tuple[str, int, int]], length: int, scheme: str) -> list[str]:
    """`spans` as the tags of `length` words in `scheme` (BIO or IOBES)."""
    tags = [OUTSIDE] * length
    for kind, first, last in spans:
        for index in range(first, last + 1):
            tags[index] = f"I-{kind}"
        tags[first] = f"B-{kind}"
        if scheme == "IOBES":
            tags[last] = f"E-{kind}" if last > first else f"S-{kind}"
    return tags


def scheme_of(tags: Iterable[str]) -> str:
    return "IOBES" if any(tag[:2] in ("E-", "S-") for tag in tags) else "BIO"


class TokenClassificationTask(LabelMapMetadata, Task):
    """Tagging words (see the module docstring); the metadata is the federation's `LabelMap` of
    tags. `tag_names`: the tag of each id, for data whose tags are ids."""

    kind: ClassVar[str] = "token_classification"
    metrics: ClassVar[tuple[str, ...]] = ("f1", "precision", "recall", "token_accuracy")
    headline: ClassVar[str] = "f1"

    def __init__(
        self,
        tag_names: list[str] | None = None,
        invalid_spans: Literal["repair", "error"] = "repair",
        max_labels: int = 1000,
    ) -> None:
        if importlib.util.find_spec("seqeval") is None:
            raise ConfigError("task token_classification scores entities with seqeval: pip install 'fedlm[ner]'")
        self.tag_names = tag_names
        self.invalid_spans = invalid_spans
        self.max_labels = max_labels

    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        """Texts (the words joined by spaces: fingerprints and partition reports use them) and, as
        targets, (words, tags) pairs with every tag checked and invalid spans repaired or refused."""
        if isinstance(dataset, TextDataset):
            return dataset
        if isinstance(dataset, (str, Path)) and Path(dataset).suffix.lower() in CONLL_SUFFIXES:
            if not Path(dataset).is_file():
                raise DatasetError(f"{owner}: dataset file {dataset} does not exist")
            source, columns = str(dataset), read_conll(Path(dataset), owner)
        else:
            source, columns = read_columns(dataset, owner)
        tag_column = target_column or next((name for name in ("tags", "ner_tags") if name in columns), None)
        words_column = text_column or "tokens"
        if words_column not in columns or tag_column is None:
            raise DatasetError(
                f"{owner}: {source} needs a {words_column!r} column (each row's words) and a 'tags' or 'ner_tags' "
                f"column (one tag per word), or a CoNLL file ({', '.join(CONLL_SUFFIXES)}); its columns are "
                f"{sorted(columns, key=str)}"
            )
        if not columns[words_column]:
            raise DatasetError(f"{owner}: {source} holds no sentences; every client needs at least one")
        texts, targets, repaired = [], [], 0
        for row, (words, tags) in enumerate(zip(columns[words_column], columns[tag_column])):
            where = f"{owner}: {source} row {row}"
            words, tags = self._checked_row(words, tags, where)
            fixed = written(entities(tags), len(tags), scheme_of(tags))
            if fixed != tags:
                if self.invalid_spans == "error":
                    raise DatasetError(
                        f"{where}: tags {tags} hold an entity that does not begin with B- (or S-) as its scheme "
                        f"says; as written: {fixed}. Fix the data or set task.invalid_spans: repair"
                    )
                repaired += 1
            texts.append(" ".join(words))
            targets.append((words, fixed))
        if repaired:
            logger.warning(
                "%s: %d of %d sentences in %s had entities that did not begin with B- (or S-); repaired as CoNLL's "
                "evaluation reads them (an I- after O starts an entity)", owner, repaired, len(targets), source,
            )  # fmt: skip
        others = {name: values for name, values in columns.items() if name not in (words_column, tag_column)}
        return TextDataset(texts, targets, source, others)

    def _checked_row(self, words: Any, tags: Any, where: str) -> tuple[list[str], list[str]]:
        if not isinstance(words, list) or not words or not all(isinstance(word, str) and word for word in words):
            raise DatasetError(f"{where}: tokens must be a non-empty list of non-empty strings, got {words!r:.60}")
        if not isinstance(tags, list) or len(tags) != len(words):
            count = len(tags) if isinstance(tags, list) else "no list of"
            raise DatasetError(f"{where}: {len(words)} words and {count} tags; give one tag per word")
        if all(isinstance(tag, int) and not isinstance(tag, bool) for tag in tags):
            if self.tag_names is None:
                raise DatasetError(f"{where}: the tags are ids; give task.tag_names, the tag of each id")
            if not all(0 <= tag < len(self.tag_names) for tag in tags):
                raise DatasetError(f"{where}: tag ids {tags} go beyond task.tag_names ({len(self.tag_names)} tags)")
            tags = [self.tag_names[tag] for tag in tags]
        for tag in tags:
            if not (isinstance(tag, str) and TAG.fullmatch(tag)):
                raise DatasetError(
                    f"{where}: tag {tag!r} is neither O nor B-, I-, E- or S- and an entity type (BIO or IOBES)"
                )
        return list(words), list(tags)

    def target_keys(self, targets: list[Any]) -> list[str]:
        return sorted({tag for _, tags in targets for tag in tags})

    def metadata(self, target_keys: Iterable[str]) -> LabelMap:
        keys = sorted(set(target_keys) | {OUTSIDE})  # predictions need O even where no client has it
        if len(keys) > self.max_labels:
            raise DatasetError(
                f"the clients' data hold {len(keys)} distinct tags (such as {keys[:3]}), more than data.max_labels="
                f"{self.max_labels}; check the tag column"
            )
        return LabelMap({key: index for index, key in enumerate(keys)})

    def metadata_from_model(self, model: torch.nn.Module) -> LabelMap | None:
        configured = getattr(model.config, "label2id", None) or {}
        if configured and all(TAG.fullmatch(str(key)) for key in configured):
            return LabelMap({str(key): int(value) for key, value in configured.items()})
        return None

    def encode_targets(self, metadata: LabelMap, targets: list[Any], owner: str) -> list[Any]:
        return [(words, metadata.encode(tags, owner)) for words, tags in targets]

    def encode(
        self, tokenizer: Any, texts: list[str], targets: list[Any], max_length: int, owner: str = "dataset"
    ) -> TaggedDataset:
        """Each sentence's sub-word token ids, its first sub-word token of each word labelled with
        the word's tag id; the tags of the words `max_length` cuts off kept aside (and counted)."""
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(f"{owner}: task token_classification needs a fast tokenizer (word ids of each token)")
        encoded = tokenizer([words for words, _ in targets], is_split_into_words=True, truncation=True,
                            max_length=max_length)  # fmt: skip
        input_ids, labels, cut, truncated = [], [], [], 0
        for row, (_, tag_ids) in enumerate(targets):
            word_ids = encoded.word_ids(row)
            row_labels, seen = [], set()
            for word in word_ids:
                row_labels.append(IGNORED_TARGET if word is None or word in seen else tag_ids[word])
                if word is not None:
                    seen.add(word)
            kept = max(seen) + 1 if seen else 0
            input_ids.append(list(encoded["input_ids"][row]))
            labels.append(row_labels)
            cut.append(tag_ids[kept:])
            truncated += kept < len(tag_ids)
        notes = [
            f"{owner}: {truncated} of {len(targets)} sentences are longer than training.max_length={max_length} "
            "tokens: their last words are not trained on and count as predicted O in evaluation (raise max_length "
            "to keep them)"
        ] if truncated else []  # fmt: skip
        return TaggedDataset(input_ids, labels, torch.long, notes=notes, cut_tags=cut)

    def load_model(self, name_or_path: str, metadata: LabelMap, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        return load_pretrained(
            AutoModelForTokenClassification, name_or_path, seed, num_labels=metadata.num_labels,
            id2label=metadata.id2label, label2id=dict(metadata.label2id),
        )  # fmt: skip

    def check_model(self, model: torch.nn.Module, metadata: LabelMap, owner: str) -> None:
        """A token classifier with a class for every tag; the tag names go into its config, where
        evaluation reads them (a model given with transformers' LABEL_0, ... names gets them too)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not type(base).__name__.endswith("ForTokenClassification"):
            raise ModelError(
                f"{owner}: task token_classification needs a token-classification model (a tag per token, such as "
                f"AutoModelForTokenClassification), got {type(base).__name__}"
            )
        metadata.check_fits(model.config.num_labels, owner)
        self.annotate_model(model, metadata)

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        """The loss (mean over all labelled tokens), entity-level micro precision, recall and F1 and
        each entity type's F1 (`f1_<TYPE>`), and the share of words tagged right."""
        id2tag = model.config.id2label
        was_training = model.training
        model.eval()
        total_loss, tokens, truth, predicted = 0.0, 0, [], []
        for batch in batches(data, batch_size, pad_id):
            batch = {key: value.to(device) for key, value in batch.items()}
            output = model(**batch)
            labelled = batch["labels"] != IGNORED_TARGET
            count = int(labelled.sum())
            total_loss += float(output.loss) * count
            tokens += count
            guesses = output.logits.argmax(dim=-1)
            for row in range(len(labelled)):
                truth.append([id2tag[int(tag)] for tag in batch["labels"][row][labelled[row]]])
                predicted.append([id2tag[int(tag)] for tag in guesses[row][labelled[row]]])
        model.train(was_training)
        cut = data.cut_tags if isinstance(data, TaggedDataset) else [[] for _ in truth]
        for row, tags in enumerate(cut):
            truth[row] += [id2tag[tag] for tag in tags]
            predicted[row] += [OUTSIDE] * len(tags)
        return {"loss": total_loss / max(tokens, 1), **entity_scores(truth, predicted)}


def entity_scores(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """seqeval's micro precision, recall and F1 over exact entity spans (CoNLL's evaluation),
    each type's F1 as f1_<TYPE>, and the share of words whose tag is right."""
    from seqeval.metrics import classification_report

    words = sum(len(tags) for tags in truth)
    correct = sum(t == p for row, guesses in zip(truth, predicted) for t, p in zip(row, guesses))
    with warnings.catch_warnings():  # a type never predicted has precision 0, which seqeval warns about
        warnings.simplefilter("ignore")
        report = classification_report(truth, predicted, output_dict=True, zero_division=0)
    micro = report.pop("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    scores = {
        "f1": float(micro["f1-score"]),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "token_accuracy": correct / max(words, 1),
    }
    for kind, values in sorted(report.items()):
        if not kind.endswith(" avg"):
            scores[f"f1_{kind}"] = float(values["f1-score"])
    return scores
