"""Distillation recovery (`finetune(..., teacher=...)`, `hf_fwsvd.distill`) on a tiny causal LM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import calibration_data, tiny_bert, tiny_llama

from hf_fwsvd import FWSVDConfig, compress
from hf_fwsvd.calibration import build_calibration_loader
from hf_fwsvd.distill import DistillationTrainer, distillation_loss
from hf_fwsvd.finetune import finetune


def wide_llama():
    """A tiny Llama with large weights, so its next-token distributions are far from uniform."""
    torch.manual_seed(0)
    return tiny_llama(initializer_range=0.5).eval()


def padded_batch(model, count: int = 6) -> dict[str, torch.Tensor]:
    """One batch of `count` examples of lengths 4-8, right-padded (so the attention mask has zeros)."""
    batch = next(iter(build_calibration_loader(calibration_data("llama", count), model=model, batch_size=count)))
    assert (batch["attention_mask"] == 0).any()
    return batch


def brute_force_kl(student_logits, teacher_logits, attention_mask, temperature):
    """``T^2 * KL(teacher || student)`` by hand, in float64, one position at a time over the unmasked positions."""
    total, count = 0.0, 0
    for row in range(student_logits.shape[0]):
        for position in range(student_logits.shape[1]):
            if not attention_mask[row, position]:
                continue
            s = [value / temperature for value in student_logits[row, position].tolist()]
            t = [value / temperature for value in teacher_logits[row, position].tolist()]
            log_zs, log_zt = math.log(sum(map(math.exp, s))), math.log(sum(map(math.exp, t)))
            total += sum(math.exp(tv - log_zt) * ((tv - log_zt) - (sv - log_zs)) for sv, tv in zip(s, t, strict=True))
            count += 1
    return temperature**2 * total / count


def distillation_trainer(student, teacher, temperature=1.0):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    return DistillationTrainer(model=student, args=args, teacher=teacher, distill_temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.5], ids=["T1", "T2.5"])
def test_trainer_loss_is_the_brute_force_kl_over_unpadded_positions(temperature):
    teacher = wide_llama()
    student = compress(copy.deepcopy(teacher), FWSVDConfig(method="svd", rank=3), show_progress=False)
    batch = padded_batch(teacher)
    loss = distillation_trainer(student, teacher, temperature).compute_loss(student, dict(batch))
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = brute_force_kl(student_logits, teacher_logits, batch["attention_mask"], temperature)
    assert expected > 0.01  # the rank-3 student really differs from its teacher
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_without_a_mask_averages_every_position():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    expected = brute_force_kl(student, teacher, torch.ones(2, 3, dtype=torch.long), 1.0)
    assert float(distillation_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradient():
    teacher = wide_llama()
    student = copy.deepcopy(teacher).train()
    batch = padded_batch(teacher)
    loss = distillation_trainer(student, teacher).compute_loss(student, dict(batch))
    loss.backward()
    assert abs(loss.item()) < 1e-6
    largest = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)
    assert largest < 1e-6
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "factors"])
def test_a_short_distillation_lowers_the_kl_to_the_teacher(lora):
    teacher = wide_llama()
    teacher_state = {key: value.clone() for key, value in teacher.state_dict().items()}
    student = compress(copy.deepcopy(teacher), FWSVDConfig(method="svd", rank=3), show_progress=False)
    data = calibration_data("llama", 16)
    batch = padded_batch(teacher, 16)

    def kl() -> float:
        student.eval()
        with torch.no_grad():
            return float(distillation_trainer(student, teacher).compute_loss(student, dict(batch)))

    before = kl()
    result = finetune(student, data, epochs=10, learning_rate=2e-2, batch_size=16, logging_steps=1,
                      show_progress=False, lora=lora or None, teacher=teacher)  # fmt: skip
    after = kl()
    assert after < 0.8 * before
    assert result.losses[0] == pytest.approx(before, rel=1e-4)  # the logged loss is the KL, not the LM loss
    assert not any("lora" in name for name, _ in student.named_modules())
    for key, value in teacher.state_dict().items():  # the teacher never trains
        assert torch.equal(value, teacher_state[key]), key
    assert all(p.requires_grad for p in teacher.parameters())


def test_logits_of_another_vocabulary_are_refused():
    with pytest.raises(ValueError) as error:
        distillation_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 7))
    assert str(error.value) == (
        "The teacher's logits have shape (1, 2, 7) but the student's (1, 2, 5): `teacher` must share the student's "
        "tokenizer and vocabulary."
    )


def compressed_llama():
    return compress(tiny_llama(), FWSVDConfig(method="svd", rank=3), show_progress=False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"distill_temperature": 2.0},
            "`distill_temperature=2.0` needs a `teacher=`: pass the dense model to distil from, or drop "
            "`distill_temperature`.",
        ),
        (
            {"teacher": "llama", "distill_temperature": 0.0},
            "`distill_temperature` must be > 0, got 0.0.",
        ),
        (
            {"teacher": "itself"},
            "`teacher` is the model being fine-tuned; pass a separate copy (e.g. the dense model before compression).",
        ),
        (
            {"teacher": "bert"},
            "Distillation (`teacher=`) supports causal LMs only, but `teacher` is a BertForSequenceClassification; "
            "fine-tune it without `teacher`.",
        ),
    ],
    ids=["temperature-without-teacher", "temperature-zero", "teacher-is-model", "teacher-not-causal"],
)
def test_bad_distillation_arguments_are_refused(arguments, message):
    model = compressed_llama()
    teachers = {"llama": tiny_llama(), "itself": model, "bert": tiny_bert()}
    if "teacher" in arguments:
        arguments = {**arguments, "teacher": teachers[arguments["teacher"]]}
    with pytest.raises(ValueError) as error:
        finetune(model, calibration_data("llama", 4), show_progress=False, **arguments)
    assert str(error.value) == message


def test_a_classifier_student_is_refused():
    model = tiny_bert()
    with pytest.raises(ValueError) as error:
        finetune(model, calibration_data("bert", 4), show_progress=False, teacher=tiny_llama())
    assert str(error.value) == (
        "Distillation (`teacher=`) supports causal LMs only, but `model` is a BertForSequenceClassification; "
        "fine-tune it without `teacher`."
    )


def test_the_model_card_says_the_fine_tune_was_a_distillation(tmp_path):
    teacher = wide_llama()
    student = compress(copy.deepcopy(teacher), FWSVDConfig(method="svd", rank=3), show_progress=False)
    finetune(student, calibration_data("llama", 4), epochs=1, batch_size=4, show_progress=False, teacher=teacher,
             distill_temperature=2.0)  # fmt: skip
    record = student.fwsvd_report.finetuning[-1]
    assert record.objective == "distillation from a teacher model (KL, temperature 2)"
    student.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    expected = "on 4 examples (distillation from a teacher model (KL, temperature 2), 1 epochs"
    assert f"Fine-tuned after compression with `hf_fwsvd.finetune` {expected}" in card
