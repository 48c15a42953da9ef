"""Sentence embeddings for the clusters partition: mean-pooled last hidden states, checked by hand."""

import torch
from transformers import AutoModel, AutoTokenizer

from conftest import build_tiny_llama_folder, build_tiny_model_folder, build_tiny_t5_folder
from fedlm.models.embedding import embed_texts

TEXTS = ["the match was won by the team", "shares fell as the market closed", "a new phone"]


def test_an_encoder_a_decoder_and_an_encoder_decoder_embed_by_mean_pooling(tmp_path):
    folders = {
        "bert": build_tiny_model_folder(tmp_path / "bert"),
        "llama": build_tiny_llama_folder(tmp_path / "llama"),
        "t5": build_tiny_t5_folder(tmp_path / "t5"),
    }
    for kind, folder in folders.items():
        embedded = embed_texts(str(folder), TEXTS, max_length=16, batch_size=2)
        model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        encoder = model.get_encoder() if kind == "t5" else model
        for row, text in enumerate(TEXTS):  # one text at a time: no padding to mask
            ids = tokenizer(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                mean = encoder(input_ids=ids).last_hidden_state[0].mean(dim=0)
            assert torch.allclose(embedded[row], mean / mean.norm(), atol=1e-5), kind
