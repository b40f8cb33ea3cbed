"""A short recovery fine-tune of a (compressed) MPNet task model, the same for every method.

What trains are the **block weights**: the parameters of the modules FWSVD compresses (`find_target_modules`), i.e.
the `down` / `up` factors (and biases) of a compressed model, or the dense `nn.Linear` layers of an uncompressed
one, so the same recipe can also be run on the dense model for a fair comparison. Embeddings and LayerNorms stay
frozen. Two objectives:

* ``"distill"``: no labels; the student's hidden states after every layer are pulled towards a frozen teacher's
  (the dense task model) by mean squared error over real (non-padding) tokens, averaged over layers. The head is
  not trained: the dense task model's head reads the recovered encoder.
* ``"label"``: the task loss on the training labels (cross-entropy, or squared error for regression); the head
  (`model.classifier`) trains together with the block weights.

Batches of similar-length examples in a seeded order (`benchmarks.task_model._length_grouped_batches`), AdamW with
linear warm-up and linear decay to 0, dropout on in the student. Run as a script to compare the objectives on a
development split carved from the training data (``--help``); `benchmarks/headline.py --finetune-ratios` scores the
chosen recipe on the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.task_model import _length_grouped_batches
from hf_fwsvd import FWSVDConfig
from hf_fwsvd.targets import find_target_modules

logger = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "RECOVERY_ARGS", "block_parameters", "distill_loss", "recovery_finetune", "dev_split"]

OBJECTIVES = ("distill", "label")
# The recipe scored on the test split, chosen on the development split (`dev_split`; whiten at rank ratio 0.33, dev
# accuracy: TREC dense 85.3, compressed 77.7, distill 2e-4 83.7, distill 1e-3 80.0, label 5e-5 88.7, label 2e-4 89.3;
# polarity dense 84.3, compressed 77.7, distill 2e-4 83.3; see benchmarks/README.md). 125 steps of 16 = one epoch of
# the 2,000 examples the task model's head was fitted on.
RECOVERY_ARGS = {
    "objective": "label",
    "steps": 125,
    "learning_rate": 2e-4,
    "batch_size": 16,
    "max_length": 64,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "train_size": 2000,
}
DEV_SIZE = 300


def dev_split(train: list[dict], train_size: int = RECOVERY_ARGS["train_size"]) -> list[dict]:
    """The development examples: the `DEV_SIZE` training examples after the first `train_size` (which the task
    model's head and the recovery fine-tune use), so they are training data that no fit has seen.

    Raises:
        `ValueError`: When the training split is too small to leave `DEV_SIZE` examples.
    """
    if len(train) < train_size + DEV_SIZE:
        raise ValueError(f"dev_split needs {train_size + DEV_SIZE} training examples, the split has {len(train)}.")
    return train[train_size : train_size + DEV_SIZE]


def block_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the modules FWSVD compresses in `model` (its factors once compressed), in model order."""
    return [p for module in find_target_modules(model, FWSVDConfig()).values() for p in module.parameters()]


def distill_loss(
    student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of the mean squared error per real token: ``mean_l sum_t m_t |s_lt - t_lt|^2 / (d sum_t m_t)``.

    Args:
        student_hidden, teacher_hidden (`tuple[torch.Tensor]`): Hidden states after each layer (``batch x tokens x
            d`` each), the embedding output excluded.
        mask (`torch.Tensor`): ``batch x tokens`` attention mask, 1 for real tokens.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}.")
    weight = mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denominator = weight.sum() * student_hidden[0].shape[-1]
    losses = [
        ((s - t).square() * weight).sum() / denominator for s, t in zip(student_hidden, teacher_hidden, strict=True)
    ]
    return torch.stack(losses).mean()


def recovery_finetune(
    model: torch.nn.Module,
    tokenizer,
    train: list[dict],
    objective: str = RECOVERY_ARGS["objective"],
    teacher: torch.nn.Module | None = None,
    steps: int = RECOVERY_ARGS["steps"],
    learning_rate: float = RECOVERY_ARGS["learning_rate"],
    batch_size: int = RECOVERY_ARGS["batch_size"],
    max_length: int = RECOVERY_ARGS["max_length"],
    warmup_ratio: float = RECOVERY_ARGS["warmup_ratio"],
    weight_decay: float = RECOVERY_ARGS["weight_decay"],
    seed: int = 0,
) -> dict:
    """Fine-tunes `model`'s block weights (and, for ``"label"``, its head) in place for `steps` steps.

    Args:
        model (`torch.nn.Module`): A sequence classifier (``.classifier`` head), compressed or dense; left in eval
            mode with every parameter's ``requires_grad`` as it was.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        train (`list[dict]`): Training examples ``{"text": str, "label": ...}`` (labels unused by ``"distill"``).
        objective (`str`, *optional*, defaults to ``"label"``): ``"distill"`` or ``"label"``, see the module.
        teacher (`torch.nn.Module`, *optional*): The frozen model to distil from; required for ``"distill"``.
        steps (`int`, *optional*, defaults to 125): Optimiser steps (cycling over `train` if needed).
        learning_rate (`float`, *optional*, defaults to 2e-4): Peak AdamW learning rate.
        batch_size (`int`, *optional*, defaults to 16): Examples per step.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        warmup_ratio (`float`, *optional*, defaults to 0.1): Fraction of steps of linear warm-up.
        weight_decay (`float`, *optional*, defaults to 0.0): AdamW weight decay (not on biases).
        seed (`int`, *optional*, defaults to 0): Seed of the batch order and of dropout.

    Returns:
        `dict`: ``{"objective", "steps", "examples", "trained_parameters", "train_seconds", "first_loss",
        "final_loss"}`` (losses averaged over the first / last 8 steps).

    Raises:
        `ValueError`: For an unknown `objective`, ``"distill"`` without a `teacher`, or a non-positive `steps`.
    """
    from transformers import get_linear_schedule_with_warmup

    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}.")
    if objective == "distill" and teacher is None:
        raise ValueError('objective="distill" needs teacher= (the dense task model).')
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}.")
    trained = block_parameters(model) + (list(model.classifier.parameters()) if objective == "label" else [])
    trained_ids = {id(p) for p in trained}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in trained_ids)
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)
    encoded = tokenizer([e["text"] for e in train], truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    regression = model.config.num_labels == 1
    labels = torch.tensor([e["label"] for e in train], dtype=torch.float32 if regression else torch.long)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if teacher is not None:
        teacher.eval()

    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        while len(losses) < steps:
            for batch_idx in _length_grouped_batches(lengths, batch_size, generator):
                batch = tokenizer.pad({"input_ids": [encoded[i] for i in batch_idx]}, return_tensors="pt")
                if objective == "label":
                    loss = model(**batch, labels=labels[batch_idx]).loss
                else:
                    with torch.no_grad():
                        target = teacher.base_model(**batch, output_hidden_states=True).hidden_states[1:]
                    hidden = model.base_model(**batch, output_hidden_states=True).hidden_states[1:]
                    loss = distill_loss(hidden, target, batch["attention_mask"])
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if len(losses) % 16 == 0 or len(losses) == steps:
                    logger.info(
                        "step %d/%d loss %.4f (%.0f s)", len(losses), steps, loss.item(), time.perf_counter() - start
                    )
                if len(losses) == steps:
                    break
    finally:
        model.eval()
        for name, param in model.named_parameters():
            param.requires_grad_(previous[name])
    return {
        "objective": objective,
        "steps": len(losses),
        "examples": len(losses) * batch_size,
        "trained_parameters": sum(p.numel() for p in trained),
        "train_seconds": round(time.perf_counter() - start, 1),
        "first_loss": round(sum(losses[:8]) / len(losses[:8]), 5),
        "final_loss": round(sum(losses[-8:]) / len(losses[-8:]), 5),
    }


def compare_on_dev(args: argparse.Namespace) -> dict:
    """Scores the dense model, the compressed model and each candidate recipe on `dev_split` of the training data.

    The compressed model is built exactly as `benchmarks/headline.py` builds it for seed 0 (same calibration sample,
    same settings); every candidate starts from a copy of it and trains on the first ``RECOVERY_ARGS["train_size"]``
    training examples. Nothing here reads the test split.
    """
    from benchmarks.headline import CALIBRATION, TaskRun, calibration_sample, predict, score
    from hf_fwsvd import compress

    run = TaskRun(args.task)
    train = run.splits["train"]
    dev = dev_split(train)
    dev_labels = torch.tensor([e["label"] for e in dev], dtype=torch.float32 if run.regression else torch.long)

    def dev_score(model: torch.nn.Module) -> float:
        return round(score(predict(model, run.tokenizer, dev), dev_labels, run.regression)[0], 5)

    calibration = calibration_sample(train, 128, 0)
    config = FWSVDConfig(
        method=args.method,
        rank_ratio=args.ratio,
        calibration_dataset=calibration,
        tokenizer=run.tokenizer,
        num_samples=len(calibration),
        **CALIBRATION,
    )
    compressed = copy.deepcopy(run.dense)
    compress(compressed, config, show_progress=False)
    result = {
        "task": args.task,
        "method": args.method,
        "ratio": args.ratio,
        "dev": f"train[{RECOVERY_ARGS['train_size']}:{RECOVERY_ARGS['train_size'] + DEV_SIZE}]",
        "dense": dev_score(run.dense),
        "compressed": dev_score(compressed),
        "candidates": [],
    }
    logger.info("dev: dense %.4f, compressed %.4f", result["dense"], result["compressed"])
    for candidate in args.candidates:
        objective, learning_rate = candidate.split(":")
        model = copy.deepcopy(compressed)
        info = recovery_finetune(
            model,
            run.tokenizer,
            train[: RECOVERY_ARGS["train_size"]],
            objective,
            teacher=run.dense,
            steps=args.steps,
            learning_rate=float(learning_rate),
        )
        info |= {"learning_rate": float(learning_rate), "dev": dev_score(model)}
        logger.info("dev: %s -> %.4f (%s)", candidate, info["dev"], info)
        result["candidates"].append(info)
    name = f"recovery_dev_{args.task}_{args.method}_{'_'.join(args.candidates).replace(':', '-')}.json"
    out = Path(__file__).resolve().parent / "results" / "headline" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Compare recovery recipes on a development split of the training data."
    )
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", default="whiten")
    parser.add_argument("--ratio", type=float, default=0.33)
    parser.add_argument("--steps", type=int, default=RECOVERY_ARGS["steps"])
    parser.add_argument(
        "--candidates", nargs="+", default=["distill:2e-4", "label:5e-5"], help="objective:learning_rate pairs"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "hf_fwsvd"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    print(json.dumps(compare_on_dev(args), indent=2))


if __name__ == "__main__":
    main()
