"""Text classification: tokenizing, batching with dynamic padding, loss and metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedDataset:
    """Token ids per example (unpadded) and class ids."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


CHARS_PER_TOKEN = 64
"""Texts are cut to `max_length * CHARS_PER_TOKEN` characters before tokenizing (see `encode`)."""


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int) -> EncodedDataset:
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
    return EncodedDataset(list(encoded["input_ids"]), list(labels))


def batches(data: EncodedDataset, batch_size: int, pad_id: int, order: list[int] | None = None):
    """Yield dicts of padded tensors (input_ids, attention_mask, labels), padded to the batch's longest."""
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
        labels = torch.tensor([data.labels[i] for i in chosen], dtype=torch.long)
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classification_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy and macro-F1; macro-F1 averages over the classes present in labels or predictions
    (scikit-learn's default), a class with no true or predicted positives scoring 0."""
    if not labels:
        raise ValueError("cannot compute metrics on zero examples")
    correct = sum(p == y for p, y in zip(predictions, labels))
    f1_scores = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
        f1_scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1_scores) / len(f1_scores)}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
) -> dict[str, float]:
    """Mean cross-entropy loss, accuracy and macro-F1 of `model` on `data`."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for batch in batches(data, batch_size, pad_id):
        batch = {key: value.to(device) for key, value in batch.items()}
        output = model(**batch)
        total_loss += float(output.loss) * len(batch["labels"])
        predictions.extend(output.logits.argmax(dim=-1).tolist())
    model.train(was_training)
    return {"loss": total_loss / len(data), **classification_metrics(predictions, data.labels)}
