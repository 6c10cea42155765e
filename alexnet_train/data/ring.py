"""Reused shared memory for the batches loader workers hand to the training process.

A loader worker collates each batch into one shared-memory buffer (:mod:`~.batching`).  A
fresh segment per batch costs the training process twice: receiving it (a file descriptor
passed over a socket, a new mapping) and releasing it (unmapping and freeing every page),
about 10-35 us per image together on a 2-core VM (``scripts/bench_data.py --handoff``).
Here each worker keeps a few **slots** of shared memory instead and collates into a free
one; the training process maps a slot once, the first time a batch arrives in it, and when
the last tensor viewing a batch is gone the slot goes back to its worker instead of being
freed.  A batch then crosses as a slot number and its shape, a few hundred bytes.

Usage (:mod:`~.batching` and :mod:`~.loaders` do this; nothing else needs to)::

    configure(slots)            # in a worker, at start (loaders.worker_init): slots per worker; 0 = off
    out = take(nbytes)          # in a worker: a uint8 tensor in a free slot, or None (use a fresh segment)
    ship(tensor)                # in a batch's __reduce__: the tensor as a slot reference, or itself

Each slot is ``HEADER`` bytes and then the data; byte 0 of the header says whose it is:
``FREE`` (the worker may fill it) or ``TAKEN``.  A worker takes a free slot (sets TAKEN) and
collates into it; if that batch is dropped in the worker before it is pickled for the
training process (a collate that raised), the slot is free again; once pickled, only the
training process frees it: a finalizer on the batch's own storage, which every tensor of
the batch (views, slices, ``EncodedBatch``'s parts) keeps alive, writes FREE when the last
one goes.  That is the moment the memory of a fresh segment would have been unmapped, so a
slot is reused only where a per-batch segment would have been freed: whatever could still
read the batch then would have read freed memory before.  Where the batch goes on:

- ``pin_memory`` (CUDA training): the pin thread copies the batch into pinned memory on the
  host, synchronously, and drops the slot; the GPU reads the pinned copy, whose reuse torch's
  host allocator holds back until the ``non_blocking`` copy that reads it has run (an event).
- ``.to("cuda", non_blocking=True)`` straight from a slot (no pinning): the slot is pageable
  memory, which CUDA copies through a staging buffer before the call returns, so nothing
  reads the slot after it; on the CPU every copy is synchronous.

Memory is bounded: ``slots`` buffers per worker, each 1/8 larger than the batch that first
needed it (JPEG batches of ``data.decode: device`` vary in size; a bigger batch grows a free
slot).  A worker that finds no free slot (the training process holds more batches than the
ring has: ``list(loader)``, a slow consumer) collates into a fresh segment as before, which
is freed as before: correct, only slower.  The training process drops its mappings of a
worker's slots when the loader is closed (:func:`forget_dead`) or a new worker appears and
the old one is gone.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

HEADER = 64  # bytes before a slot's data: byte 0 its state; 64 keeps the data 64-byte aligned
FREE, TAKEN = 0, 1
PAGE = 4096

_slots = 6  # per worker; loaders.make_loader sets it in its workers (prefetch + 2)


def configure(slots: int) -> None:
    """Slots per worker from now on in this process (0 turns the ring off); a worker's ring is
    made at its first batch, so call this before (``worker_init``)."""
    global _slots, _worker_ring
    _slots = max(0, int(slots))
    _worker_ring = None


class _Slot:
    __slots__ = ("storage", "full", "capacity", "gen", "sent")

    def __init__(self, nbytes: int, gen: int) -> None:
        capacity = -(-(nbytes + nbytes // 8) // PAGE) * PAGE
        self.storage = torch.UntypedStorage._new_shared(HEADER + capacity)
        # The whole slot as numpy: batches are numpy views of it, each with a finalizer.
        self.full = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        self.full[0] = FREE
        self.capacity, self.gen, self.sent = capacity, gen, -1


class _Handed:
    """One batch a worker collated into a slot, until it is dropped there."""

    __slots__ = ("index", "gen", "nbytes", "shipped")

    def __init__(self, index: int, gen: int, nbytes: int) -> None:
        self.index, self.gen, self.nbytes, self.shipped = index, gen, nbytes, False


class WorkerRing:
    """A worker's slots (one per process; :func:`take` makes it)."""

    def __init__(self, slots: int) -> None:
        # Names this ring to the training process; random, so that a later worker with the
        # same pid is never taken for this one.
        self.token = (os.getpid(), int.from_bytes(os.urandom(8), "little"))
        self.slots: list[_Slot | None] = [None] * slots
        self.next = 0
        self.gens = 0
        self.fallbacks = 0  # batches that found no free slot
        self.handed: dict[int, _Handed] = {}  # data pointer -> the batch there
        # The DataLoader's queue pickles (ship) and drops batches in its feeder thread; reentrant,
        # as a batch's finalizer may run inside take() or ship() (a garbage collection there).
        self.lock = threading.RLock()

    def take(self, nbytes: int) -> torch.Tensor | None:
        if nbytes <= 0:
            return None
        with self.lock:
            n = len(self.slots)
            free = [i for i in ((self.next + k) % n for k in range(n))
                     if self.slots[i] is None or self.slots[i].full[0] == FREE]
            if not free:
                self.fallbacks += 1
                return None
            # A free slot that fits, else the first free one, made to fit.
            i = next((i for i in free if self.slots[i] is not None and self.slots[i].capacity >= nbytes), free[0])
            slot = self.slots[i]
            if slot is None or slot.capacity < nbytes:
                self.gens += 1
                slot = self.slots[i] = _Slot(nbytes, self.gens)
            slot.full[0] = TAKEN
            self.next = (i + 1) % n
            arr = slot.full[HEADER : HEADER + nbytes]
            handed = _Handed(i, slot.gen, nbytes)
            self.handed[arr.ctypes.data] = handed
            weakref.finalize(arr, self._dropped, arr.ctypes.data, slot, handed).atexit = False
        return torch.from_numpy(arr)

    def _dropped(self, ptr: int, slot: _Slot, handed: _Handed) -> None:
        with self.lock:
            if self.handed.get(ptr) is handed:
                del self.handed[ptr]
            if not handed.shipped:  # never reached the training process: free again here
                slot.full[0] = FREE

    def ship(self, tensor: torch.Tensor):
        handed = self.handed.get(tensor.untyped_storage().data_ptr())
        if handed is None:
            return tensor
        with self.lock:
            if handed.shipped:  # pickled a second time: that copy must not share the slot
                return tensor.clone()
            handed.shipped = True
            slot = self.slots[handed.index]
            storage = None
            if slot.sent != slot.gen:  # the first batch in this slot brings its memory along
                storage, slot.sent = slot.storage, slot.gen
        return SlotRef(self.token, handed.index, handed.gen, storage, handed.nbytes, tuple(tensor.shape),
                       tensor.stride(), tensor.storage_offset())


_worker_ring: WorkerRing | None = None


def _ring() -> WorkerRing | None:
    global _worker_ring
    if not _slots:
        return None
    if _worker_ring is None or _worker_ring.token[0] != os.getpid():  # not one inherited by fork
        _worker_ring = WorkerRing(_slots)
    return _worker_ring


def take(nbytes: int) -> torch.Tensor | None:
    """In a loader worker: ``nbytes`` of a free slot as a uint8 tensor, to collate a batch
    into; None where the ring is off or every slot is taken."""
    ring = _ring()
    return ring.take(nbytes) if ring is not None else None


def ship(obj):
    """What to pickle for ``obj``: a :class:`SlotRef` for a tensor in one of this worker's
    slots, else ``obj`` itself."""
    ring = _worker_ring
    if ring is None or not isinstance(obj, torch.Tensor) or ring.token[0] != os.getpid():
        return obj
    return ring.ship(obj)


class SlotRef:
    """A tensor in a worker's slot, as it is pickled: which slot, and the tensor's shape."""

    __slots__ = ("args",)

    def __init__(self, *args) -> None:
        self.args = args

    def __reduce__(self):
        return _receive, self.args


# ---------------------------------------------------------------- the training process's side

_mapped: dict[tuple, tuple[int, np.ndarray]] = {}  # (ring token, slot) -> (generation, the slot as numpy)
_lock = threading.Lock()
_counts = {"batches": 0, "mappings": 0}


def _release(full: np.ndarray) -> None:
    full[0] = FREE


def _receive(token: tuple, index: int, gen: int, storage, nbytes: int, shape: tuple, stride: tuple,
             offset: int) -> torch.Tensor:
    key = (token, index)
    with _lock:
        if storage is not None:
            if not any(k[0] == token for k in _mapped):  # a new worker: drop the mappings of gone ones
                _forget_dead_locked()
            full = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            _mapped[key] = (gen, full)
            _counts["mappings"] += 1
        else:
            known = _mapped.get(key)
            if known is None or known[0] != gen:
                raise RuntimeError(f"a loader worker (pid {token[0]}) sent a batch in its shared-memory slot {index} "
                                   "that this process never mapped")
            full = known[1]
        _counts["batches"] += 1
    arr = full[HEADER : HEADER + nbytes]
    # The batch's own storage holds ``arr``: when its last tensor goes, so does arr, and the slot is free.
    weakref.finalize(arr, _release, full).atexit = False
    return torch.from_numpy(arr).as_strided(shape, stride, offset)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_locked() -> None:
    for key in [k for k in _mapped if not _alive(k[0][0])]:
        del _mapped[key]  # batches still held keep their memory; the mapping goes with the last


def forget_dead() -> None:
    """Drop this process's mappings of slots whose worker has exited (a closed loader's)."""
    with _lock:
        _forget_dead_locked()


def received() -> dict[str, int]:
    """In the training process: batches received in slots, and slots mapped (each mapping
    was a file descriptor passed once), so far; for tests and benchmarks."""
    with _lock:
        return dict(_counts, mapped=len(_mapped))
