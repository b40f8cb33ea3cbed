"""Knowledge distillation for recovery: the compressed student learns the dense teacher's next-token distributions.

The language-model loss teaches only the one token that came next; the teacher's distribution over the whole
vocabulary says at every position how likely each token is, which is a far richer signal per token. The loss is the
Kullback-Leibler divergence from the teacher to the student at temperature ``T``,

    ``T^2 * mean over non-padding positions of sum_v p_t(v) (log p_t(v) - log p_s(v))``,  ``p = softmax(logits / T)``

(the ``T^2`` keeps the gradient scale independent of ``T``, as in Hinton et al. 2015). It is zero exactly when the
student's distributions equal the teacher's. `finetune(..., teacher=dense)` trains with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional
from transformers import Trainer

__all__ = ["DistillationTrainer", "distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` per position, averaged over the positions where `attention_mask` is 1.

    Args:
        student_logits (`torch.Tensor`): ``(batch, length, vocab)`` logits of the model being trained.
        teacher_logits (`torch.Tensor`): The teacher's logits on the same inputs, same shape.
        attention_mask (`torch.Tensor`, *optional*): ``(batch, length)``, 0 on padding; `None` averages over every
            position.
        temperature (`float`, *optional*, defaults to 1.0): Softmax temperature ``T`` of both distributions.

    Raises:
        `ValueError`: When the shapes differ (e.g. a teacher with another vocabulary).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"The teacher's logits have shape {tuple(teacher_logits.shape)} but the student's "
            f"{tuple(student_logits.shape)}: `teacher` must share the student's tokenizer and vocabulary."
        )
    student_log_probs = functional.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = functional.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    if attention_mask is None:
        return per_position.mean() * temperature**2
    mask = attention_mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0) * temperature**2


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss is [`distillation_loss`] against a frozen `teacher` instead of the model's own loss.

    Args:
        teacher (`nn.Module`): The reference model (usually the dense original); put in eval mode, run under
            `torch.no_grad()` (its parameters keep their `requires_grad`) and moved to the student's device on first
            use.
        distill_temperature (`float`, *optional*, defaults to 1.0): The softmax temperature ``T``.
        *args, **kwargs: Passed to `Trainer`.
    """

    # the loss is a per-batch mean: Trainer divides it by the gradient-accumulation steps itself
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module, distill_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.distill_temperature = distill_temperature

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """[`distillation_loss`] of `model`'s logits against the teacher's on `inputs` (labels are not used)."""
        features = {key: value for key, value in inputs.items() if key != "labels"}
        device = features["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            teacher_logits = self.teacher(**features).logits
        outputs = model(**features)
        loss = distillation_loss(
            outputs.logits, teacher_logits, features.get("attention_mask"), self.distill_temperature
        )
        return (loss, outputs) if return_outputs else loss
