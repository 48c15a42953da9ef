"""Sequence to sequence: an encoder-decoder (T5, BART, mT5-style `AutoModelForSeq2SeqLM`) learns
to write each row's target from its source, with a teacher-forced loss; evaluation reports the
loss and perplexity over all target tokens, and after every round the global model writes
`samples` validation targets (greedy), scored against their references with ROUGE-L.

Rows have `source` and `target` columns, or `input` and `output`. An empty target is an error
naming its row. A source is cut at `max_length` tokens; a target too, always ending with the
end-of-sequence token, and each client counts its cut targets.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch

from fedlm.data.dataset import TextDataset, read_columns
from fedlm.errors import DatasetError, ModelError
from fedlm.models.loading import load_pretrained
from fedlm.tasks.base import Task
from fedlm.tasks.text import (
    CHARS_PER_TOKEN,
    IGNORED_TARGET,
    EncodedDataset,
    batches,
    check_rouge_installed,
    rouge_l_scores,
    sample_indices,
)

logger = logging.getLogger("fedlm")

COLUMN_PAIRS = (("source", "target"), ("input", "output"))


def is_seq2seq(model: torch.nn.Module) -> bool:
    """Whether `model` (or the model a PEFT adapter wraps) is a transformers encoder-decoder LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False)) and hasattr(base, "generate")


class Seq2SeqTask(Task):
    """Writing a target text from a source text (see the module docstring); no metadata."""

    kind: ClassVar[str] = "seq2seq"
    metrics: ClassVar[tuple[str, ...]] = ("perplexity",)
    headline: ClassVar[str] = "perplexity"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"perplexity"})
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"perplexity": (1.0, math.inf)}

    def __init__(self, samples: int = 16, max_new_tokens: int = 48) -> None:
        if samples:
            check_rouge_installed("task seq2seq (with task.samples > 0)")
        self.samples = samples
        self.max_new_tokens = max_new_tokens

    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        """Texts (the sources) and, as targets, the target texts, every one checked non-empty."""
        if isinstance(dataset, TextDataset):
            return dataset
        source, columns = read_columns(dataset, owner)
        pair = (text_column, target_column) if text_column and target_column else None
        pair = pair or next(((s, t) for s, t in COLUMN_PAIRS if s in columns and t in columns), None)
        if pair is None or not all(name in columns for name in pair):
            raise DatasetError(
                f"{owner}: {source} needs `source` and `target` columns (or `input` and `output`); its columns "
                f"are {sorted(columns, key=str)}"
            )
        sources, targets = columns[pair[0]], columns[pair[1]]
        if not sources:
            raise DatasetError(f"{owner}: {source} holds no examples; every client needs at least one")
        for row, (text, target) in enumerate(zip(sources, targets)):
            where = f"{owner}: {source} row {row}"
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{where}: {pair[0]} must be non-empty text, got {text!r:.60}")
            if not isinstance(target, str) or not target.strip():
                raise DatasetError(f"{where}: {pair[1]} must be non-empty text, got {target!r:.60}")
        others = {name: values for name, values in columns.items() if name not in pair}
        return TextDataset(list(sources), list(targets), source, others)

    def encode(
        self, tokenizer: Any, texts: list[str], targets: list[Any], max_length: int, owner: str = "dataset"
    ) -> EncodedDataset:
        """Source token ids (with the tokenizer's special tokens) and target token ids ending with
        end-of-sequence, each cut at `max_length`; cut targets are counted in the log."""
        if tokenizer.eos_token_id is None:
            raise ModelError(f"{owner}: task seq2seq needs a tokenizer with an end-of-sequence token")
        cap = max_length * CHARS_PER_TOKEN
        sources = tokenizer([text[:cap] for text in texts], truncation=True, max_length=max_length)["input_ids"]
        written = tokenizer([target[:cap] for target in targets], add_special_tokens=False)["input_ids"]
        labels, cut = [], 0
        for ids in written:
            cut += len(ids) + 1 > max_length
            labels.append([*ids[: max_length - 1], tokenizer.eos_token_id])
        notes = [f"{owner}: {cut} of {len(targets)} targets are longer than training.max_length={max_length} "
                 "tokens and were cut"] if cut else []  # fmt: skip
        return EncodedDataset([list(ids) for ids in sources], labels, notes=notes)

    def sample_prompts(self, data: TextDataset, seed: int) -> list[dict[str, Any]]:
        """`samples` rows of `data` drawn with `seed`, in their order: {"source", "reference"}."""
        chosen = sample_indices(len(data), self.samples, seed)
        return [{"source": data.texts[index], "reference": data.labels[index]} for index in chosen]

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[dict[str, Any]], max_length: int, device: str
    ) -> list[str]:
        """Greedy targets of up to `max_new_tokens` tokens, one source at a time."""
        from transformers import GenerationConfig

        settings = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False)
        was_training = model.training
        model.eval()
        responses = []
        for prompt in prompts:
            ids = tokenizer([prompt["source"][: max_length * CHARS_PER_TOKEN]], truncation=True, max_length=max_length)
            input_ids = torch.tensor(ids["input_ids"], device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings
            )
            responses.append(tokenizer.decode(output[0], skip_special_tokens=True).strip())
        model.train(was_training)
        return responses

    def score_samples(self, prompts: list[dict[str, Any]], responses: list[str]) -> list[dict[str, float]]:
        """Each generated target's ROUGE-L F-measure against its reference."""
        return rouge_l_scores(prompts, responses)

    def load_model(self, name_or_path: str, metadata: Any, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        return load_pretrained(AutoModelForSeq2SeqLM, name_or_path, seed)

    def check_model(self, model: torch.nn.Module, metadata: Any, owner: str) -> None:
        if not is_seq2seq(model):
            raise ModelError(
                f"{owner}: task seq2seq needs an encoder-decoder language model (such as AutoModelForSeq2SeqLM's: "
                f"T5, BART), got {type(model).__name__}"
            )

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        """Mean loss over every target token of `data` (not a mean of batch means) and perplexity."""
        was_training = model.training
        model.eval()
        total, counted = 0.0, 0
        for batch in batches(data, batch_size, pad_id):
            batch = {key: value.to(device) for key, value in batch.items()}
            tokens = int((batch["labels"] != IGNORED_TARGET).sum())
            total += float(model(**batch).loss) * tokens
            counted += tokens
        model.train(was_training)
        loss = total / max(counted, 1)
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
