"""Reliability: streaming calibration data is read lazily up to `num_samples` (an endless stream returns), and a
DataLoader stops after `num_samples` examples."""

from __future__ import annotations

import itertools

import datasets
import pytest
import torch
from conftest import calibration_data, tiny_bert
from reliability_cases import expect_warning
from torch.utils.data import DataLoader, IterableDataset

from hf_fwsvd import FWSVDConfig, compute_importances
from hf_fwsvd.calibration import build_calibration_loader

RECORDS = calibration_data("bert", count=40)


def endless_generator():
    yield from itertools.cycle(RECORDS)


class EndlessTorchStream(IterableDataset):
    def __iter__(self):
        return itertools.cycle(RECORDS)


class TokenisedStream(IterableDataset):
    def __iter__(self):
        return ({"input_ids": r["input_ids"], "labels": r["label"]} for r in itertools.cycle(RECORDS))


def endless_hf_stream():
    return datasets.IterableDataset.from_generator(endless_generator)


def importances(data, num_samples=8, batch_size=4):
    torch.manual_seed(0)
    config = FWSVDConfig(rank=4, calibration_dataset=data, num_samples=num_samples, batch_size=batch_size)
    return compute_importances(tiny_bert(), config, show_progress=False)


@pytest.fixture(scope="module")
def reference():
    """Importances of the first 8 records given as a list."""
    return importances(RECORDS[:8], num_samples=None)


STREAMS = {
    "generator": endless_generator,
    "torch-iterable-dataset": EndlessTorchStream,
    "datasets-iterable-dataset": endless_hf_stream,
}


@pytest.mark.parametrize("make", STREAMS.values(), ids=STREAMS.keys())
def test_endless_stream_is_read_up_to_num_samples(make, reference):
    result = importances(make())
    assert result.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(result[name], reference[name])


def test_generator_is_consumed_only_up_to_num_samples():
    consumed = []

    def counting():
        for record in RECORDS:
            consumed.append(record)
            yield record

    loader = build_calibration_loader(counting(), model=tiny_bert(), num_samples=5, batch_size=2)
    assert sum(len(batch["input_ids"]) for batch in loader) == 5
    assert len(consumed) == 5


def test_stream_without_num_samples_warns(caplog):
    with caplog.at_level("WARNING", logger="hf_fwsvd.calibration"):
        build_calibration_loader(iter(RECORDS[:3]), model=tiny_bert(), num_samples=None)
    expect_warning(
        caplog,
        "hf_fwsvd.calibration",
        "`calibration_dataset` is a list_iterator without a length and `num_samples=None`: it is read to its end (an "
        "endless stream never returns). Set `num_samples` to read only that many examples.",
        entry="compress",
    )


def _loader(records, batch_size):
    return build_calibration_loader(records, model=tiny_bert(), num_samples=None, batch_size=batch_size)


@pytest.mark.parametrize(("num_samples", "batch_size"), [(8, 4), (6, 4), (1, 3)], ids=["whole-batches", "cut", "one"])
def test_dataloader_stops_after_num_samples(num_samples, batch_size):
    """`num_samples` used to be ignored for DataLoaders: the whole loader was read."""
    full = _loader(RECORDS, batch_size)
    limited = build_calibration_loader(full, model=tiny_bert(), num_samples=num_samples)
    rows = [len(batch["input_ids"]) for batch in limited]
    assert sum(rows) == num_samples and len(rows) == len(limited) == -(-num_samples // batch_size)
    reference = importances(RECORDS[:num_samples], num_samples=None, batch_size=batch_size)
    result = importances(full, num_samples=num_samples)
    for name in reference:
        torch.testing.assert_close(result[name], reference[name])


def test_dataloader_over_an_endless_stream_returns():
    collate = _loader(RECORDS, 4).collate_fn  # pads `input_ids`, batches `labels`
    stream = TokenisedStream()
    loader = DataLoader(stream, batch_size=4, collate_fn=collate)
    limited = build_calibration_loader(loader, num_samples=10)
    assert sum(len(batch["input_ids"]) for batch in limited) == 10 and len(limited) == 3
    reference = importances(RECORDS[:10], num_samples=None)
    result = importances(loader, num_samples=10)
    for name in reference:
        torch.testing.assert_close(result[name], reference[name])
