"""The causal_lm task on a tiny Llama: which tokens carry targets, the row formats, and
perplexity against a hand computation."""

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlm.errors import DatasetError, WireError
from fedlm.gate import checked_evaluation
from fedlm.protocol import EvaluateRes
from fedlm.tasks import TASKS, CausalLMTask, task_of_model
from fedlm.tasks.text import IGNORED_TARGET, EncodedDataset, batches

CONVERSATION = [
    {"role": "system", "content": "you are a sports desk"},
    {"role": "user", "content": "who won the match"},
    {"role": "assistant", "content": "the team won the cup"},
    {"role": "user", "content": "and the coach"},
    {"role": "assistant", "content": "the coach said it was a good season"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_only_the_assistant_turns_carry_targets(tokenizer):
    encoded = CausalLMTask().encode(tokenizer, ["unused"], [CONVERSATION], max_length=200)
    # the ChatML rendering built turn by turn: header, content, end marker
    expected_ids, expected_targets = [], []
    for turn in CONVERSATION:
        header = ids(tokenizer, f"<|im_start|>{turn['role']}\n")
        body = ids(tokenizer, turn["content"]) + ids(tokenizer, "<|im_end|>\n")
        expected_ids += header + body
        expected_targets += [IGNORED_TARGET] * len(header)
        expected_targets += body if turn["role"] == "assistant" else [IGNORED_TARGET] * len(body)
    assert encoded.input_ids == [expected_ids]
    assert encoded.labels == [expected_targets]
    answered = [tokenizer.decode([t]) for t in expected_targets if t != IGNORED_TARGET]
    assert answered.count("<|im_end|>") == 2 and "cup" in answered and "who" not in answered

    everything = CausalLMTask(train_on_prompt=True).encode(tokenizer, ["unused"], [CONVERSATION], max_length=200)
    assert everything.labels == [expected_ids]


def test_instruction_rows_are_one_user_turn_and_text_rows_are_labelled_everywhere(tokenizer):
    task = CausalLMTask()
    alpaca = task.read([{"instruction": "name a sport", "input": "in one word", "output": "football"}])
    assert alpaca.labels == [
        [{"role": "user", "content": "name a sport\n\nin one word"}, {"role": "assistant", "content": "football"}]
    ]
    plain = task.read([{"text": "the market was up this year"}])
    encoded = task.encode(tokenizer, plain.texts, plain.labels, max_length=64)
    assert plain.labels == [None] and encoded.labels == encoded.input_ids
    assert encoded.input_ids[0][-1] == tokenizer.eos_token_id
    assert task.encode(tokenizer, plain.texts, plain.labels, max_length=3).input_ids[0] == encoded.input_ids[0][:3]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 0: the conversation has no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "turn 0 has role 'bot'; valid roles are"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
            "assistant turn is empty",
        ),
        ({"messages": "[{not json"}, "messages is text that is not JSON"),
        ({"instruction": "do it", "output": ""}, "output (the response) must be non-empty"),
        ({"prompt": "x", "answer": "y"}, "has none of the causal_lm row formats"),
    ],
)
def test_rows_that_fit_no_format_are_errors_naming_the_row(row, message):
    with pytest.raises(DatasetError, match=re.escape(message)):
        CausalLMTask().read([row], owner="client a")


def test_a_response_cut_away_by_max_length_is_an_error(tokenizer):
    long_prompt = [{"role": "user", "content": "the " * 50}, {"role": "assistant", "content": "yes"}]
    with pytest.raises(DatasetError, match=r"conversation 0 .*begins after max_length=20 tokens"):
        CausalLMTask().encode(tokenizer, ["the the"], [long_prompt], max_length=20)


def test_per_token_targets_are_padded_with_the_ignored_target():
    data = EncodedDataset([[5, 6, 7], [8]], [[IGNORED_TARGET, 6, 7], [8]])
    (batch,) = batches(data, batch_size=2, pad_id=0)
    assert batch["labels"].tolist() == [[IGNORED_TARGET, 6, 7], [8, IGNORED_TARGET, IGNORED_TARGET]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_perplexity_is_the_exponential_of_the_mean_over_all_target_tokens(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    task = CausalLMTask()
    conversations = [
        CONVERSATION,
        CONVERSATION[1:3],
        [{"role": "user", "content": "and the market"}, {"role": "assistant", "content": "prices are up"}],
    ]
    data = task.encode(tokenizer, ["unused"] * 3, conversations, max_length=200)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row_ids, row_targets in zip(data.input_ids, data.labels):
            logits = model(input_ids=torch.tensor([row_ids])).logits[0, :-1]
            targets = torch.tensor(row_targets[1:])
            counted = targets != IGNORED_TARGET
            log_probs = torch.log_softmax(logits.double(), dim=-1)[counted, targets[counted]]
            nll -= float(log_probs.sum())
            tokens += int(counted.sum())
    result = task.evaluate(model, data, batch_size=2, pad_id=tokenizer.pad_token_id)  # batches of 2 and 1 rows
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_a_causal_lm_is_given_the_causal_lm_task_and_other_models_are_refused(tiny_llama_dir, load_tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert isinstance(task_of_model(model), CausalLMTask) and TASKS["causal_lm"] is CausalLMTask
    with pytest.raises(Exception, match="task causal_lm needs a causal language model .*BertForSequenceClassification"):
        CausalLMTask().check_model(load_tiny(), None, owner="client a")


@pytest.mark.parametrize("reported", [{"perplexity": 0.5}, {"perplexity": float("nan")}, {"perplexity": "low"}, {}])
def test_the_reply_gate_refuses_a_perplexity_no_model_can_have(reported):
    ranges = CausalLMTask().metric_ranges()
    assert checked_evaluation(EvaluateRes(6, {"perplexity": 3.2}), 6, ranges) == {"perplexity": 3.2}
    with pytest.raises(WireError, match=r"evaluation metric 'perplexity' is missing or outside \[1, inf\]"):
        checked_evaluation(EvaluateRes(6, reported), 6, ranges)
