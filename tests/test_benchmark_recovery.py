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
from benchmarks.recovery import block_parameters, dev_split, distill_loss, recovery_finetune
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
    with pytest.raises(ValueError, match=r"objective='kd' is not one of \('distill', 'label'\)\."):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "kd", teacher=teacher)
    with pytest.raises(ValueError, match=r'objective="distill" needs teacher= \(the dense task model\)\.'):
        recovery_finetune(student, tiny_tokenizer(), _examples(), "distill")
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
