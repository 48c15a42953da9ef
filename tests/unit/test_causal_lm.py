"""The causal_lm task on a tiny Llama: which tokens carry targets, the row formats, and
perplexity against a hand computation."""

import copy
import logging
import math
import random
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, masking_utils

from fedlm import FedClient
from fedlm.errors import ConfigError, DatasetError, ModelError, NothingLeftError, WireError
from fedlm.gate import checked_evaluation
from fedlm.models import load_tokenizer
from fedlm.protocol import EvaluateIns, EvaluateRes
from fedlm.tasks import TASKS, CausalLMTask, task_of_model
from fedlm.tasks.text import IGNORED_TARGET, EncodedDataset, batches, length_grouped, pack

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


def test_a_conversation_whose_response_max_length_cuts_away_is_skipped_and_counted(tokenizer):
    long_prompt = [{"role": "user", "content": "the " * 50}, {"role": "assistant", "content": "yes"}]
    short = CONVERSATION[1:3]
    encoded = CausalLMTask().encode(tokenizer, ["x", "y"], [long_prompt, short], max_length=40, owner="client a")
    assert encoded.skipped == 1 and len(encoded) == 1
    assert encoded.input_ids == CausalLMTask().encode(tokenizer, ["y"], [short], max_length=40).input_ids
    with pytest.raises(DatasetError, match=r"client a: every one of its 1 conversations .*after max_length=20"):
        CausalLMTask().encode(tokenizer, ["x"], [long_prompt], max_length=20, owner="client a")


def test_a_client_reports_its_skipped_rows_once_and_in_its_training_metrics(tiny_llama_dir, tokenizer, caplog):
    long_prompt = [{"role": "user", "content": "the " * 50}, {"role": "assistant", "content": "yes"}]
    rows = [{"messages": conversation} for conversation in (long_prompt, CONVERSATION[1:3], CONVERSATION[1:3])]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    client = FedClient(rows, model, tokenizer, name="a", max_length=40)
    with caplog.at_level(logging.WARNING, logger="fedlm"):
        first, second = client.local_train(), client.local_train()
    assert [record.getMessage() for record in caplog.records] == [
        "client a: 1 of 3 examples skipped: none of their target tokens fits in training.max_length=40 tokens "
        "(raise it to keep them)"
    ]
    assert first["skipped_examples"] == second["skipped_examples"] == 1 and first["num_examples"] == 2


def test_a_test_split_of_only_over_long_conversations_reports_no_results_and_says_so_once(
    tiny_llama_dir, tokenizer, caplog
):
    long_prompt = [{"role": "user", "content": "the " * 50}, {"role": "assistant", "content": "yes"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    client = FedClient([{"messages": CONVERSATION[1:3]}], model, tokenizer, name="a", max_length=40,
                       test_dataset=[{"messages": long_prompt}])  # fmt: skip
    ins = EvaluateIns(client.get_parameters(), {})
    with caplog.at_level(logging.WARNING, logger="fedlm"):
        first, second = client.evaluate(ins), client.evaluate(ins)
    assert first.num_examples == second.num_examples == 0 and first.metrics == {}
    assert [record.getMessage() for record in caplog.records] == [
        "client a test set: every one of its 1 conversations has its first response begin after max_length=40 "
        "tokens, so no response token is left to learn; raise training.max_length or shorten the prompts; it "
        "reports no test results"
    ]
    with pytest.raises(NothingLeftError):  # training on such data is an error
        FedClient([{"messages": long_prompt}], model, tokenizer, name="b", max_length=40).local_train()


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence_token(
    tiny_llama_dir, tokenizer, tmp_path, caplog
):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    with caplog.at_level(logging.INFO, logger="fedlm"):
        loaded = [load_tokenizer(str(tmp_path)) for _ in range(2)]
    assert all(t.pad_token == "<|im_end|>" and t.pad_token_id == t.eos_token_id for t in loaded)
    assert [record.getMessage() for record in caplog.records] == [
        f"{tmp_path}: its tokenizer has no pad token; padding with its end-of-sequence token '<|im_end|>'"
    ]


def test_sample_prompts_end_before_the_last_response_and_their_answers_are_deterministic(tiny_llama_dir, tokenizer):
    task = CausalLMTask(samples=2, max_new_tokens=5)
    chats = task.read([{"messages": CONVERSATION}] * 3)
    prompts = task.sample_prompts(chats, seed=0)
    assert prompts == [{"messages": CONVERSATION[:4], "reference": CONVERSATION[4]["content"]}] * 2
    text = task.sample_prompts(task.read([{"text": "one two three four five"}]), seed=0)
    assert text == [{"text": "one two", "reference": "three four five"}]

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    answers = task.generate(model, tokenizer, prompts + text, max_length=12, device="cpu")
    assert answers == task.generate(model, tokenizer, prompts + text, max_length=12, device="cpu")
    # a hand-written greedy loop: the prompt and the assistant's header, cut to its last 12 - 5 tokens
    written = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert written.endswith("<|im_start|>assistant\n")
    sequence, new = ids(tokenizer, written)[-7:], []
    with torch.no_grad():
        while len(new) < 5 and (not new or new[-1] != tokenizer.eos_token_id):
            new.append(int(model(input_ids=torch.tensor([sequence + new])).logits[0, -1].argmax()))
    assert answers[0] == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_rouge_l_of_a_sample_is_the_f_measure_of_its_longest_common_word_subsequence(monkeypatch):
    prompts = [{"messages": [], "reference": "The cat sat on the mat."}] * 3
    scores = CausalLMTask(rouge_l=True).score_samples(prompts, ["the cat, on a MAT", "dogs bark", ""])
    # "the cat on mat": 4 words common in order, of 5 in the response and 6 in the reference
    precision, recall = 4 / 5, 4 / 6
    assert scores[0]["rouge_l"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores[1:] == [{"rouge_l": 0.0}, {"rouge_l": 0.0}]
    assert CausalLMTask().score_samples(prompts, ["a", "b", "c"]) == [{}, {}, {}]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ConfigError, match=r"task.rouge_l .* pip install 'fedlm\[rouge\]'"):
        CausalLMTask(rouge_l=True)


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


def test_packing_puts_examples_in_order_into_rows_and_gives_each_its_own_positions():
    data = EncodedDataset([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], [[-100, 2, 3], [4, 5], [6, 7, 8, 9], [10]])
    packed = pack(data, max_length=5)
    assert packed.input_ids == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    # every example's first token has no target: it would be predicted from the previous example
    assert packed.labels == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]
    assert packed.segments == [[3, 2], [4, 1]] and packed.num_examples == 4 and len(packed) == 2
    three = EncodedDataset(data.input_ids[:3], data.labels[:3])
    (batch,) = batches(pack(three, max_length=5), batch_size=2, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # the padding counts anew
    assert "attention_mask" not in batch


def test_a_packed_dataset_has_the_loss_of_the_unpacked_one(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:5], CONVERSATION[:3]]
    alone = CausalLMTask().encode(tokenizer, ["unused"] * 4, conversations, max_length=200)
    packed = CausalLMTask(packing=True).encode(tokenizer, ["unused"] * 4, conversations, max_length=200)
    assert len(packed) < len(alone) and packed.num_examples == len(alone)
    unpacked = CausalLMTask().evaluate(model, alone, batch_size=4, pad_id=tokenizer.pad_token_id)
    assert CausalLMTask().evaluate(model, packed, batch_size=4, pad_id=0)["loss"] == pytest.approx(
        unpacked["loss"], rel=1e-5
    )


def test_packing_is_refused_for_a_model_whose_attention_crosses_packed_examples(tiny_llama_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    CausalLMTask(packing=True).check_model(model, None, owner="client a")
    # transformers keeps packed examples apart by finding them in the position ids: without that, they leak
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ModelError, match="client a: with task.packing, LlamaForCausalLM .* set task.packing: false"):
        CausalLMTask(packing=True).check_model(model, None, owner="client a")
    CausalLMTask().check_model(model, None, owner="client a")  # without packing, nothing to check


def test_length_grouped_batches_hold_similar_lengths_and_every_example_once():
    lengths = [random.Random(index).randrange(1, 200) for index in range(1000)]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = length_grouped(order, lengths, batch_size=10, generator=torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(1000))
    assert grouped == length_grouped(order, lengths, 10, torch.Generator().manual_seed(1))

    def padding(indices):  # padded tokens over batches of 10
        chunks = [indices[at : at + 10] for at in range(0, len(indices), 10)]
        return sum(max(lengths[i] for i in chunk) * len(chunk) - sum(lengths[i] for i in chunk) for chunk in chunks)

    assert padding(grouped) < padding(order) / 10
