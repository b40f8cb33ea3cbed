"""`data_files.load_examples`: formats read through `datasets`, columns, label mapping and errors."""

from __future__ import annotations

import json

import pytest

from hf_fwsvd.data_files import describe_source, load_examples, pack_texts

SEQ = "sequence-classification"


def test_formats_give_the_same_examples(tmp_path):
    rows = [{"sentence": "good film", "label": 1}, {"sentence": "bad plot", "label": 0}]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\ngood film\t1\nbad plot\t0\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = [{"text": "good film", "label": 1}, {"text": "bad plot", "label": 0}]
    for name in ("d.tsv", "d.json", "d.jsonl"):
        assert load_examples(str(tmp_path / name), SEQ) == expected, name
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    assert load_examples(str(tmp_path / "c.txt"), "causal-lm") == [{"text": "first line"}, {"text": "second line"}]
    assert load_examples(str(tmp_path / "d.jsonl"), SEQ, limit=1) == expected[:1]
    assert describe_source(str(tmp_path / "d.jsonl"), 1234) == "d.jsonl (1,234 examples)"


def test_labels_by_name_number_string_and_errors(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("text,sentiment\nnice,Positive\nawful,negative\n")
    label2id = {"negative": 0, "positive": 1}
    examples = load_examples(str(path), SEQ, label_column="sentiment", label2id=label2id)
    assert [example["label"] for example in examples] == [1, 0]
    with pytest.raises(ValueError, match=r"not class ids and do not match the model's label2id"):
        load_examples(str(path), SEQ, label_column="sentiment", label2id={"LABEL_0": 0, "LABEL_1": 1})
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text('{"text": "a", "label": "1"}\n{"text": "b", "label": "0"}\n')
    assert [example["label"] for example in load_examples(str(numeric), SEQ)] == [1, 0]
    body = tmp_path / "body.csv"
    body.write_text("body,label\nx,1\n")
    with pytest.raises(
        ValueError, match=r"has no text column \(looked for text, sentence, .*its columns are body, label"
    ):
        load_examples(str(body), SEQ)
    with pytest.raises(ValueError, match=r"Data file '.*missing.csv' does not exist"):
        load_examples(str(tmp_path / "missing.csv"), SEQ)


def test_token_classification_rows(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text('{"words": ["a", "b"], "tags": [0, 2]}\n')
    assert load_examples(str(path), "token-classification") == [{"tokens": ["a", "b"], "label": [0, 2]}]


class _WordTokenizer:
    """Each whitespace-separated word is one token id (its position in the joined text); `\n\n` is one token."""

    def __call__(self, text: str, verbose: bool = True) -> dict:
        return {"input_ids": [index for index, _ in enumerate(text.replace("\n\n", " SEP ").split())]}


def test_pack_texts_cuts_the_joined_text_into_full_blocks():
    examples = [{"text": "a b c d e"}, {"text": "f g"}]  # joined: a b c d e SEP f g -> 8 tokens
    blocks = pack_texts(examples, _WordTokenizer(), block_length=3, max_blocks=None)
    assert blocks == [{"input_ids": [0, 1, 2]}, {"input_ids": [3, 4, 5]}]  # the incomplete tail [6, 7] is dropped
    assert pack_texts(examples, _WordTokenizer(), block_length=4, max_blocks=1) == [{"input_ids": [0, 1, 2, 3]}]
    assert pack_texts(examples, _WordTokenizer(), block_length=8, max_blocks=None) == [{"input_ids": list(range(8))}]


def test_pack_texts_keeps_a_text_shorter_than_one_block():
    assert pack_texts([{"text": "a b"}], _WordTokenizer(), block_length=5, max_blocks=None) == [{"input_ids": [0, 1]}]
    assert describe_source("corpus.txt", 3, "blocks of 128 tokens") == "corpus.txt (3 blocks of 128 tokens)"
    assert describe_source("held_out.txt", 1) == "held_out.txt (1 example)"
    assert describe_source("corpus.txt", 1, "blocks of 128 tokens") == "corpus.txt (1 block of 128 tokens)"
