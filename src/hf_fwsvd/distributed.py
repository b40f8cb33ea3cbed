"""Data parallelism for Fisher estimation: shard the calibration batches, sum the statistics, let one process write.

Nothing here is needed in a single process: every helper is a no-op there. Under ``accelerate launch`` (or
``torchrun``) each process takes its share of the calibration *batches* through accelerate's own sharding
(``prepare_data_loader`` with ``even_batches=False``), so every process sees whole batches exactly as a single
process would, no batch is repeated to pad the last round and the summed result equals the single-process one up to
floating-point summation order. The per-process sums and example counts are added with one ``all_reduce`` each.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["ProcessInfo", "all_reduce_sum", "is_main_process", "process_info", "shard_batches"]

logger = logging.getLogger(__name__)

_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in a (possibly single-process) run.

    Args:
        index (`int`): Global rank, 0 for the main process.
        count (`int`): Number of processes.
        device (`torch.device`): Device the collectives run on (CPU for gloo, the local GPU for NCCL).
    """

    index: int
    count: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.count > 1

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _launched_world_size() -> int:
    for variable in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return int(value)
    return 1


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def process_info() -> ProcessInfo:
    """Rank and size of the current run, starting accelerate's process group when the script was launched with
    several processes (``accelerate launch``, ``torchrun``) but never created an `Accelerator`.

    A plain ``python script.py`` run is one process and needs no distributed set-up.
    """
    distributed = torch.distributed
    if not distributed.is_available():
        return ProcessInfo(0, 1, torch.device("cpu"))
    if not distributed.is_initialized():
        if _launched_world_size() <= 1:
            return ProcessInfo(0, 1, torch.device("cpu"))
        from accelerate import PartialState

        # accelerate only picks gloo over CPU when told to; do so when there is no accelerator device.
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not _has_accelerator()
        PartialState(cpu=use_cpu)
        if not distributed.is_initialized():
            raise RuntimeError(
                f"This process was launched as one of {_launched_world_size()} (WORLD_SIZE) but accelerate did not "
                "start a process group. Create an `accelerate.Accelerator()` at the start of the script."
            )
    backend = str(distributed.get_backend()).lower()
    device = torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():  # NCCL reduces GPU tensors: this process's GPU
        from accelerate import PartialState

        device = PartialState().device
    return ProcessInfo(distributed.get_rank(), distributed.get_world_size(), device)


def is_main_process() -> bool:
    """Whether this is the process that writes files (always true outside a distributed run)."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized()) or distributed.get_rank() == 0


def shard_batches(batches: Iterable[Any], info: ProcessInfo) -> Iterable[Any]:
    """This process's share of the calibration batches: whole batches, round-robin, none repeated.

    A `DataLoader` over a map-style dataset is sharded with accelerate's `prepare_data_loader` (``even_batches=False``,
    so the last round is not padded with repeated examples, which would bias the Fisher). Any other iterable of
    batches (a list, a generator, a loader over an `IterableDataset`) is split the same way, batch ``i`` going to
    process ``i % count``.

    Args:
        batches (`Iterable`): All calibration batches, identical on every process.
        info ([`ProcessInfo`]): This process's rank and the number of processes.
    """
    if not info.is_distributed:
        return batches
    if isinstance(batches, DataLoader) and not isinstance(batches.dataset, IterableDataset):
        from accelerate.data_loader import prepare_data_loader

        return prepare_data_loader(
            batches,
            num_processes=info.count,
            process_index=info.index,
            split_batches=False,
            put_on_device=False,
            even_batches=False,
        )
    return itertools.islice(batches, info.index, None, info.count)


def all_reduce_sum(tensor: torch.Tensor, info: ProcessInfo) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes (a copy; `tensor` itself is unchanged), on its device."""
    if not info.is_distributed:
        return tensor.clone()
    reduced = tensor.detach().to(info.device, copy=True)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced.to(tensor.device)
