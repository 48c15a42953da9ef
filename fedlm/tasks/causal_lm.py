"""Causal language modelling: instruction and dialogue tuning of decoders (GPT/Llama-style).

Each row is one of three formats (`format: auto` detects it from the columns):
- `messages`: a conversation in the common chat format, `[{"role": ..., "content": ...}, ...]`
  with roles system, user and assistant, several turns allowed;
- `instruction` (+ an optional `input`) and `output`, Alpaca-style: one user turn, one answer;
- `text`: plain text, for language modelling.

A conversation is rendered with the section's `chat_template`, else the tokenizer's, else ChatML,
and the loss covers only the assistant turns (their content and end-of-turn marker): every other
token is labelled -100, which the model's loss ignores (`train_on_prompt: true` labels them all).
Plain text is labelled everywhere and ends with the tokenizer's end-of-sequence token. Metrics: the
mean loss over all labelled tokens of a dataset (token-weighted) and its exponential, perplexity.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal

import torch

from fedlm.data.dataset import TextDataset, read_columns
from fedlm.errors import DatasetError, ModelError, NothingLeftError
from fedlm.models.loading import is_causal_lm, load_pretrained
from fedlm.tasks.base import Task
from fedlm.tasks.text import (
    CHARS_PER_TOKEN,
    IGNORED_TARGET,
    EncodedDataset,
    batches,
    check_rouge_installed,
    forward_options,
    pack,
    rouge_l_scores,
    sample_indices,
)

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "instruction", "text")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The chat template of conversations whose tokenizer has none (ChatML, as SmolLM2 and Qwen use)."""

Conversation = list[dict[str, str]]


def detect_format(columns: dict[str, list], owner: str, source: str) -> str:
    if "messages" in columns:
        return "messages"
    if "instruction" in columns and "output" in columns:
        return "instruction"
    if "text" in columns:
        return "text"
    raise DatasetError(
        f"{owner}: {source} has none of the causal_lm row formats: a `messages` column (chat turns), "
        f"`instruction` and `output` columns (Alpaca style, `input` optional), or a `text` column; "
        f"its columns are {sorted(columns, key=str)}"
    )


def checked_conversation(value: Any, where: str) -> Conversation:
    """`value` as a list of {role, content} turns with at least one non-empty assistant turn."""
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except ValueError as error:
            raise DatasetError(f"{where}: messages is text that is not JSON: {error}") from error
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: messages must be a non-empty list of {{role, content}} turns, got {value!r:.60}")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DatasetError(f"{where}: turn {index} must be an object with a string `content`, got {turn!r:.60}")
        if turn.get("role") not in ROLES:
            raise DatasetError(f"{where}: turn {index} has role {turn.get('role')!r}; valid roles are {list(ROLES)}")
        turns.append({"role": turn["role"], "content": turn["content"]})
    answers = [turn for turn in turns if turn["role"] == "assistant"]
    if not answers:
        raise DatasetError(f"{where}: the conversation has no assistant turn, so there is nothing to learn from it")
    if any(not turn["content"].strip() for turn in answers):
        raise DatasetError(f"{where}: an assistant turn is empty; drop the row or give the response")
    return turns


def render(tokenizer: Any, conversation: Conversation, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template writes it, and the character span of each assistant turn
    (from after its header to the end of its end-of-turn marker)."""

    def written(turns: Conversation, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    text, spans = written(conversation), []
    for index, turn in enumerate(conversation):
        if turn["role"] != "assistant":
            continue
        before, through = written(conversation[:index], generation_prompt=True), written(conversation[: index + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ModelError(
                "the chat template does not write a conversation as the sum of its turns, so the response "
                "tokens cannot be found; give task.chat_template, or set task.train_on_prompt: true"
            )
        spans.append((len(before), len(through)))
    return text, spans


@torch.no_grad()
def keeps_packed_examples_apart(model: torch.nn.Module) -> bool:
    """Whether `model` scores the second of two packed sequences as it scores it alone."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocabulary = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(vocabulary, (1, length), generator=generator).to(device) for length in (5, 4))
    alone = model(input_ids=second, use_cache=False).logits
    positions = torch.cat([torch.arange(5), torch.arange(4)]).unsqueeze(0).to(device)
    packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
    model.train(was_training)
    return torch.allclose(packed[:, 5:], alone, atol=1e-4, rtol=1e-3)


class CausalLMTask(Task):
    """Next-token prediction on conversations, instructions or text (see the module docstring);
    no metadata. `chat_template` (a Jinja string) overrides the tokenizer's."""

    kind: ClassVar[str] = "causal_lm"
    metrics: ClassVar[tuple[str, ...]] = ("perplexity",)
    headline: ClassVar[str] = "perplexity"
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"perplexity"})
    ranges: ClassVar[dict[str, tuple[float, float]]] = {"perplexity": (1.0, math.inf)}

    def __init__(
        self,
        format: Literal["auto", "messages", "instruction", "text"] = "auto",
        chat_template: str | None = None,
        train_on_prompt: bool = False,
        samples: int = 4,
        max_new_tokens: int = 48,
        packing: bool = False,
        rouge_l: bool = False,
    ) -> None:
        if rouge_l:
            check_rouge_installed("task.rouge_l")
        self.rouge_l = rouge_l
        self.format = format
        self.chat_template = chat_template
        self.train_on_prompt = train_on_prompt
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.packing = packing

    def template(self, tokenizer: Any) -> str:
        """The chat template conversations are written with: the section's, the tokenizer's, or ChatML."""
        return self.chat_template or getattr(tokenizer, "chat_template", None) or CHATML

    def read(
        self, dataset: Any, text_column: str | None = None, target_column: str | None = None, owner: str = "dataset"
    ) -> TextDataset:
        """Texts (each conversation's contents, one turn a line; the partition reports and
        fingerprints use them) and, as targets, the conversations (None for plain text)."""
        if isinstance(dataset, TextDataset):
            return dataset
        source, columns = read_columns(dataset, owner)
        row_format = detect_format(columns, owner, source) if self.format == "auto" else self.format
        used = {"messages": ["messages"], "instruction": ["instruction", "input", "output"]}.get(
            row_format, [text_column or "text"]
        )
        for name in used:
            if name not in columns and name != "input":
                raise DatasetError(f"{owner}: {source} has no {name!r} column for task.format {row_format!r}")
        rows = len(next(iter(columns.values()), []))
        if rows == 0:
            raise DatasetError(f"{owner}: {source} holds no examples; every client needs at least one")
        texts, conversations = [], []
        for row in range(rows):
            where = f"{owner}: {source} row {row}"
            conversation = self._conversation(columns, row_format, used, row, where)
            conversations.append(conversation)
            texts.append(
                columns[used[0]][row] if conversation is None else "\n".join(t["content"] for t in conversation)
            )
        others = {name: list(values) for name, values in columns.items() if name not in used}
        return TextDataset(texts, conversations, source, others)

    @staticmethod
    def _conversation(columns: dict, row_format: str, used: list[str], row: int, where: str) -> Conversation | None:
        if row_format == "messages":
            return checked_conversation(columns["messages"][row], where)
        values = {name: columns[name][row] if name in columns else None for name in used}
        if row_format == "text":
            if not isinstance(values[used[0]], str) or not values[used[0]].strip():
                raise DatasetError(f"{where}: {used[0]} must be non-empty text, got {values[used[0]]!r:.60}")
            return None
        instruction, extra, output = values["instruction"], values["input"], values["output"]
        if not isinstance(instruction, str) or not instruction.strip():
            raise DatasetError(f"{where}: instruction must be non-empty text, got {instruction!r:.60}")
        if not isinstance(output, str) or not output.strip():
            raise DatasetError(f"{where}: output (the response) must be non-empty text, got {output!r:.60}")
        if extra is not None and not isinstance(extra, str):
            raise DatasetError(f"{where}: input must be text when given, got {extra!r:.60}")
        prompt = instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]

    def encode(
        self, tokenizer: Any, texts: list[str], targets: list[Any], max_length: int, owner: str = "dataset"
    ) -> EncodedDataset:
        """Token ids and per-token targets: the ids themselves where the loss counts, -100 elsewhere
        (the model shifts them by one). Cut at `max_length` tokens; a conversation whose first
        response begins after that is skipped and counted (`EncodedDataset.skipped`), and an error
        naming `owner` when that leaves nothing."""
        template = self.template(tokenizer)
        cap = max_length * CHARS_PER_TOKEN
        input_ids, labels, skipped = [], [], 0
        for text, conversation in zip(texts, targets):
            if conversation is None:
                ids = tokenizer(text[:cap], add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids = ids + [tokenizer.eos_token_id]
                ids = ids[:max_length]
                input_ids.append(ids)
                labels.append(list(ids))
                continue
            rendered, spans = render(tokenizer, conversation, template)
            encoded = tokenizer(rendered[:cap], add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"][:max_length]
            targets_here = [
                token if self.train_on_prompt or any(start <= begin < end for start, end in spans) else IGNORED_TARGET
                for token, (begin, _) in zip(ids, encoded["offset_mapping"])
            ]
            if all(target == IGNORED_TARGET for target in targets_here[1:]):  # the first token is never predicted
                skipped += 1
                continue
            input_ids.append(ids)
            labels.append(targets_here)
        if not labels:
            raise NothingLeftError(
                f"{owner}: every one of its {len(texts)} conversations has its first response begin after "
                f"max_length={max_length} tokens, so no response token is left to learn; raise training.max_length "
                "or shorten the prompts"
            )
        encoded = EncodedDataset(input_ids, labels, torch.long, skipped)
        return pack(encoded, max_length) if self.packing else encoded

    def sample_prompts(self, data: TextDataset, seed: int) -> list[dict[str, Any]]:
        """`samples` rows of `data` drawn with `seed`, in their order: a conversation up to its last
        assistant turn ({"messages": [...]}), whose content is the reference; plain text cut after
        its first half of words ({"text": ...}), the rest the reference."""
        prompts = []
        for index in sample_indices(len(data), self.samples, seed):
            conversation = data.labels[index]
            if conversation is None:
                words = data.texts[index].split()
                half = max(1, len(words) // 2)
                prompts.append({"text": " ".join(words[:half]), "reference": " ".join(words[half:])})
                continue
            last = max(turn for turn, message in enumerate(conversation) if message["role"] == "assistant")
            prompts.append({"messages": conversation[:last], "reference": conversation[last]["content"]})
        return prompts

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, tokenizer: Any, prompts: list[dict[str, Any]], max_length: int, device: str
    ) -> list[str]:
        """Greedy responses of up to `max_new_tokens` tokens, one prompt at a time (no padding to
        get wrong); a conversation is written with its generation prompt (the assistant's header),
        and its prompt cut from the left to leave room for the response within `max_length`."""
        from transformers import GenerationConfig

        template = self.template(tokenizer)
        ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        ends = sorted(end for end in ends if end is not None and end != tokenizer.unk_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (ends or [0])[0]
        settings = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=ends or None,
                                    pad_token_id=pad)  # fmt: skip
        keep = max(1, max_length - self.max_new_tokens)
        was_training = model.training
        model.eval()
        responses = []
        for prompt in prompts:
            if "messages" in prompt:
                text = tokenizer.apply_chat_template(
                    prompt["messages"], chat_template=template, tokenize=False, add_generation_prompt=True
                )
            else:
                text = prompt["text"]
            ids = tokenizer(text[-keep * CHARS_PER_TOKEN :], add_special_tokens=False)["input_ids"][-keep:]
            input_ids = torch.tensor([ids], device=device)
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings
            )
            responses.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip())
        model.train(was_training)
        return responses

    def score_samples(self, prompts: list[dict[str, Any]], responses: list[str]) -> list[dict[str, float]]:
        """With `rouge_l`, each response's ROUGE-L F-measure against its reference."""
        return rouge_l_scores(prompts, responses) if self.rouge_l else super().score_samples(prompts, responses)

    def load_model(self, name_or_path: str, metadata: Any, seed: int, **options: Any) -> torch.nn.Module:
        """`options`: from_pretrained's, such as a quantized base's (`quantized_loading`)."""
        from transformers import AutoModelForCausalLM

        return load_pretrained(AutoModelForCausalLM, name_or_path, seed, **options)

    def check_model(self, model: torch.nn.Module, metadata: Any, owner: str) -> None:
        """A causal LM; with `packing`, one whose attention keeps packed examples apart (checked on
        two short random sequences: packed, each must score as it does alone)."""
        if not is_causal_lm(model):
            raise ModelError(
                f"{owner}: task causal_lm needs a causal language model (such as AutoModelForCausalLM's), "
                f"got {type(model).__name__}"
            )
        if self.packing and not keeps_packed_examples_apart(model):
            raise ModelError(
                f"{owner}: with task.packing, {type(model).__name__} (attention {model.config._attn_implementation}) "
                "lets packed examples attend to each other; set task.packing: false"
            )

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, data: EncodedDataset, batch_size: int, pad_id: int, device: str = "cpu"
    ) -> dict[str, float]:
        """Mean loss over every predicted target token of `data` (not a mean of batch means) and
        perplexity, its exponential."""
        was_training = model.training
        model.eval()
        total, counted = 0.0, 0
        for batch in batches(data, batch_size, pad_id):
            batch = {key: value.to(device) for key, value in batch.items()}
            tokens = int((batch["labels"][:, 1:] != IGNORED_TARGET).sum())
            if tokens:
                total += float(model(**batch, **forward_options(batch)).loss) * tokens
                counted += tokens
        model.train(was_training)
        if counted == 0:
            raise ValueError("cannot compute perplexity on zero target tokens")
        loss = total / counted
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
