"""Reliability: processes saving into the same output directory never produce a mixed or half-written checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import torch
from conftest import tiny_bert
from reliability_cases import expect_warning
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification

from hf_fwsvd import FWSVDConfig, compress

INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
ROUNDS = 4


def compressed(rank: int, seed: int):
    torch.manual_seed(seed)
    return compress(tiny_bert(), FWSVDConfig(rank=rank, method="svd"), show_progress=False).eval()


def _save_repeatedly(model, out: str, start, errors) -> None:
    try:
        start.wait()
        for _ in range(ROUNDS):
            model.save_pretrained(out)
    except BaseException as error:  # report to the parent instead of dying silently
        errors.put(f"{type(error).__name__}: {error}")
        raise


def test_two_processes_saving_into_the_same_directory(tmp_path):
    """Two processes (ranks 2 and 4) save into one directory at the same time, several times each. Every save must
    succeed and the result must be one complete checkpoint: config, rank map and weights all from the same writer."""
    models = {2: compressed(2, seed=1), 4: compressed(4, seed=2)}
    out = str(tmp_path / "out")
    context = multiprocessing.get_context("fork")
    start, errors = context.Event(), context.Queue()
    workers = [context.Process(target=_save_repeatedly, args=(m, out, start, errors)) for m in models.values()]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
    messages = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert [worker.exitcode for worker in workers] == [0, 0], messages
    assert sorted(name for name in os.listdir(tmp_path) if not name.endswith(".lock")) == ["out"]
    # + the model card and the report
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "fwsvd_report.json", "model.fwsvd.safetensors"]
    ranks = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ranks"]
    rank = set(ranks.values())
    assert rank in ({2}, {4})
    with safe_open(os.path.join(out, "model.fwsvd.safetensors"), "pt") as handle:
        assert handle.get_slice("bert.encoder.layer.0.attention.self.query.down.weight").get_shape()[0] == rank.pop()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    writer = models[reloaded.bert.encoder.layer[0].attention.self.query.rank]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**INPUT).logits, writer(**INPUT).logits)


def test_save_waits_for_another_process_holding_the_lock(tmp_path, caplog):
    out = tmp_path / "out"
    lock = tmp_path / ".out.fwsvd.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom filelock import FileLock\nwith FileLock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(1.5)\n",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    begin = time.monotonic()
    with caplog.at_level("WARNING", logger="hf_fwsvd.atomic_dir"):
        compressed(4, seed=0).save_pretrained(out)
    waited = time.monotonic() - begin
    assert holder.wait(timeout=30) == 0
    assert waited > 0.5, waited  # it really waited for the other writer
    # + the model card and the report
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "fwsvd_report.json", "model.fwsvd.safetensors"]
    expect_warning(
        caplog,
        "hf_fwsvd.atomic_dir",
        f"Another process is saving into {out}; waiting for it to finish (lock {lock}).",
        entry="save_pretrained",
        replacements={str(tmp_path): "<tmp>"},
    )
