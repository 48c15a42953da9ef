"""Text for any task: tokenizing with a length cap, and batching with dynamic padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORED_TARGET = -100
"""The target of a token the loss skips (transformers' ignore index): prompts, padding."""


@dataclass
class EncodedDataset:
    """Token ids per example (unpadded) and each example's target: one value (a class id, a
    number, ...) or one per token (a list as long as its ids: next-token targets, tags), batched
    as a tensor of `label_dtype` under the key "labels" (what transformers' heads take)."""

    input_ids: list[list[int]]
    labels: list
    label_dtype: torch.dtype = torch.long

    def __len__(self) -> int:
        return len(self.labels)


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
    longest; per-token targets are padded with IGNORED_TARGET."""
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
        if isinstance(data.labels[chosen[0]], list):
            labels = torch.full((len(chosen), width), IGNORED_TARGET, dtype=data.label_dtype)
            for row, index in enumerate(chosen):
                labels[row, : len(data.labels[index])] = torch.tensor(data.labels[index], dtype=data.label_dtype)
        else:
            labels = torch.tensor([data.labels[i] for i in chosen], dtype=data.label_dtype)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
