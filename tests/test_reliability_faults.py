"""Fault injection: kill -9 at random instants of save and compress, random damage to tensors and shards, readers
racing writers, random option combinations.

Invariant everywhere: a load returns exactly a model some writer saved, or raises an hf_fwsvd error that names the
checkpoint (file or folder) and the fix. Never random weights, never a model that no writer saved.

The default run is bounded (about `HF_FWSVD_FAULT_SECONDS`, default 20 s, in total); set the variable higher for a
longer hunt. The slow suite runs the reader/writer race for at least 30 s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import calibration_data, same_outputs, tiny_bert
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import hf_fwsvd
from hf_fwsvd import FWSVDConfig, compress

AUTO = AutoModelForSequenceClassification
INPUT = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
BUDGET = float(os.environ.get("HF_FWSVD_FAULT_SECONDS", "20"))
SEED = int(os.environ.get("HF_FWSVD_FAULT_SEED", "0"))
TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(os.path.abspath(hf_fwsvd.__file__)))

WRITER = """
import sys, torch
sys.path[:0] = [{tests!r}, {src!r}]
from conftest import calibration_data, tiny_bert
from hf_fwsvd import FWSVDConfig, compress
out, mode = sys.argv[1], sys.argv[2]
models = {{}}
for rank, seed in ((4, 0), (2, 1)):
    torch.manual_seed(seed)
    models[rank] = compress(tiny_bert(), FWSVDConfig(rank=rank, method="svd"), show_progress=False)
print("ready", flush=True)
index = 0
while True:
    if mode == "compress":
        torch.manual_seed(index % 2)
        config = FWSVDConfig(rank=3, calibration_dataset=calibration_data("bert", 8), batch_size=4)
        model = compress(tiny_bert(), config, show_progress=False)
    else:
        model = models[(4, 2)[index % 2]]
    model.save_pretrained(out)
    print("saved", index, flush=True)
    index += 1
"""


def model_for(rank: int, seed: int):
    torch.manual_seed(seed)
    return compress(tiny_bert(), FWSVDConfig(rank=rank, method="svd"), show_progress=False).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**INPUT).logits


@pytest.fixture(scope="module")
def written():
    """The logits of every model a writer may save: svd rank 4 (seed 0), rank 2 (seed 1), fwsvd rank 3 (seeds 0/1)."""
    expected = [logits(model_for(4, 0)), logits(model_for(2, 1))]
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = FWSVDConfig(rank=3, calibration_dataset=calibration_data("bert", 8), batch_size=4)
        expected.append(logits(compress(tiny_bert(), config, show_progress=False)))
    return expected


def check_load(path, expected) -> str:
    """Load `path`: 'ok' when the logits equal one writer's exactly; 'missing' when there is no checkpoint yet;
    raise on a silent mismatch or an error that is not ours."""
    try:
        model = AUTO.from_pretrained(path)
    except (OSError, ValueError) as error:
        if not os.path.exists(path) and not any(".old-" in n for n in os.listdir(os.path.dirname(path))):
            return "missing"
        assert str(path) in str(error) or os.path.basename(str(path)) in str(error), f"error without the file: {error}"
        return "error"
    found = logits(model)
    assert any(same_outputs(found, candidate) for candidate in expected), "SILENT MISMATCH: no writer saved this"
    return "ok"


def hidden(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name)


@pytest.mark.parametrize("mode", ["save", "compress"])
def test_kill_9_at_random_instants(tmp_path, written, mode):
    """A writer process saves again and again; it is killed with SIGKILL at a random instant, then the folder is
    loaded. Any instant must leave a loadable checkpoint (or none before the first save), and the next load or save
    removes what the killed save left."""
    rng = random.Random(SEED)
    out = tmp_path / "out"
    model_for(4, 0).save_pretrained(out)
    script = WRITER.format(tests=TESTS, src=SRC)
    deadline, kills, outcomes = time.monotonic() + BUDGET / 4, 0, {}
    while time.monotonic() < deadline or kills < (2 if mode == "save" else 1):
        writer = subprocess.Popen([sys.executable, "-c", script, str(out), mode], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        for _ in range(rng.randint(0, 2)):
            writer.stdout.readline()
        time.sleep(rng.uniform(0, 0.3 if mode == "save" else 1.0))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        kills += 1
        outcome = check_load(out, written)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert outcome == "ok", outcome
        assert hidden(tmp_path) == []  # the load repaired and cleaned what the kill left
    print(f"{mode}: {kills} kills, outcomes {outcomes}")


def _damage(rng: random.Random, path) -> str:
    """Apply one random fault to the checkpoint copy in `path`; returns its description."""
    index_path = path / "model.fwsvd.safetensors.index.json"
    files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    target = path / rng.choice(files)
    kind = rng.choice(["drop-tensor", "truncate", "delete-file", "drop-index-entries", "zero-header"])
    if kind == "drop-index-entries" and not index_path.exists():
        kind = "drop-tensor"
    if kind == "drop-tensor":
        tensors = load_file(target)
        dropped = rng.choice(sorted(tensors))
        save_file({k: v for k, v in tensors.items() if k != dropped}, target, metadata={"format": "pt"})
        return f"{kind} {dropped} from {target.name}"
    if kind == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: rng.randrange(len(data))])
        return f"{kind} {target.name}"
    if kind == "delete-file":
        target.unlink()
        return f"{kind} {target.name}"
    if kind == "zero-header":
        data = bytearray(target.read_bytes())
        start = rng.randrange(8, 64)
        data[start : start + 8] = b"\x00" * 8
        target.write_bytes(bytes(data))
        return f"{kind} {target.name}"
    index = json.loads(index_path.read_text())
    shard = rng.choice(sorted(set(index["weight_map"].values())))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or rng.random() < 0.5}
    index_path.write_text(json.dumps(index))
    return f"{kind} of {shard}"


def test_random_damage_to_tensors_and_shards(tmp_path):
    """Random deletion of tensors, shard files and index entries, and truncation: every load is refused with an
    error naming the checkpoint, never a model with random weights."""
    rng = random.Random(SEED + 1)
    model = model_for(4, 0)
    for kind in ("single", "sharded"):
        model.save_pretrained(tmp_path / kind, **({"max_shard_size": "4KB"} if kind == "sharded" else {}))
    expected = logits(model)
    deadline, trials, refused = time.monotonic() + BUDGET / 4, 0, 0
    while time.monotonic() < deadline or trials < 20:
        kind = rng.choice(["single", "sharded"])
        path = tmp_path / f"trial-{trials}"
        shutil.copytree(tmp_path / kind, path)
        what = _damage(rng, path)
        try:
            loaded = AUTO.from_pretrained(path)
        except (ValueError, OSError) as error:
            assert str(path) in str(error), f"{what}: error does not name the checkpoint: {error}"
            refused += 1
        else:  # only possible when the fault touched nothing the model reads (index entries of a listed shard)
            assert what.startswith("drop-index"), f"{what}: loaded without an error"
            assert same_outputs(logits(loaded), expected), f"{what}: loaded different weights"
        shutil.rmtree(path)
        trials += 1
    assert refused > 0
    print(f"damage: {trials} trials, {refused} refused")


def _race(tmp_path, seconds: float) -> dict[str, int]:
    """Two writer processes save different models into one folder without pause while this process loads it."""
    out = tmp_path / "out"
    model_for(4, 0).save_pretrained(out)
    expected = [logits(model_for(4, 0)), logits(model_for(2, 1))]
    script = WRITER.format(tests=TESTS, src=SRC)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(out), "save"], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]  # fmt: skip
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready"
    counts = {"ok": 0, "error": 0, "missing": 0}
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            counts[check_load(out, expected)] += 1
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    with safe_open(os.path.join(out, "model.fwsvd.safetensors"), "pt") as handle:
        assert handle.keys()
    return counts


def test_readers_and_writers_race(tmp_path):
    counts = _race(tmp_path, max(4.0, BUDGET / 4))
    print(f"race: {counts}")
    assert counts["ok"] > 0 and counts["error"] == 0 and counts["missing"] == 0, counts


@pytest.mark.slow
def test_readers_and_writers_race_long(tmp_path):
    counts = _race(tmp_path, max(30.0, BUDGET))
    print(f"race (long): {counts}")
    assert counts["ok"] > 0 and counts["error"] == 0 and counts["missing"] == 0, counts


OPTIONS = {
    "rank": [None, 1, 2, 4, 15, 16],
    "rank_ratio": [None, 0.25, 0.5],
    "param_ratio": [None, 0.3, 1.0],
    "method": ["svd", "fwsvd", "asvd", "whiten", "tfwsvd", "fisher_whiten", "nope"],
    "target_modules": [None, ["query", "value"], "all-linear", ["lm_head"], [".*dense"]],
    "rank_pattern": [{}, {"query": 2}, {"qeury": 2}, {"value": 0.5}],
    "num_samples": [None, 1, 5],
    "batch_size": [1, 4],
}


def test_random_option_combinations(tmp_path):
    """Random configs: each either is refused with a ValueError (and the model is left as it was) or compresses,
    saves and reloads to exactly the same logits."""
    rng = random.Random(SEED + 2)
    deadline, trials, refused = time.monotonic() + BUDGET / 4, 0, 0
    while time.monotonic() < deadline or trials < 10:
        options = {key: rng.choice(values) for key, values in OPTIONS.items()}
        options = {key: value for key, value in options.items() if value is not None and value != {}}
        dtype = rng.choice([torch.float32, torch.bfloat16])
        torch.manual_seed(trials)
        model = tiny_bert().to(dtype)
        before = {key: value.clone() for key, value in model.state_dict().items()}
        try:
            config = FWSVDConfig(calibration_dataset=calibration_data("bert", 6), **options)
            compress(model, config, show_progress=False)
        except ValueError as error:
            assert str(error), options
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), f"changed: {options}"
            refused += 1
        else:
            path = tmp_path / f"t{trials}"
            model.save_pretrained(path)
            reloaded = AUTO.from_pretrained(path, dtype=dtype)
            assert same_outputs(logits(reloaded), logits(model)), options
        trials += 1
    print(f"options: {trials} trials, {refused} refused")
