"""`data_files.load_examples`: formats read through `datasets`, columns, label mapping and errors."""

from __future__ import annotations

import json

import pytest

from hf_fwsvd.data_files import describe_source, load_examples

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
