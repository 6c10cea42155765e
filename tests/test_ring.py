"""Reused shared-memory slots for loader batches (alexnet_train/data/ring.py), and
``data.workers: auto``.

A slot goes back to its worker only when the last tensor of the batch in it is gone, so a
batch the training process holds is never overwritten, however many it holds and in
whatever order it lets them go; when every slot is held a worker uses a fresh segment."""
from __future__ import annotations

import gc
import os
import pickle
import random
import signal
import time

import pytest
import torch
from torch.utils.data import Dataset

from alexnet_train.config import DataConfig
from alexnet_train.configload import load_config
from alexnet_train.data import ring
from alexnet_train.data.batching import collate_encoded, collate_hwc
from alexnet_train.data.datasets import EncodedDataset, ImageDataset, scan_image_folder
from alexnet_train.data.loaders import (WORKERS_CAP, EpochSampler, auto_workers, close_loader, make_loader,
                                        resolve_workers, usable_cores)
from alexnet_train.data.transforms import TrainPreset
from alexnet_train.distributed import DistInfo, ranks_sharing_cores
from alexnet_train.errors import ConfigError

from .conftest import write_image_folder

TIMEOUT = 60  # s: any wait on a loader worker


class Numbered(Dataset):
    """Image i is filled with i % 251 and (i // 251) in its first pixel's green: a batch's every
    pixel says which images it holds, so any overwrite shows."""

    def __init__(self, n: int, side: int = 16) -> None:
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        x = torch.full((3, self.side, self.side), i % 251, dtype=torch.uint8)
        x[1, 0, 0] = i // 251
        return x, i


def intact(images: torch.Tensor, targets: torch.Tensor) -> bool:
    want = torch.stack([Numbered(0, images.shape[-1])[t][0] for t in targets.tolist()])
    return torch.equal(images, want)


def loader_of(dataset, workers: int, slots: int, batch: int = 4, collate=collate_hwc, pin: bool = False):
    loader = make_loader(dataset, EpochSampler(len(dataset), seed=3), batch, workers, pin, collate, ring_slots=slots)
    loader.timeout = TIMEOUT  # a worker that hangs fails the test instead of the suite
    return loader


def workers_mapped() -> list:
    """This process's mappings of other processes' slots (the tests here map their own too)."""
    return [key for key in ring._mapped if key[0][0] != os.getpid()]


# --------------------------------------------------------------------------- the protocol, in one process


def through_a_pickle(obj):
    """``obj`` as the training process gets it from a worker's queue."""
    import torch.multiprocessing  # noqa: F401  (the reductions: tensors as shared memory)
    from multiprocessing.reduction import ForkingPickler

    return pickle.loads(ForkingPickler.dumps(obj))


def test_a_slot_is_reused_only_after_the_received_batch_is_gone():
    worker = ring.WorkerRing(2)
    a = worker.take(1000)
    a.fill_(1)
    got = through_a_pickle(worker.ship(a.view(10, 100)))
    del a
    b = worker.take(1000)  # slot 0 is still the training process's: b gets slot 1
    b.fill_(2)
    assert worker.take(1000) is None and worker.fallbacks == 1  # both slots taken
    assert got.shape == (10, 100) and bool((got == 1).all())
    view = got[3:5]
    del got  # a view still holds the batch
    assert worker.take(1000) is None
    del view
    c = worker.take(500)  # slot 0 again, without a new segment
    assert c.data_ptr() == worker.slots[0].full.ctypes.data + ring.HEADER
    assert worker.slots[0].gen == 1 and bool((b == 2).all())


def test_a_batch_dropped_before_it_is_sent_frees_its_slot_and_a_bigger_batch_grows_one():
    worker = ring.WorkerRing(1)
    first = worker.take(100)
    through_a_pickle(worker.ship(first))  # maps the slot over there; dropped at once: free
    del first
    gc.collect()
    unsent = worker.take(100)
    del unsent  # a collate that raised: never pickled
    assert worker.slots[0].full[0] == ring.FREE
    big = worker.take(worker.slots[0].capacity + 1)
    assert worker.slots[0].gen == 2  # a new segment, whose memory the next pickle brings along
    big.fill_(7)
    before = ring.received()["mappings"]
    got = through_a_pickle(worker.ship(big))
    assert ring.received()["mappings"] == before + 1 and bool((got == 7).all())


def test_a_batch_pickled_twice_is_a_copy_the_second_time():
    worker = ring.WorkerRing(1)
    t = worker.take(64)
    t.fill_(5)
    first = worker.ship(t)
    second = worker.ship(t)
    assert isinstance(first, ring.SlotRef) and isinstance(second, torch.Tensor)
    assert second.data_ptr() != t.data_ptr() and torch.equal(second, t)


# --------------------------------------------------------------------------- real loaders, real workers


def test_held_batches_are_never_overwritten_and_released_out_of_order_slots_are_reused():
    # 2 workers of 3 slots each, batches of 4; the consumer holds a changing set of batches
    # and lets them go in shuffled order.
    dataset = Numbered(96)
    loader = loader_of(dataset, workers=2, slots=3)
    start = ring.received()
    held: list = []
    rng = random.Random(0)
    seen = 0
    try:
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for images, targets, _bad in loader:
                held.append((images, targets))
                seen += 1
                assert all(intact(i, t) for i, t in held)
                if len(held) > rng.randint(1, 5):
                    for _ in range(rng.randint(1, len(held))):
                        held.pop(rng.randrange(len(held)))
        assert all(intact(i, t) for i, t in held)
    finally:
        close_loader(loader)
    got = ring.received()
    in_slots = got["batches"] - start["batches"]
    assert seen == 48 and in_slots > 12  # most batches came in slots ...
    assert got["mappings"] - start["mappings"] <= 6  # ... of at most 2 x 3 segments, each mapped once
    assert workers_mapped() == []  # the closed loader's mappings are dropped
    assert all(intact(i, t) for i, t in held)  # and held batches keep their memory


def test_a_consumer_that_holds_every_batch_gets_them_all_intact():
    loader = loader_of(Numbered(40), workers=2, slots=1)  # fewer slots than batches in flight
    try:
        batches = list(loader)
    finally:
        close_loader(loader)
    assert len(batches) == 10 and all(intact(i, t) for i, t, _ in batches)
    assert sorted(t for _, ts, _ in batches for t in ts.tolist()) == list(range(40))


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_ring_batches_equal_fresh_segment_batches_from_real_jpegs(tmp_path, decode):
    root = write_image_folder(tmp_path / "train", ["n01", "n02"], 10, size=80, seed=4)
    _, samples = scan_image_folder(str(root))
    cfg = DataConfig(resize_size=72, crop_size=64)
    dataset, collate = ((ImageDataset, collate_hwc) if decode == "worker" else (EncodedDataset, collate_encoded))
    out = {}
    for slots in (0, 2):
        loader = loader_of(dataset(samples, TrainPreset(cfg)), workers=2, slots=slots, batch=3, collate=collate)
        try:
            got = []
            for _ in range(2):  # the second epoch refills reused slots
                for images, targets, bad in loader:
                    data = images.data if decode == "device" else images
                    got.append((data.clone(), targets))
        finally:
            close_loader(loader)
        out[slots] = got
    assert len(out[0]) == len(out[2]) == 14  # 20 images in batches of 3, twice
    for (a, ta), (b, tb) in zip(out[0], out[2]):
        assert torch.equal(ta, tb) and torch.equal(a, b)


@pytest.mark.slow
def test_a_batch_outlives_its_killed_worker_and_the_loader_still_reports_the_death():
    loader = loader_of(Numbered(64), workers=2, slots=2)
    it = iter(loader)
    images, targets, _ = next(it)
    for proc in it._workers:
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while any(p.is_alive() for p in it._workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in range(16):
            next(it)
    close_loader(loader)
    assert workers_mapped() == []
    assert intact(images, targets)  # the segment lives as long as a batch in it


@pytest.mark.cuda
@pytest.mark.parametrize("pin", [True, False])
def test_non_blocking_copies_to_cuda_read_the_batch_they_were_given(pin):
    # pin: the pin thread copies out of the slot first; no pin: pageable memory, which CUDA
    # stages before the call returns.  Either way the GPU copies must be the batches, though
    # the slots are refilled while the copies may still run.
    dataset = Numbered(400, side=128)
    loader = loader_of(dataset, workers=2, slots=2, batch=8, pin=pin)
    on_gpu = []
    try:
        for images, targets, _ in loader:
            on_gpu.append((images.to("cuda", non_blocking=True), targets))
            del images
    finally:
        close_loader(loader)
    torch.cuda.synchronize()
    assert len(on_gpu) == 50 and all(intact(i.cpu(), t) for i, t in on_gpu)


# --------------------------------------------------------------------------- data.workers: auto


def test_auto_workers_is_each_ranks_share_of_the_cores_less_one():
    assert auto_workers(16) == 15
    assert auto_workers(2) == 1
    assert auto_workers(1) == 0  # one core: load in the training process
    assert auto_workers(128, 8) == 15  # an 8-GPU node
    assert auto_workers(12, 8) == 0  # fewer cores than ranks: no worker, not a negative count
    assert auto_workers(256) == WORKERS_CAP == 32
    assert auto_workers(0) == 0


def test_ranks_sharing_the_cores_come_from_the_launcher():
    torchrun = DistInfo(rank=3, world_size=16, local_rank=3, launcher="torchrun")
    slurm = DistInfo(rank=1, world_size=8, local_rank=1, launcher="slurm")
    assert ranks_sharing_cores(torchrun, 128, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_sharing_cores(DistInfo(), 128, {"LOCAL_WORLD_SIZE": "8"}) == 1  # no launcher: alone
    # srun --cpus-per-task=16: each task's affinity is its own 16 cores already.
    assert ranks_sharing_cores(slurm, 16, {"SLURM_CPUS_PER_TASK": "16", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 1
    # Not bound: the step's tasks on this node share the node's cores.
    assert ranks_sharing_cores(slurm, 64, {"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"}) == 4
    assert ranks_sharing_cores(slurm, 64, {"SLURM_TASKS_PER_NODE": "2,3", "SLURM_NODEID": "1"}) == 3
    assert ranks_sharing_cores(slurm, 64, {"SLURM_TASKS_PER_NODE": "garbage"}) == 1


def test_resolve_workers_says_the_number_and_why():
    torchrun = DistInfo(rank=0, world_size=8, local_rank=0, launcher="torchrun")
    assert resolve_workers(3) == (3, "data.workers: 3")
    n, line = resolve_workers("auto", torchrun, cores=128, env={"LOCAL_WORLD_SIZE": "8"})
    assert n == 15 and line == ("data.workers: auto = 15 loader processes (128 usable cores, shared by 8 ranks on "
                                "this node, one for the training process)")
    assert resolve_workers("auto", cores=64)[1].endswith("capped at 32)")
    assert resolve_workers("auto")[0] == auto_workers(usable_cores())
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_data_workers_takes_auto_or_a_count():
    assert DataConfig().workers == "auto"
    assert load_config(None, ["data.workers=auto"]).data.workers == "auto"
    assert load_config(None, ["data.workers=6"]).data.workers == 6
    for bad, needle in (("-1", "must be >= 0"), ("many", "expected int or 'auto'"), ("true", "expected")):
        with pytest.raises(ConfigError, match="data.workers") as info:
            load_config(None, [f"data.workers={bad}"])
        assert needle in str(info.value)
