"""Performance and scale (issue #14): the fused finite check on reload, rank rounding, bounded-memory compression."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_fwsvd.checkpoint_checks import check_factors_finite
from hf_fwsvd.layers import LowRankLinear


def _two_factorised(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(LowRankLinear(8, 6, 2, dtype=dtype), LowRankLinear(6, 4, 3, dtype=dtype))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "minus-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_finite_check_names_the_first_bad_factor(value, dtype):
    model = _two_factorised(dtype)
    with torch.no_grad():
        model[1].up.weight[2, 1] = value
    with pytest.raises(ValueError) as info:
        check_factors_finite(model)
    assert str(info.value) == (
        "The checkpoint's `1.up.weight` holds NaN/Inf values: the weights file is corrupt or was saved from a broken "
        "model. Re-export it with `save_pretrained` from the compressed model."
    )


def test_finite_check_sees_inf_and_minus_inf_that_cancel_in_a_sum():
    model = _two_factorised()
    with torch.no_grad():
        model[0].down.weight[0, 0] = float("inf")
        model[0].down.weight[1, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"`0\.down\.weight` holds NaN/Inf"):
        check_factors_finite(model)


def test_finite_check_accepts_finite_factors_whose_sum_overflows():
    model = _two_factorised()
    with torch.no_grad():
        model[0].up.weight.fill_(torch.finfo(torch.float32).max)  # every value finite, their sum is not
    assert not torch.isfinite(model[0].up.weight.sum(dtype=torch.float32))
    check_factors_finite(model)  # no error: the exact element-wise check clears it


def test_finite_check_skips_meta_factors():
    with torch.device("meta"):
        model = nn.Sequential(LowRankLinear(8, 6, 2))
    check_factors_finite(model)


# -- rank rounding ----------------------------------------------------------------------------------------------------

SHAPES = {"q": (384, 384), "ff_in": (1536, 384), "ff_out": (384, 1536), "small": (6, 40)}


@pytest.mark.parametrize(
    ("rule", "multiple", "expected"),
    [
        ({"rank_ratio": 0.33}, None, {"q": 127, "ff_in": 127, "ff_out": 127, "small": 2}),
        ({"rank_ratio": 0.33}, 8, {"q": 120, "ff_in": 120, "ff_out": 120, "small": 2}),
        ({"rank_ratio": 0.33}, 16, {"q": 112, "ff_in": 112, "ff_out": 112, "small": 2}),
        ({"rank": 5}, 4, {"q": 4, "ff_in": 4, "ff_out": 4, "small": 4}),
        # param_ratio 0.8 is clamped to the largest paying rank (153 for 384x384) before rounding down to 152
        ({"param_ratio": 0.8}, 8, {"q": 152, "ff_in": 240, "ff_out": 240, "small": 4}),
    ],
    ids=["ratio", "ratio-8", "ratio-16", "rank-4", "param-ratio-8"],
)
def test_rank_multiple_rounds_every_rank_down(rule, multiple, expected):
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.payoff import max_paying_rank
    from hf_fwsvd.ranks import resolve_ranks

    ranks = resolve_ranks(SHAPES, FWSVDConfig(rank_multiple=multiple, **rule))
    assert ranks == expected
    unrounded = resolve_ranks(SHAPES, FWSVDConfig(**rule))
    for name, rank in ranks.items():
        assert rank <= unrounded[name]
        if multiple is not None and unrounded[name] >= multiple:
            assert rank % multiple == 0
        if "param_ratio" in rule:
            assert rank <= max_paying_rank(*SHAPES[name])


def test_rank_multiple_applies_to_rank_pattern_overrides():
    from hf_fwsvd import FWSVDConfig
    from hf_fwsvd.ranks import resolve_ranks

    config = FWSVDConfig(rank_ratio=0.1, rank_multiple=8, rank_pattern={"q": 100, "ff_in": 0.5})
    assert resolve_ranks(SHAPES, config) == {"q": 96, "ff_in": 192, "ff_out": 32, "small": 1}


@pytest.mark.parametrize("value", [0, -8, 8.0, True], ids=["zero", "negative", "float", "bool"])
def test_rank_multiple_must_be_a_positive_int(value):
    from hf_fwsvd import FWSVDConfig

    with pytest.raises(ValueError) as info:
        FWSVDConfig(rank_multiple=value)
    assert str(info.value).startswith("`rank_multiple` must be a positive int, got ")


def test_rank_multiple_survives_save_and_reload(tmp_path, sample_input):
    from conftest import tiny_bert
    from transformers import BertForSequenceClassification

    from hf_fwsvd import FWSVDConfig, compress

    torch.manual_seed(0)
    model = tiny_bert().eval()
    compress(model, FWSVDConfig(rank_ratio=0.4, rank_multiple=4, method="svd"), show_progress=False)
    # every targeted module has full rank 16: round(0.4 * 16) = 6 -> 4
    assert set(model.config.quantization_config.ranks.values()) == {4}
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.rank_multiple == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**sample_input).logits, model(**sample_input).logits, rtol=0, atol=0)


# -- compressing a model larger than the memory limit -----------------------------------------------------------------


def _llama(hidden: int, intermediate: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _compress_under_limit(tmp_path, size: dict, budget_mib: float, shard_size: str) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hf_fwsvd import FWSVDConfig, save_importances
    from hf_fwsvd.replace import shape_of
    from hf_fwsvd.targets import find_target_modules

    dense = _llama(**size)
    # Sharded like every large checkpoint: safetensors maps a whole file privately, which counts against the limit.
    dense.save_pretrained(tmp_path / "dense", max_shard_size=shard_size)
    _llama(hidden=16, intermediate=32, layers=2, vocab=64).save_pretrained(tmp_path / "warmup")
    generator = torch.Generator().manual_seed(0)
    importances = {
        name: torch.rand(shape_of(module)[1], generator=generator) + 0.05
        for name, module in find_target_modules(dense, FWSVDConfig()).items()
    }
    save_importances(importances, tmp_path / "importances.safetensors")
    worker = Path(__file__).with_name("memory_limit_worker.py")
    # The worker's footprint must not depend on glibc's heuristics. One malloc arena: glibc opens another (more
    # anonymous memory) when threads contend for one. A fixed mmap threshold: by default glibc raises the threshold
    # each time a large block is freed, so later tensors of a few MiB come from the brk heap, whose fragmentation
    # then counts against the limit. Measured without a limit on the 2-core VM (2026-12-07, peak VmData above the
    # post-warm-up size, sampled every 2 ms, 4 runs / 3 runs): 61.1-68.1 MiB with the dynamic threshold (the cause
    # of this test's occasional failures at 60 and 66 MiB), 54.6-55.8 MiB with the threshold fixed at 128 KiB. Under
    # a 58 MiB limit the test failed 2 of 3 runs with the dynamic threshold and passed 3 of 3 with the fixed one.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "TRANSFORMERS_VERBOSITY": "error",
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    }
    importances_file = tmp_path / "importances.safetensors"
    args = [tmp_path / "dense", tmp_path / "warmup", tmp_path / "out", budget_mib, importances_file]
    result = subprocess.run(
        [sys.executable, str(worker), *map(str, args)], capture_output=True, text=True, env=env, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["model_mib"] > 2 * budget_mib  # the model is far larger than the limit ...
    assert summary["whole_model_fits"] is False  # ... and the limit is real: the model's size cannot be allocated
    inputs = {"input_ids": torch.randint(0, size["vocab"], (2, 12), generator=generator)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded LAPACK on a loaded shared machine can take minutes for these SVDs
    try:
        _compare_with_in_memory(tmp_path, size, summary, inputs)
    finally:
        torch.set_num_threads(threads)


def _compare_with_in_memory(tmp_path, size: dict, summary: dict, inputs: dict) -> None:
    from memory_limit_worker import fisher_config
    from transformers import LlamaForCausalLM

    from hf_fwsvd import FWSVDConfig, compress

    configs = {
        "svd": FWSVDConfig(rank_ratio=0.25, method="svd"),
        "fwsvd": FWSVDConfig(rank_ratio=0.25, method="fwsvd", importances=str(tmp_path / "importances.safetensors")),
        "fwsvd_data": fisher_config(size["vocab"]),  # the Fisher from calibration data, block-wise backward
    }
    for name, config in configs.items():
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out" / name).eval()
        expected = compress(_llama(**size), config, show_progress=False)
        assert reloaded.config.quantization_config.ranks == expected.config.quantization_config.ranks
        assert summary[name] == pytest.approx(expected.fwsvd_report.params_ratio)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, expected(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_compress_layerwise_fits_a_model_twice_the_memory_limit(tmp_path):
    # 136 MiB of fp32 weights (4 MiB of them embeddings) in 4 MB shards, 66 MiB of anonymous memory allowed (much of
    # it taken by the allocator's own growth: heap fragmentation, arenas): the model is over twice the limit. The
    # block-wise Fisher pass needed 45-50 MiB on an 82 MiB model on one 2-core VM (2026-12-06) and under 40 on
    # another. On a fresh VM (2026-12-07) a limit of 60 MiB failed once in two full-suite runs (on the last shard)
    # while passing alone six times: glibc's dynamic mmap threshold, now fixed (see `_compress_under_limit`), which
    # brings the peak to about 55 MiB; 66 MiB leaves 10 MiB of margin.
    _compress_under_limit(tmp_path, {"hidden": 256, "intermediate": 1536, "layers": 24, "vocab": 2048}, 66, "4MB")


@pytest.mark.slow
def test_compress_layerwise_fits_a_large_model_under_the_memory_limit(tmp_path):
    # 664 MiB of fp32 weights (12 blocks of 50 MiB) in 20 MB shards, 300 MiB of anonymous memory allowed: about 6
    # blocks' worth, as the shards a block spans are mapped in full and the heap keeps what SVDs of this size freed
    size = {"hidden": 1024, "intermediate": 2816, "layers": 12, "vocab": 8192}
    _compress_under_limit(tmp_path, size, 300, "20MB")


# -- parallel factorisation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "fwsvd", "whiten"])
def test_parallel_factorisation_is_bit_identical_and_restores_threads(method, sample_input):
    from conftest import calibration_data, tiny_bert

    from hf_fwsvd import FWSVDConfig, compress

    def run(num_workers: int):
        torch.manual_seed(0)
        model = tiny_bert().eval()
        config = FWSVDConfig(rank_ratio=0.3, method=method, num_workers=num_workers, svd_solver="full")
        if method != "svd":
            config.calibration_dataset = calibration_data("bert")
        return compress(model, config, show_progress=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run(1)
    finally:
        torch.set_num_threads(threads)
    parallel = run(3)
    assert torch.get_num_threads() == threads
    serial_state, parallel_state = serial.state_dict(), parallel.state_dict()
    assert serial_state.keys() == parallel_state.keys()
    for key, value in serial_state.items():
        # equal to rounding: on some CPUs LAPACK's result depends on the input's memory alignment (see
        # conftest.same_outputs); a module factorised from the wrong weights or at another rank differs by far more
        assert torch.allclose(value, parallel_state[key], rtol=1e-5, atol=1e-6), key
    assert [row.name for row in parallel.fwsvd_report.modules] == [row.name for row in serial.fwsvd_report.modules]
    assert "num_workers" not in parallel.config.quantization_config.to_dict()


def test_parallel_factorisation_failure_leaves_the_model_dense_and_threads_restored(monkeypatch):
    from conftest import tiny_bert

    from hf_fwsvd import FWSVDConfig, compress, pipeline

    original = pipeline.factorize_weight

    def failing(method, weight, rank, name, stats, config):
        if name.endswith("layer.1.output.dense"):
            raise RuntimeError(f"boom in {name}")
        return original(method, weight, rank, name, stats, config)

    monkeypatch.setattr(pipeline, "factorize_weight", failing)
    torch.manual_seed(0)
    model = tiny_bert().eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match=r"^boom in bert\.encoder\.layer\.1\.output\.dense$"):
        compress(model, FWSVDConfig(rank=4, method="svd", num_workers=2), show_progress=False)
    assert torch.get_num_threads() == threads
    assert not any(isinstance(module, LowRankLinear) for module in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


def test_rank_multiple_applies_to_param_budget():
    from conftest import calibration_data, tiny_bert

    from hf_fwsvd import FWSVDConfig, compress

    torch.manual_seed(0)
    config = FWSVDConfig(param_budget=0.5, allocation="uniform", rank_multiple=4, method="svd")
    model = compress(tiny_bert().eval(), config, show_progress=False)
    ranks = model.config.quantization_config.ranks
    # uniform 0.5: floor(0.5 * 16 * 16 / 32) = 4 and floor(0.5 * 32 * 16 / 48) = 5 -> 4
    assert set(ranks.values()) == {4}
    config = FWSVDConfig(param_budget=0.4, rank_multiple=2, calibration_dataset=calibration_data("bert"))
    model = compress(tiny_bert().eval(), config, show_progress=False)
    ranks = model.config.quantization_config.ranks
    assert ranks and all(rank % 2 == 0 or rank == 1 for rank in ranks.values()), ranks
