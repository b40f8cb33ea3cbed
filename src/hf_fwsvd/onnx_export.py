"""Export a compressed (or dense) transformers model to ONNX with `torch.onnx`'s dynamo exporter.

No graph is written by hand: `torch.onnx.export(..., dynamo=True)` traces the model with `torch.export` and
translates it, so each `LowRankLinear` becomes what its `forward` computes, two `MatMul`s (``x @ down^T`` then
``@ up^T``, plus the bias `Add`) whose weights are the factors: the file keeps the low-rank size and speed. The
exported graph takes ``input_ids`` and ``attention_mask`` (batch and sequence length dynamic) and returns the
model's first output (``logits``, or ``last_hidden_state`` for a bare encoder). Causal LMs are exported without a
KV cache (``use_cache=False``): every call scores the whole sequence.

The output folder holds ``model.onnx`` (weights in ``model.onnx.data`` when the model is over 2 GB), the model's
``config.json`` and, when given, its tokenizer, so a runtime without transformers has what it needs.

Needs ``pip install "hf-fwsvd[onnx]"`` (onnx, onnxscript, and onnxruntime for the check).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import LowRankLinear

__all__ = ["OnnxExport", "export_onnx"]

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"


class _TextModel(nn.Module):
    """``(input_ids, attention_mask) -> first output`` of a transformers model, for a tensor-only graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **self.kwargs)
        return output[0]


@dataclass
class OnnxExport:
    """What [`export_onnx`] wrote and how close onnxruntime came to PyTorch.

    Args:
        path (`str`): The `.onnx` file.
        output_name (`str`): Name of the graph's output (`logits` or `last_hidden_state`).
        low_rank_modules (`int`): `LowRankLinear` modules in the exported model.
        matmuls (`int`): `MatMul`/`Gemm` nodes in the graph (two per low-rank module, one per dense linear, plus
            attention).
        max_abs_diff (`float`, *optional*): Largest difference between onnxruntime and PyTorch on a test batch
            (`None` when not checked).
    """

    path: str
    output_name: str
    low_rank_modules: int
    matmuls: int
    max_abs_diff: float | None = None


def _example_inputs(model: nn.Module, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 2 :] = 0  # one padded row, so masking is part of the check
    return input_ids, attention_mask


def _count_matmuls(path: str) -> int:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return sum(node.op_type in ("MatMul", "Gemm") for node in graph.node)


def check_with_onnxruntime(path: str, model: nn.Module, output_name: str) -> float:
    """Run `path` in onnxruntime on a fresh batch (another size than the export's) and return the largest absolute
    difference from PyTorch."""
    import onnxruntime

    input_ids, attention_mask = _example_inputs(model, batch=3, length=11)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(
        [output_name], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = _TextModel(model)(input_ids.to(device), attention_mask.to(device)).float().cpu()
    return float((torch.from_numpy(onnx_output).float() - expected).abs().max())


def _export(
    wrapper: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    output_name: str,
    batch: Any,
    sequence: Any,
    opset_version: int | None,
) -> Any:
    return torch.onnx.export(
        wrapper,
        (input_ids, attention_mask),
        input_names=["input_ids", "attention_mask"],
        output_names=[output_name],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        opset_version=opset_version,
        dynamo=True,
        verbose=False,
    )


def export_onnx(
    model: nn.Module,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    opset_version: int | None = None,
    check: bool = True,
) -> OnnxExport:
    """Export `model` to ``output_dir/model.onnx`` with the dynamo-based `torch.onnx` exporter.

    Args:
        model (`nn.Module`): A transformers model taking `input_ids` and `attention_mask` (compressed or dense); it
            is exported in eval mode on CPU in float32 and left as it was.
        output_dir (`str` or `os.PathLike`): Folder for `model.onnx`, `config.json` and the tokenizer.
        tokenizer (*optional*): Saved into `output_dir` with the model.
        opset_version (`int`, *optional*): ONNX opset (default: the exporter's).
        check (`bool`, *optional*, defaults to `True`): Run the file in onnxruntime and compare with PyTorch.

    Returns:
        [`OnnxExport`]

    Raises:
        `ImportError`: When onnx / onnxscript (or onnxruntime with `check=True`) are missing.
        `ValueError`: When `model` is not a transformers model with a config.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f'ONNX export needs onnx and onnxscript: pip install "hf-fwsvd[onnx]" ({error}).') from error
    if not hasattr(model, "config"):
        raise ValueError(f"export_onnx needs a transformers model with a `config`; got {type(model).__name__}.")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, ONNX_NAME)
    was_training = model.training
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    model.eval().to(device="cpu", dtype=torch.float32)
    try:
        wrapper = _TextModel(model).eval()
        input_ids, attention_mask = _example_inputs(model)
        with torch.no_grad():
            first = model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **wrapper.kwargs)
        output_name = next(iter(first.keys()))
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        # torch.onnx warns once per torchvision op it cannot register when torchvision is absent: noise here
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")
        level = registration.level
        registration.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                # both inputs share the batch and sequence dims, which torch.onnx reports as a UserWarning
                warnings.filterwarnings("ignore", r".*The axis name: \w+ will not be used", UserWarning)
                program = _export(wrapper, input_ids, attention_mask, output_name, batch, sequence, opset_version)
                program.save(path)
        finally:
            registration.setLevel(level)
        max_abs_diff = check_with_onnxruntime(path, model, output_name) if check else None
        model.config.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    finally:
        model.to(device=device, dtype=dtype).train(was_training)
    result = OnnxExport(
        path=path,
        output_name=output_name,
        low_rank_modules=sum(isinstance(module, LowRankLinear) for module in model.modules()),
        matmuls=_count_matmuls(path),
        max_abs_diff=max_abs_diff,
    )
    logger.info("Exported %s to %s (%d MatMul nodes).", type(model).__name__, path, result.matmuls)
    return result
