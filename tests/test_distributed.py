"""Data-parallel Fisher for real: two CPU processes (gloo) under `accelerate launch` against one in-process run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker
import pytest
import torch
from safetensors.torch import load_file

from hf_fwsvd.distributed import ProcessInfo, all_reduce_sum, is_main_process, process_info, shard_batches
from hf_fwsvd.methods import available_methods, get_method
from hf_fwsvd.pipeline import overrides_refine_model

TESTS = Path(__file__).resolve().parent
ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path, processes: int = 2) -> None:
    # `--multi_gpu` selects accelerate's torch.distributed launcher; with no GPU visible the processes use gloo.
    # (`--cpu` alone starts one process unless MPI is installed.)
    command = [
        ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(TESTS / "distributed_worker.py"), str(out_dir),
    ]  # fmt: skip
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process output dir, single-process output dir), the latter computed in this process."""
    if ACCELERATE is None:
        pytest.fail("The `accelerate` command is not installed next to this Python; install accelerate.")
    distributed = tmp_path_factory.mktemp("two-processes")
    single = tmp_path_factory.mktemp("one-process")
    _launch(distributed)
    distributed_worker.run(str(single))
    return distributed, single


def _batches(directory: Path, rank: int) -> dict:
    return json.loads((directory / f"batches-rank{rank}.json").read_text())


def test_each_process_gets_whole_batches_round_robin_without_padding(runs):
    distributed, single = runs
    assert _batches(single, 0) == {"batches": [2, 2, 2, 2, 1], "world_size": 1}
    assert _batches(distributed, 0) == {"batches": [2, 2, 1], "world_size": 2}
    assert _batches(distributed, 1) == {"batches": [2, 2], "world_size": 2}


@pytest.mark.parametrize("kind", ["importances", "importances-list"], ids=["dataloader", "list-of-batches"])
def test_importances_equal_single_process(runs, kind):
    distributed, single = runs
    reference = load_file(single / f"{kind}-rank0.safetensors")
    rank0 = load_file(distributed / f"{kind}-rank0.safetensors")
    rank1 = load_file(distributed / f"{kind}-rank1.safetensors")
    assert sorted(rank0) == sorted(reference) and len(reference) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    for name, expected in reference.items():
        assert torch.equal(rank0[name], rank1[name]), name  # every process returns the same summed result
        torch.testing.assert_close(rank0[name], expected, rtol=1e-5, atol=0)
    # only the main process wrote the resumable copy, and it holds the summed importances
    cached = load_file(distributed / "importances.safetensors")
    assert all(
        torch.equal(cached[name], load_file(distributed / "importances-rank0.safetensors")[name]) for name in cached
    )


def test_checkpoint_equals_single_process(runs):
    distributed, single = runs
    assert sorted(os.listdir(distributed / "checkpoint")) == sorted(os.listdir(single / "checkpoint"))
    assert sorted(os.listdir(distributed)) == sorted(os.listdir(single) + ["batches-rank1.json"]
        + ["importances-rank1.safetensors", "importances-list-rank1.safetensors"])  # fmt: skip
    config = json.loads((distributed / "checkpoint" / "config.json").read_text())["quantization_config"]
    expected_config = json.loads((single / "checkpoint" / "config.json").read_text())["quantization_config"]
    assert config == expected_config
    tensors = load_file(distributed / "checkpoint" / "model.fwsvd.safetensors")
    expected = load_file(single / "checkpoint" / "model.fwsvd.safetensors")
    assert sorted(tensors) == sorted(expected)
    factors = [key for key in expected if key.endswith((".down.weight", ".up.weight"))]
    assert len(factors) == 28
    for key, value in expected.items():
        if key in factors:
            continue
        assert torch.equal(tensors[key], value), key
    for module in {key.rsplit(".", 2)[0] for key in factors}:
        product = tensors[f"{module}.up.weight"] @ tensors[f"{module}.down.weight"]
        reference = expected[f"{module}.up.weight"] @ expected[f"{module}.down.weight"]
        torch.testing.assert_close(product, reference, rtol=1e-4, atol=1e-6)


def _products(directory: Path) -> dict[str, torch.Tensor]:
    """``up @ down`` of every factorised module, and every other tensor as it is."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    result = {key: value for key, value in tensors.items() if not key.endswith((".down.weight", ".up.weight"))}
    for key in tensors:
        if key.endswith(".up.weight"):
            module = key[: -len(".up.weight")]
            result[module] = tensors[key] @ tensors[f"{module}.down.weight"]
    return result


@pytest.mark.parametrize("method", available_methods())
def test_every_method_two_processes_and_layerwise_equal_single_process_in_memory(runs, method):
    distributed, single = runs
    assert json.loads((distributed / "methods.json").read_text()) == list(available_methods())
    reference_dir = single / "methods" / method
    expected = _products(reference_dir)
    assert sum(key.endswith(("proj",)) for key in expected) == 14  # every targeted module factorised
    config = json.loads((reference_dir / "config.json").read_text())["quantization_config"]
    assert config["method"] == method
    block_by_block = not overrides_refine_model(get_method(method))  # compress_layerwise refuses the others
    directories = [distributed / "methods" / method]
    if block_by_block:
        directories += [distributed / "layerwise" / method, single / "layerwise" / method]
    for directory in directories:
        produced = _products(directory)
        assert sorted(produced) == sorted(expected), directory
        for key, value in expected.items():
            torch.testing.assert_close(produced[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        other = json.loads((directory / "config.json").read_text())["quantization_config"]
        assert other["ranks"] == config["ranks"] and other["method"] == method
    if not block_by_block:
        assert not (single / "layerwise" / method).exists()
        return
    # in one process, block by block gives exactly the in-memory tensors
    layerwise = _products(single / "layerwise" / method)
    assert all(torch.equal(layerwise[key], value) for key, value in expected.items())


def test_single_process_helpers_are_no_ops():
    info = process_info()
    assert info == ProcessInfo(0, 1, torch.device("cpu")) and not info.is_distributed and info.is_main
    assert is_main_process()
    batches = [1, 2, 3]
    assert shard_batches(batches, info) is batches
    tensor = torch.arange(3.0)
    reduced = all_reduce_sum(tensor, info)
    assert torch.equal(reduced, tensor) and reduced is not tensor


def test_shard_batches_splits_any_iterable_round_robin():
    batches = [{"id": i} for i in range(5)]
    shards = [list(shard_batches(iter(batches), ProcessInfo(rank, 2, torch.device("cpu")))) for rank in range(2)]
    assert shards == [[batches[0], batches[2], batches[4]], [batches[1], batches[3]]]
