"""Text for any task: tokenizing with a length cap, and batching with dynamic padding."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("fedlm")

IGNORED_TARGET = -100
"""The target of a token the loss skips (transformers' ignore index): prompts, padding."""


@dataclass
class EncodedDataset:
    """Token ids per example (unpadded) and each example's target: one value (a class id, a
    number, ...) or one per token (a list as long as its ids: next-token targets, tags), batched
    as a tensor of `label_dtype` under the key "labels" (what transformers' heads take).
    `skipped`: how many rows were left out because no target fits in the maximum length.
    `segments`: for packed rows (several examples in one sequence, `pack`), each row's example
    lengths; None when every row is one example. `notes`: what the task had to cut at the maximum
    length, for whoever encoded it to log once (a client once per split, not every round)."""

    input_ids: list[list[int]]
    labels: list
    label_dtype: torch.dtype = torch.long
    skipped: int = 0
    segments: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_examples(self) -> int:
        """The examples the rows hold (more than the rows when packed)."""
        return len(self) if self.segments is None else sum(len(lengths) for lengths in self.segments)


def pack(data: EncodedDataset, max_length: int) -> EncodedDataset:
    """Examples with per-token targets packed, in order, into rows of at most `max_length` tokens
    (a row takes the next example while it fits). Each example's first token gets no target: in a
    packed row it would be predicted from the previous example's last token. `batches` gives each
    example its own position ids, from which transformers masks attention between examples."""
    rows: list[list[int]] = []
    targets: list[list[int]] = []
    segments: list[list[int]] = []
    for ids, labels in zip(data.input_ids, data.labels):
        if not rows or len(rows[-1]) + len(ids) > max_length:
            rows.append([])
            targets.append([])
            segments.append([])
        rows[-1] += ids
        targets[-1] += [IGNORED_TARGET, *labels[1:]]
        segments[-1].append(len(ids))
    return EncodedDataset(rows, targets, data.label_dtype, data.skipped, segments)


def forward_options(batch: dict[str, torch.Tensor]) -> dict[str, bool]:
    """What a model's forward pass needs besides the batch: no KV cache for packed rows, since
    transformers isolates packed examples (by their position ids) only when it builds no cache."""
    return {"use_cache": False} if "position_ids" in batch else {}


def length_grouped(order: list[int], lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """`order` regrouped so that each run of `batch_size` holds examples of similar lengths (less
    padding): windows of 50 batches sorted by length, cut into batches, the batches shuffled."""
    window = 50 * batch_size
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda index: -lengths[index])
        grouped += [chunk[at : at + batch_size] for at in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(grouped), generator=generator).tolist()
    return [index for position in shuffled for index in grouped[position]]


def report_encoding(data: EncodedDataset, rows: int, owner: str, max_length: int) -> None:
    """Log, naming `owner`, how many of its `rows` encoding skipped (`EncodedDataset.skipped`),
    and what it cut (`EncodedDataset.notes`)."""
    if data.skipped:
        logger.warning(
            "%s: %d of %d examples skipped: none of their target tokens fits in training.max_length=%d tokens "
            "(raise it to keep them)", owner, data.skipped, rows, max_length,
        )  # fmt: skip
    for note in data.notes:
        logger.warning("%s", note)


CHARS_PER_TOKEN = 64
"""Texts are cut to `max_length * CHARS_PER_TOKEN` characters before tokenizing (see `encode`)."""


def encode(
    tokenizer, texts: list[str], labels: list, max_length: int, label_dtype: torch.dtype = torch.long
) -> EncodedDataset:
    """Token ids of `texts`, truncated to `max_length` tokens (special tokens included).

    Each text is first cut to `max_length * CHARS_PER_TOKEN` characters: a tokenizer builds every token
    of its input before it truncates, so one 50 MB row would take gigabytes. The cut leaves the first
    `max_length` tokens as they were: WordPiece, BPE and SentencePiece tokens each cover part of one word
    (English text averages about 4 characters a token, and vocabularies' longest tokens about 20), and a
    cut changes only the tokens of the word it splits. Those tokens come after the first `max_length`
    unless these average over 64 characters each, which takes runs of hundreds of spaces or control
    characters, or a word per token longer than WordPiece's 100-character limit (each one an [UNK]).
    """
    cap = max_length * CHARS_PER_TOKEN
    encoded = tokenizer([text[:cap] for text in texts], truncation=True, max_length=max_length)
    return EncodedDataset(list(encoded["input_ids"]), list(labels), label_dtype)


def batches(data: EncodedDataset, batch_size: int, pad_id: int, order: list[int] | None = None):
    """Yield dicts of padded tensors (input_ids, attention_mask, labels), padded to the batch's
    longest; per-token targets (as many as the ids, or for a decoder's targets their own number)
    are padded with IGNORED_TARGET. Packed rows come with position_ids
    (counting from 0 in each example and in the padding) instead of an attention mask."""
    order = list(range(len(data))) if order is None else order
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(data.input_ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            ids = data.input_ids[index]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        if isinstance(data.labels[chosen[0]], list):  # as long as the ids, or (seq2seq) their own lengths
            target_width = max(len(data.labels[i]) for i in chosen)
            labels = torch.full((len(chosen), target_width), IGNORED_TARGET, dtype=data.label_dtype)
            for row, index in enumerate(chosen):
                labels[row, : len(data.labels[index])] = torch.tensor(data.labels[index], dtype=data.label_dtype)
        else:
            labels = torch.tensor([data.labels[i] for i in chosen], dtype=data.label_dtype)
        if data.segments is None:
            yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            continue
        positions = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            lengths = [*data.segments[index], width - len(data.input_ids[index])]
            positions[row] = torch.cat([torch.arange(length) for length in lengths])
        yield {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    """`count` (at most `size`) distinct positions of `size` rows drawn with `seed`, in order: a
    task's fixed sample prompts."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: min(count, size)].tolist())


def check_rouge_installed(what: str) -> None:
    """A ConfigError naming `what` (the option that scores samples) unless rouge-score is installed."""
    import importlib.util

    from fedlm.errors import ConfigError

    if importlib.util.find_spec("rouge_score") is None:
        raise ConfigError(
            f"{what} scores the samples with ROUGE-L (rouge-score, not installed): pip install 'fedlm[rouge]'"
        )


def rouge_l_scores(prompts: list[dict], responses: list[str]) -> list[dict[str, float]]:
    """Each response's ROUGE-L F-measure against its prompt's "reference" (Google's rouge-score:
    lowercased alphanumeric words, no stemming; 0 for an empty response)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    return [
        {"rouge_l": scorer.score(prompt["reference"], response)["rougeL"].fmeasure}
        for prompt, response in zip(prompts, responses)
    ]
