"""data.decode: device one batch ahead (alexnet_train.data.ahead): the same batches, in order,
with their own unreadable files, the next one decoded before the current one is handed over,
and an error raised at its own batch."""
from __future__ import annotations

import pytest
import torch

from alexnet_train.data.ahead import decode_ahead
from alexnet_train.data.batching import DecodeOnDevice, collate_encoded
from alexnet_train.data.datasets import EncodedDataset, scan_image_folder
from alexnet_train.data.transforms import TrainPreset
from alexnet_train.config import DataConfig

from .conftest import loader_batches

CPU = torch.device("cpu")


class Recording:
    """A decoder that records what it was given and when; image k decodes to a tensor filled with k."""

    def __init__(self, log: list, fail_at: int | None = None) -> None:
        self.log, self.fail_at = log, fail_at

    def __call__(self, images, targets):
        self.log.append(("decode", images))
        if images == self.fail_at:
            raise RuntimeError(f"cannot decode batch {images}")
        return torch.full((2, 3, 4, 4), images, dtype=torch.uint8), targets, [(f"b{images}.JPEG", "corrupt")]


def batches(n: int):
    for k in range(n):
        yield k, torch.tensor([k, k]), [(f"worker{k}.JPEG", "unreadable")]


def test_the_same_batches_in_order_each_with_its_own_unreadable_files():
    log: list = []
    got = list(decode_ahead(batches(4), Recording(log), CPU))
    assert [int(images[0, 0, 0, 0]) for images, _, _ in got] == [0, 1, 2, 3]
    assert [t.tolist() for _, t, _ in got] == [[k, k] for k in range(4)]
    assert [bad for _, _, bad in got] == [[(f"worker{k}.JPEG", "unreadable"), (f"b{k}.JPEG", "corrupt")]
                                          for k in range(4)]


def test_the_next_batch_is_decoded_before_the_current_one_is_handed_over():
    log: list = []
    for images, _, _ in decode_ahead(batches(3), Recording(log), CPU):
        log.append(("step", int(images[0, 0, 0, 0])))
    assert log == [("decode", 0), ("decode", 1), ("step", 0), ("decode", 2), ("step", 1), ("step", 2)]


def test_a_decode_error_is_raised_at_its_own_batch_not_a_step_early():
    log: list = []
    stepped = []
    with pytest.raises(RuntimeError, match="cannot decode batch 2"):
        for images, _, _ in decode_ahead(batches(4), Recording(log, fail_at=2), CPU):
            stepped.append(int(images[0, 0, 0, 0]))
    assert stepped == [0, 1]  # batch 1's step ran although batch 2 had already failed to decode


def test_real_jpegs_decode_ahead_as_they_decode_in_turn(tree):
    train, _ = tree
    classes, samples = scan_image_folder(str(train))
    cfg = DataConfig(resize_size=72, crop_size=64, batch_size=4, workers=0)
    dataset = EncodedDataset(samples, TrainPreset(cfg))
    decoder = DecodeOnDevice(CPU)
    in_turn = loader_batches(dataset, collate_encoded, decoder=decoder)
    raw = loader_batches(dataset, collate_encoded)
    ahead = list(decode_ahead(iter(raw), decoder, CPU))
    assert len(ahead) == len(in_turn) > 2
    for (a, ta, ba), (b, tb, bb) in zip(ahead, in_turn):
        assert torch.equal(a, b) and torch.equal(ta, tb) and ba == bb
