"""Sentence embeddings from a pretrained encoder: the mean of its last hidden states over each
text's tokens, normalised to unit length (as sentence-transformers' all-MiniLM-L6-v2 is used)."""

from __future__ import annotations

import torch

from fedlm.models.loading import load_pretrained, load_tokenizer


@torch.no_grad()
def embed_texts(name_or_path: str, texts: list[str], max_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """One unit-length row per text (len(texts) x hidden size), from the encoder `name_or_path`
    (a bundled name or a folder: an encoder, a decoder, or an encoder-decoder's encoder), each
    text cut at `max_length` tokens."""
    from transformers import AutoModel

    model = load_pretrained(AutoModel, name_or_path, seed=0).eval()
    if model.config.is_encoder_decoder:  # T5, BART: the encoder's states (the decoder needs targets)
        model = model.get_encoder()
    tokenizer = load_tokenizer(name_or_path)
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True,
            return_tensors="pt",
        )  # fmt: skip
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(rows)
