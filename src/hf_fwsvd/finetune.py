"""Recovery fine-tuning of a compressed model on task data with the transformers `Trainer`.

The paper fine-tunes the compressed model for 3 epochs at learning rate 2e-5 and recovers most of the lost accuracy.
A compressed model trains like any other: its `LowRankLinear` factors are ordinary parameters, and the FWSVD
quantizer reports itself trainable (`is_qat_trainable`), so `Trainer` accepts it. The factors keep their ranks, so
the fine-tuned model saves and reloads as the same compressed checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import infer_task, tokenize_examples
from .layers import LowRankLinear
from .lora import attach_lora, merge_lora
from .provenance import record_finetune
from .report import FinetuneRecord

__all__ = ["FinetuneResult", "finetune"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """The fine-tuned model (the same object, trained in place) and its training log.

    Args:
        model (`nn.Module`): The fine-tuned model, in eval mode.
        losses (`list[float]`): Training loss at each logging step.
        train_loss (`float`): Mean training loss over the run, as `Trainer` reports it.
        log_history (`list[dict]`): `Trainer.state.log_history`.
    """

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    train_loss: float = float("nan")
    log_history: list[dict[str, Any]] = field(default_factory=list)


def check_distillation(model: nn.Module, teacher: nn.Module | None, distill_temperature: float) -> None:
    """Refuse the distillation settings `finetune` cannot run.

    Raises:
        `ValueError`: A temperature without a teacher or not above 0, the teacher being the model itself, or a model
            or teacher that is not a causal LM.
    """
    if teacher is None:
        if distill_temperature != 1.0:
            raise ValueError(
                f"`distill_temperature={distill_temperature}` needs a `teacher=`: pass the dense model to distil "
                "from, or drop `distill_temperature`."
            )
        return
    if not distill_temperature > 0:
        raise ValueError(f"`distill_temperature` must be > 0, got {distill_temperature}.")
    if teacher is model:
        raise ValueError(
            "`teacher` is the model being fine-tuned; pass a separate copy (e.g. the dense model before compression)."
        )
    for role, module in (("model", model), ("teacher", teacher)):
        if infer_task(module) != "causal-lm":
            raise ValueError(
                f"Distillation (`teacher=`) supports causal LMs only, but `{role}` is a {type(module).__name__}; "
                "fine-tune it without `teacher`."
            )


def finetune(
    model: nn.Module,
    train_examples: Any,
    tokenizer: Any = None,
    output_dir: str | os.PathLike | None = None,
    epochs: float = 3.0,
    learning_rate: float = 2e-5,
    batch_size: int = 16,
    max_length: int = 128,
    num_samples: int | None = None,
    train_only_low_rank: bool = False,
    logging_steps: int = 10,
    seed: int = 0,
    show_progress: bool = True,
    lora: Any = None,
    teacher: nn.Module | None = None,
    distill_temperature: float = 1.0,
    **training_args: Any,
) -> FinetuneResult:
    """Fine-tune `model` (usually FWSVD-compressed) on `train_examples` and optionally save it.

    Args:
        model (`nn.Module`): A transformers model with a task head; trained in place.
        train_examples: Task data in any form `FWSVDConfig.calibration_dataset` accepts (texts for a causal LM,
            dicts with `text` and `label` for a classifier, or tokenised `input_ids`).
        tokenizer (*optional*): Tokenizer for text data; saved next to the model when `output_dir` is given.
        output_dir (`str` or `os.PathLike`, *optional*): Where to `save_pretrained` the fine-tuned model.
        epochs (`float`, *optional*, defaults to 3.0): Training epochs (the paper's setting).
        learning_rate (`float`, *optional*, defaults to 2e-5): AdamW learning rate (the paper's setting).
        batch_size (`int`, *optional*, defaults to 16): Per-device batch size.
        max_length (`int`, *optional*, defaults to 128): Token truncation length.
        num_samples (`int`, *optional*): Use only the first `num_samples` examples.
        train_only_low_rank (`bool`, *optional*, defaults to `False`): Freeze every parameter except the
            `LowRankLinear` factors (and their biases).
        logging_steps (`int`, *optional*, defaults to 10): Steps between loss logs.
        seed (`int`, *optional*, defaults to 0): Seed for the LoRA adapters' initialisation, data order and dropout.
        show_progress (`bool`, *optional*, defaults to `True`): `Trainer`'s progress bar.
        lora (`peft.LoraConfig` or `bool`, *optional*): Train LoRA adapters on the `down` / `up` factors instead of
            the factors themselves (`True`: rank 8 on every factor, see `hf_fwsvd.lora`), then merge them into the
            factors: the model keeps its ranks and saves as a normal FWSVD checkpoint.
        teacher (`nn.Module`, *optional*): Distil from this model (usually the dense original of a causal LM): the loss
            becomes ``KL(teacher || model)`` of the next-token distributions, averaged over non-padding positions
            (see `hf_fwsvd.distill`), instead of the model's own loss. The teacher runs in eval mode without
            gradients. Causal LMs only.
        distill_temperature (`float`, *optional*, defaults to 1.0): Softmax temperature of the distillation (the
            loss is scaled by its square); only with `teacher`.
        training_args: Further `TrainingArguments` fields (e.g. `weight_decay`, `warmup_steps`, `max_steps`;
            transformers 5 takes a warm-up ratio as a float `warmup_steps` and has no `warmup_ratio`).

    Returns:
        [`FinetuneResult`]

    Raises:
        `ValueError`: For bad data (see `build_calibration_loader`), when nothing would be trained, or for a
            distillation `finetune` cannot run (see `check_distillation`).
    """
    from transformers import Trainer, TrainingArguments, set_seed

    from .distill import DistillationTrainer

    check_distillation(model, teacher, distill_temperature)
    examples, collate = tokenize_examples(train_examples, tokenizer, model, num_samples, max_length, batch_size)
    trained = model
    if lora:
        if train_only_low_rank:
            raise ValueError(
                "Give `lora=` or `train_only_low_rank=True`, not both: with LoRA only the adapters train."
            )
        set_seed(seed)  # the adapters' random initialisation, so `seed` fixes the whole run
        trained = attach_lora(model, lora)
    elif train_only_low_rank:
        low_rank = {
            id(p) for module in model.modules() if isinstance(module, LowRankLinear) for p in module.parameters()
        }
        if not low_rank:
            raise ValueError(
                f"`train_only_low_rank=True` but {type(model).__name__} has no LowRankLinear module: compress it "
                "first."
            )
        for param in model.parameters():
            param.requires_grad_(id(param) in low_rank)
    if not any(param.requires_grad for param in trained.parameters()):
        raise ValueError(f"No parameter of {type(model).__name__} requires grad: nothing to fine-tune.")
    with tempfile.TemporaryDirectory(prefix="hf_fwsvd-finetune-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not show_progress,
            **training_args,
        )
        trainer_class, distillation = Trainer, {}
        if teacher is not None:
            trainer_class = DistillationTrainer
            distillation = {"teacher": teacher, "distill_temperature": distill_temperature}
        trainer = trainer_class(
            model=trained, args=args, train_dataset=examples, data_collator=collate, **distillation
        )
        output = trainer.train()
        history = list(trainer.state.log_history)
    if lora:
        model = merge_lora(trained)
    model.eval()
    record_finetune(
        model,
        FinetuneRecord(
            by="hf_fwsvd.finetune",
            examples=len(examples),
            epochs=None if training_args.get("max_steps", -1) > 0 else epochs,
            steps=output.global_step,
            learning_rate=learning_rate,
            train_loss=output.training_loss,
            objective=None
            if teacher is None
            else f"distillation from a teacher model (KL, temperature {distill_temperature:g})",
        ),
    )
    losses = [entry["loss"] for entry in history if "loss" in entry]
    logger.info(
        "Fine-tuned %s for %s epochs: mean training loss %.4f.", type(model).__name__, epochs, output.training_loss
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(output_dir)
    return FinetuneResult(model=model, losses=losses, train_loss=output.training_loss, log_history=history)
