"""Classification models on a public set: their logits, and training them to match soft labels."""

from __future__ import annotations

import torch

from fedlm.core.distillation import distillation_loss
from fedlm.tasks.text import EncodedDataset, batches


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
    soft_labels: torch.Tensor,
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
    """Train `model` on `data` towards `soft_labels` (one distribution per example) with the KD
    loss at `temperature`, mixed with cross-entropy on `data.labels` when `hard_label_weight` > 0
    (then every label must be known, >= 0). Returns the mean loss of the last epoch."""
    if soft_labels.shape[0] != len(data):
        raise ValueError(f"{soft_labels.shape[0]} soft labels for {len(data)} examples")
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
