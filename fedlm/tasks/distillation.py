"""Models on a public set: a classifier's logits and a decoder's top-k next tokens, and training
either to match the soft labels or soft next-token distributions."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from fedlm.core.distillation import MaskedSoftLabels, distillation_loss, sparse_distillation_loss
from fedlm.tasks.text import IGNORED_TARGET, EncodedDataset, batches, forward_options

TOP_K_TOKENS = "top_k_tokens"  # the extra vector of a decoder's distillation reply: its top-k token ids


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id), to check that decoders share one."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()[:16]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
) -> torch.Tensor:
    """The model's logits on every example of `data`, in order (examples x classes, float32, on CPU)."""
    was_training = model.training
    model.eval()
    outputs = []
    for batch in batches(data, batch_size, pad_id):
        outputs.append(
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            .logits.float()
            .cpu()
        )
    model.train(was_training)
    return torch.cat(outputs)


def distil(
    model: torch.nn.Module,
    data: EncodedDataset,
    soft_labels: torch.Tensor | MaskedSoftLabels,
    temperature: float,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    device: str = "cpu",
    hard_label_weight: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> float:
    """Train `model` on `data` towards `soft_labels` (one distribution per example, or each
    client's over its own labels) with the KD loss at `temperature`, mixed with cross-entropy on
    `data.labels` when `hard_label_weight` > 0 (then every label must be known, >= 0). Returns the
    mean loss of the last epoch."""
    if len(soft_labels) != len(data):
        raise ValueError(f"{len(soft_labels)} soft labels for {len(data)} examples")
    use_labels = hard_label_weight > 0
    if use_labels and min(data.labels) < 0:
        raise ValueError("hard_label_weight > 0 needs a labelled public set")
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.to(device).train()
    loss_sum = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator).tolist()
            loss_sum = 0.0
            for start, batch in zip(range(0, len(order), batch_size), batches(data, batch_size, pad_id, order)):
                rows = order[start : start + batch_size]
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
                loss = distillation_loss(
                    logits,
                    soft_labels[rows].to(device),
                    temperature,
                    batch["labels"].to(device) if use_labels else None,
                    hard_label_weight,
                )
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach()) * len(rows)
    return loss_sum / len(data)


def target_counts(data: EncodedDataset) -> list[int]:
    """How many tokens of each row of `data` a causal LM predicts (targets other than
    IGNORED_TARGET, the first of each row left out: nothing comes before it)."""
    return [sum(1 for target in labels[1:] if target != IGNORED_TARGET) for labels in data.labels]


def target_positions(data: EncodedDataset) -> int:
    """How many tokens of `data` a causal LM predicts, over all its rows."""
    return sum(target_counts(data))


def _next_token_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """A causal LM's logits at every position whose next token is a target, row after row (targets x vocabulary)."""
    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, **forward_options(batch)).logits[:, :-1]
    return logits[batch["labels"][:, 1:].to(device) != IGNORED_TARGET]


@torch.no_grad()
def predict_top_k(
    model: torch.nn.Module,
    data: EncodedDataset,
    k: int,
    temperature: float,
    batch_size: int,
    pad_id: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's `k` most likely next tokens at each target position of `data`, in order:
    their log-probabilities at `temperature` (float32) and their token ids, both positions x k."""
    was_training = model.training
    model.eval()
    values, tokens = [], []
    for batch in batches(data, batch_size, pad_id):
        log_probabilities = torch.log_softmax(_next_token_logits(model, batch, device).float() / temperature, dim=-1)
        top = log_probabilities.topk(k, dim=-1)
        values.append(top.values.cpu())
        tokens.append(top.indices.cpu())
    model.train(was_training)
    return torch.cat(values), torch.cat(tokens)


def distil_tokens(
    model: torch.nn.Module,
    data: EncodedDataset,
    tokens: torch.Tensor,
    probabilities: torch.Tensor,
    temperature: float,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    pad_id: int,
    seed: int,
    device: str = "cpu",
    max_grad_norm: float | None = 1.0,
) -> float:
    """Train a causal LM on `data` towards the sparse next-token distributions (`tokens`,
    `probabilities`: one row per target position of `data`, in order) with the token-level KD
    loss at `temperature`. Returns the mean loss over the last epoch's positions."""
    counts = target_counts(data)
    if tokens.shape[0] != sum(counts):
        raise ValueError(f"{tokens.shape[0]} soft targets for {sum(counts)} target positions")
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.to(device).train()
    loss_sum, positions = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator).tolist()
            loss_sum, positions = 0.0, 0
            for start, batch in zip(range(0, len(order), batch_size), batches(data, batch_size, pad_id, order)):
                rows = [torch.arange(offsets[row], offsets[row + 1]) for row in order[start : start + batch_size]]
                chosen = torch.cat(rows)
                if chosen.numel() == 0:
                    continue
                loss = sparse_distillation_loss(
                    _next_token_logits(model, batch, device), tokens[chosen].to(device),
                    probabilities[chosen].to(device), temperature,
                )  # fmt: skip
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach()) * chosen.numel()
                positions += chosen.numel()
    return loss_sum / max(positions, 1)
