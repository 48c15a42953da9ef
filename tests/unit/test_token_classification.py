"""The token_classification task: reading tagged sentences, BIO/IOBES spans and their repair,
sub-word alignment, and entity-level scores against hand-computed ones."""

import logging

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from fedlm.errors import DatasetError
from fedlm.tasks import TASKS, TokenClassificationTask, task_of_model
from fedlm.tasks.text import IGNORED_TARGET
from fedlm.tasks.token_classification import entities, entity_scores, written


def test_entity_scores_count_exact_spans_only():
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-LOC"]]  # PER cut short: no match
    scores = entity_scores(truth, predicted)
    # 4 predicted entities (PER, LOC, ORG, LOC), 3 true ones (PER, LOC, ORG); LOC and ORG match
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert scores["f1_PER"] == 0 and scores["f1_ORG"] == 1
    assert scores["f1_LOC"] == pytest.approx(2 * 1 * (1 / 2) / (1 + 1 / 2))  # 1 of 2 predicted, 1 of 1 true
    assert scores["token_accuracy"] == pytest.approx(4 / 6)


def test_spans_are_read_as_conll_reads_them_and_written_in_either_scheme():
    tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "E-ORG", "S-LOC"]
    assert entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 5), ("LOC", 6, 6)]
    assert written(entities(tags), 7, "BIO") == ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "I-ORG", "B-LOC"]
    assert written(entities(tags), 7, "IOBES") == ["B-PER", "E-PER", "O", "S-LOC", "B-ORG", "E-ORG", "S-LOC"]


def test_invalid_spans_are_repaired_and_counted_or_refused(caplog):
    rows = [{"tokens": ["bob", "smith", "left"], "tags": ["I-PER", "I-PER", "O"]}, {"tokens": ["x"], "tags": ["O"]}]
    with caplog.at_level(logging.WARNING, logger="fedlm"):
        data = TokenClassificationTask().read(rows, owner="client a")
    assert data.labels[0] == (["bob", "smith", "left"], ["B-PER", "I-PER", "O"])
    assert "client a: 1 of 2 sentences" in caplog.text
    assert data.texts == ["bob smith left", "x"]
    with pytest.raises(DatasetError, match=r"client a: list of records row 0: .*as written: \['B-PER', 'I-PER', 'O'\]"):
        TokenClassificationTask(invalid_spans="error").read(rows, owner="client a")


def test_conll_files_and_tag_ids_are_read(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    data = TokenClassificationTask().read(path)
    assert data.labels == [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter"], ["B-PER"])]
    rows = [{"tokens": ["EU", "rejects"], "ner_tags": [1, 0]}]
    assert TokenClassificationTask(tag_names=["O", "B-ORG"]).read(rows).labels == [(["EU", "rejects"], ["B-ORG", "O"])]
    (tmp_path / "bad.conll").write_text("EU B-ORG\nrejects\n")
    with pytest.raises(DatasetError, match=r"bad.conll line 2 has a word and no tag \('rejects'\)"):
        TokenClassificationTask().read(tmp_path / "bad.conll")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "2 words and 1 tags"),
        ({"tokens": ["a"], "tags": ["PER"]}, "tag 'PER' is neither O nor B-, I-, E- or S-"),
        ({"tokens": ["a"], "tags": [3]}, "the tags are ids; give task.tag_names"),
        ({"tokens": [], "tags": []}, "tokens must be a non-empty list"),
        ({"words": ["a"], "tags": ["O"]}, "needs a 'tokens' column"),
    ],
)
def test_rows_that_cannot_be_tagged_are_errors_naming_the_row(row, message):
    with pytest.raises(DatasetError, match=message):
        TokenClassificationTask().read([row])


def test_only_the_first_sub_word_token_of_each_word_carries_its_tag(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = TokenClassificationTask()
    rows = [{"tokens": ["alice", "won", "the", "game"], "tags": ["B-PER", "O", "O", "O"]}]
    data = task.read(rows)
    tags = task.metadata(task.target_keys(data.labels))
    assert tags.label2id == {"B-PER": 0, "O": 1}
    targets = task.encode_targets(tags, data.labels, "a")
    encoded = task.encode(tokenizer, data.texts, targets, max_length=32)
    # [CLS] a ##l ##i ##c ##e w ##o ##n the game [SEP]: "alice" and "won" are spelled out
    pieces = tokenizer.convert_ids_to_tokens(encoded.input_ids[0])
    assert pieces == ["[CLS]", "a", "##l", "##i", "##c", "##e", "w", "##o", "##n", "the", "game", "[SEP]"]
    ignored = IGNORED_TARGET
    assert encoded.labels[0] == [ignored, 0, ignored, ignored, ignored, ignored, 1, ignored, ignored, 1, 1, ignored]
    assert encoded.cut_tags == [[]]
    # cut after 8 tokens: "the" and "game" are cut off, counted, and kept aside for evaluation
    short = task.encode(tokenizer, data.texts, targets, max_length=8, owner="client a")
    assert short.cut_tags == [[1, 1]] and short.notes[0].startswith("client a: 1 of 1 sentences are longer")


def test_evaluation_scores_the_words_and_predicts_cut_words_outside(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = TokenClassificationTask()
    data = task.read([{"tokens": ["the", "game", "paris"], "tags": ["O", "O", "B-LOC"]}])
    tags = task.metadata(["B-LOC", "O"])
    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=2, id2label=tags.id2label, label2id=tags.label2id)
    model = BertForTokenClassification(config)
    with torch.no_grad():  # a head that says O everywhere
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    encoded = task.encode(tokenizer, data.texts, task.encode_targets(tags, data.labels, "a"), max_length=32)
    scores = task.evaluate(model, encoded, 8, tokenizer.pad_token_id)
    assert scores["token_accuracy"] == pytest.approx(2 / 3) and scores["f1"] == 0 and scores["recall"] == 0
    # loss: the mean cross-entropy over the 3 labelled tokens, by hand
    expected = (
        -(2 * torch.log_softmax(torch.tensor([0.0, 5.0]), 0)[1] + torch.log_softmax(torch.tensor([0.0, 5.0]), 0)[0]) / 3
    )
    assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)
    cut = task.encode(tokenizer, data.texts, task.encode_targets(tags, data.labels, "a"), max_length=4)
    assert cut.cut_tags == [[0]]  # "paris" cut off: still a missed entity
    assert task.evaluate(model, cut, 8, tokenizer.pad_token_id)["token_accuracy"] == pytest.approx(2 / 3)


def test_a_token_classifier_is_given_the_task(tiny_model_dir):
    model = BertForTokenClassification(BertConfig.from_pretrained(tiny_model_dir, num_labels=3))
    assert isinstance(task_of_model(model), TokenClassificationTask)
    assert TASKS["token_classification"] is TokenClassificationTask
