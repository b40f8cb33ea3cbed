"""The benchmarks' recovery fine-tune: what it trains, its distillation loss, and how headline rows record it."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import sentences, tiny_roberta, tiny_tokenizer
from transformers import RobertaForSequenceClassification

from benchmarks import headline, headline_report
from benchmarks.recovery import (
    block_parameters,
    dev_split,
    distill_loss,
    kd_loss,
    parse_candidate,
    recovery_examples,
    recovery_finetune,
)
from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.layers import LowRankLinear


def _examples(count: int = 24, regression: bool = False) -> list[dict]:
    return [
        {"text": text, "label": (k % 3) / 2 if regression else k % 2}
        for k, text in enumerate(sentences(count, seed=3))
    ]


def _compressed(seed: int = 0, regression: bool = False):
    torch.manual_seed(seed)
    teacher = tiny_roberta().eval()
    if regression:  # the same tiny config with one output, trained with squared error
        config = teacher.config
        config.num_labels, config.problem_type = 1, "regression"
        teacher = RobertaForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    compress(student, FWSVDConfig(method="svd", rank_ratio=0.5), show_progress=False)
    return teacher, student


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}


def test_distill_loss_matches_a_brute_force_sum_over_real_tokens():
    generator = torch.Generator().manual_seed(0)
    student = tuple(torch.randn(2, 3, 4, generator=generator) for _ in range(2))
    teacher = tuple(torch.randn(2, 3, 4, generator=generator) for _ in range(2))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        per_layer = [((s[b, k] - t[b, k]) ** 2).mean() for b in range(2) for k in range(3) if mask[b, k]]
        expected += float(sum(per_layer) / len(per_layer)) / 2
    assert math.isclose(float(distill_loss(student, teacher, mask)), expected, rel_tol=1e-6)
    # padding positions do not count
    moved = tuple(s.clone() for s in student)
    moved[0][1, 2] += 100.0
    assert torch.equal(distill_loss(moved, teacher, mask), distill_loss(student, teacher, mask))
    assert float(distill_loss(teacher, teacher, mask)) == 0.0
    with pytest.raises(ValueError, match="student has 1 hidden states, teacher 2."):
        distill_loss(student[:1], teacher, mask)


def test_block_parameters_are_the_compressible_weights_or_their_factors():
    teacher, student = _compressed()
    dense = block_parameters(teacher)
    # 2 layers x (q, k, v, attention output, intermediate, output) Linear layers, weight + bias each
    assert len(dense) == 2 * 6 * 2
    factors = {id(p) for m in student.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    assert {id(p) for p in block_parameters(student)} == factors


def test_distill_trains_only_the_factors_and_moves_towards_the_teacher():
    teacher, student = _compressed()
    tokenizer = tiny_tokenizer()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    grads = {name: p.requires_grad for name, p in student.named_parameters()}
    info = recovery_finetune(
        student, tokenizer, _examples(), "distill", teacher=teacher, steps=24, batch_size=4, learning_rate=1e-2
    )
    changed = _changed(before, student)
    factor_names = {
        f"{name}.{p}"
        for name, m in student.named_modules()
        if isinstance(m, LowRankLinear)
        for p, _ in m.named_parameters()
    }
    assert changed and changed <= factor_names  # no head, embedding or LayerNorm moved
    assert not _changed(teacher_before, teacher)
    assert not student.training
    assert {name: p.requires_grad for name, p in student.named_parameters()} == grads
    assert info["objective"] == "distill" and info["steps"] == 24 and info["examples"] == 96
    assert info["trained_parameters"] == sum(p.numel() for p in block_parameters(student))
    assert info["final_loss"] < info["first_loss"]


def test_label_objective_trains_the_factors_and_the_head_only():
    _, student = _compressed()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    info = recovery_finetune(student, tiny_tokenizer(), _examples(), "label", steps=6, batch_size=4)
    changed = _changed(before, student)
    assert {name for name in changed if name.startswith("classifier.")} == set(
        name for name in before if name.startswith("classifier.")
    )
    assert all(".down." in name or ".up." in name for name in changed if not name.startswith("classifier."))
    assert not any("embeddings" in name or "LayerNorm" in name for name in changed)
    head = sum(p.numel() for p in student.classifier.parameters())
    assert info["trained_parameters"] == sum(p.numel() for p in block_parameters(student)) + head


def test_label_objective_uses_squared_error_for_regression():
    _, student = _compressed(regression=True)
    info = recovery_finetune(student, tiny_tokenizer(), _examples(regression=True), "label", steps=2, batch_size=4)
    assert info["steps"] == 2 and math.isfinite(info["final_loss"])


def test_same_fine_tune_runs_on_the_dense_model():
    teacher, _ = _compressed()
    dense = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    recovery_finetune(dense, tiny_tokenizer(), _examples(), "label", steps=2, batch_size=4)
    block = {n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n}
    assert {name.rsplit(".", 1)[0] for name in _changed(before, dense)} <= block | {
        "classifier.dense",
        "classifier.out_proj",
    }


def test_recovery_finetune_rejects_bad_arguments():
    teacher, student = _compressed()
    with pytest.raises(ValueError, match=r"objective='kd' is not one of \('distill', 'label', 'label\+kd'\)\."):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "kd", teacher=teacher)
    with pytest.raises(ValueError, match=r"objective='distill' needs teacher= \(the dense task model\)\."):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "distill")
    with pytest.raises(ValueError, match=r"objective='label\+kd' needs teacher= \(the dense task model\)\."):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "label+kd")
    teacher, student = _compressed(regression=True)
    with pytest.raises(ValueError, match='objective="label\\+kd" needs a classifier; use "label" for regression.'):
        recovery_finetune(student, tiny_tokenizer(), _examples(regression=True), "label+kd", teacher=teacher)
    with pytest.raises(ValueError, match="steps must be positive, got 0."):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "label", steps=0)


def test_dev_split_is_training_data_after_the_fine_tune_examples():
    train = [{"text": str(i), "label": 0} for i in range(2400)]
    assert dev_split(train) == train[2000:2300]
    with pytest.raises(ValueError, match="dev_split needs 2300 training examples, the split has 2299."):
        dev_split(train[:2299])


def test_headline_finetune_copies_the_model_and_logs_under_the_point_key(tmp_path, monkeypatch):
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    teacher, student = _compressed()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run = SimpleNamespace(
        token=False, task="toy", tokenizer=tiny_tokenizer(), splits={"train": _examples()}, dense=teacher
    )
    argv = [
        "--finetune-ratios",
        "0.5",
        "--finetune-steps",
        "3",
        "--finetune-lr",
        "1e-3",
        "--finetune-objective",
        "distill",
    ]
    args = headline.parse_args(argv)
    tuned = headline.TaskRun.finetune(run, student, args, "toy|svd|||0.5||finetune_distill_3_0.001|0")
    assert not _changed(before, student) and _changed(before, tuned)
    log = [json.loads(line) for line in (tmp_path / "finetune_log.jsonl").read_text().splitlines()]
    assert [(row["key"], row["objective"], row["steps"]) for row in log] == [
        ("toy|svd|||0.5||finetune_distill_3_0.001|0", "distill", 3)
    ]
    run.token = True
    with pytest.raises(ValueError, match="--finetune-ratios supports sentence tasks only, not the token task 'toy'."):
        headline.TaskRun.finetune(run, student, args, "key")


def test_finetune_stage_names_the_recipe_and_the_report_shows_all_three_stages(capsys):
    assert headline.finetune_stage("distill", 125, 2e-4) == "finetune_distill_125_0.0002"
    stage = "finetune_distill_125_0.0002"
    base = {"estimator": "", "num_samples": "", "int8": "0", "seed": "", "block_kept": "0.4941"}
    rows = [
        base | {"task": "trec", "method": "dense", "ratio": "1.0", "stage": "none", "score": "0.834"},
        base | {"task": "trec", "method": "dense", "ratio": "1.0", "stage": stage, "score": "0.85"},
        base | {"task": "trec", "method": "svd", "ratio": "0.33", "stage": "none", "score": "0.268"},
        base | {"task": "trec", "method": "svd", "ratio": "0.33", "stage": "recovery", "score": "0.648"},
        base | {"task": "trec", "method": "svd", "ratio": "0.33", "stage": stage, "score": "0.8"},
    ]
    headline_report.finetune_table(rows, ["trec"], ["svd"])
    out = capsys.readouterr().out
    assert "## Recovery fine-tune `finetune_distill_125_0.0002` (distill, 125 steps, lr 0.0002), seed 0" in out
    assert "| trec | 83.4 / 85.0 | 0.33 | 0.4941 | 26.8 / 64.8 / 80.0 |" in out


def test_kd_loss_matches_a_brute_force_mix_of_cross_entropy_and_tempered_kl():
    student = torch.tensor([[1.0, -0.5, 0.25], [0.2, 0.3, -2.0]])
    teacher = torch.tensor([[0.5, 0.0, 1.0], [-1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])

    def softmax(row: list[float], temperature: float) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [v / sum(exps) for v in exps]

    cross_entropy = sum(-math.log(softmax(student[b].tolist(), 1.0)[labels[b]]) for b in range(2)) / 2
    kl = 0.0
    for b in range(2):
        p, q = softmax(teacher[b].tolist(), 2.0), softmax(student[b].tolist(), 2.0)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) / 2
    assert math.isclose(float(kd_loss(student, teacher, labels)), 0.5 * cross_entropy + 0.5 * 4 * kl, rel_tol=1e-6)
    assert math.isclose(float(kd_loss(student, teacher, labels, weight=0.0)), cross_entropy, rel_tol=1e-6)
    # the student equal to the teacher: only the label term is left
    assert math.isclose(
        float(kd_loss(teacher, teacher, labels)),
        0.5 * float(torch.nn.functional.cross_entropy(teacher, labels)),
        rel_tol=1e-6,
    )
    with pytest.raises(ValueError, match=r"student logits \(2, 3\) != teacher \(2, 2\)\."):
        kd_loss(student, teacher[:, :2], labels)


def test_label_kd_trains_the_factors_and_the_head_and_leaves_the_teacher():
    teacher, student = _compressed()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    info = recovery_finetune(
        student, tiny_tokenizer(), _examples(), "label+kd", teacher=teacher, steps=4, batch_size=4
    )
    changed = _changed(before, student)
    assert {name for name in changed if name.startswith("classifier.")} == {
        name for name in before if name.startswith("classifier.")
    }
    assert all(".down." in name or ".up." in name for name in changed if not name.startswith("classifier."))
    assert not _changed(teacher_before, teacher)
    head = sum(p.numel() for p in student.classifier.parameters())
    assert info["objective"] == "label+kd" and info["steps"] == 4
    assert info["trained_parameters"] == sum(p.numel() for p in block_parameters(student)) + head


def test_recovery_examples_skip_the_dev_split():
    train = [{"text": str(i), "label": 0} for i in range(2400)]
    assert recovery_examples(train) == train[:2000]
    assert recovery_examples(train, 2100) == train[:2000] + train[2300:2400]
    assert recovery_examples(train[:50]) == train[:50]  # a short split: all of it, as before
    with pytest.raises(ValueError, match="recovery_examples: size=2101 but the training split has 2100 examples "):
        recovery_examples(train, 2101)


def test_parse_candidate_defaults_to_one_pass_over_the_given_examples():
    assert parse_candidate("label:2e-4", 125) == ("label", 2e-4, 2000, 125)
    assert parse_candidate("label+kd:1e-4:2900", 125) == ("label+kd", 1e-4, 2900, 182)
    assert parse_candidate("label:1e-4:2000:250", 125) == ("label", 1e-4, 2000, 250)
    with pytest.raises(ValueError, match=r"candidate 'label': use objective:learning_rate\[:train_size\[:steps\]\]\."):
        parse_candidate("label", 125)


def test_finetune_stage_names_a_larger_training_set_and_headline_passes_the_seed(tmp_path, monkeypatch):
    assert headline.finetune_stage("label", 182, 2e-4, 2900) == "finetune_label_182_0.0002_n2900"
    assert headline.finetune_stage("label", 125, 2e-4, 2000) == "finetune_label_125_0.0002"
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    teacher, student = _compressed()
    train = _examples(2400)
    run = SimpleNamespace(token=False, task="toy", tokenizer=tiny_tokenizer(), splits={"train": train}, dense=teacher)
    seen = []
    monkeypatch.setattr(headline, "recovery_finetune", lambda *a, **k: seen.append((a[2], k["seed"])) or {})
    args = headline.parse_args(
        ["--finetune-steps", "2", "--finetune-train-size", "2100", "--finetune-seeds", "0", "2"]
    )
    assert args.finetune_seeds == [0, 2]
    headline.TaskRun.finetune(run, student, args, "key", seed=2)
    assert seen == [(train[:2000] + train[2300:2400], 2)]
