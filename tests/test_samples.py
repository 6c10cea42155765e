"""SampleList: a split's (path, label) list as flat numpy buffers that forked workers share."""
from __future__ import annotations

import os
import sys

import pytest

from alexnet_train.data.samples import SampleList

PAIRS = [("train/n01/a.JPEG", 0), ("train/n01/é ü.jpg", 0), ("train/n02/\udcff-raw-byte.png", 1),
         ("train/n03/c.JPEG", 2)]


def test_it_reads_back_every_path_and_label_as_given():
    samples = SampleList.from_pairs(PAIRS)
    assert len(samples) == 4 and list(samples) == PAIRS and samples == PAIRS
    assert samples[2] == PAIRS[2] and samples[-1] == PAIRS[-1]
    assert os.fsencode(samples[2][0]) == b"train/n02/\xff-raw-byte.png"  # undecodable bytes survive
    assert samples[1:3] == PAIRS[1:3] and samples[::2] == PAIRS[::2] and isinstance(samples[::2], SampleList)
    assert samples.take([3, 0]) == [PAIRS[3], PAIRS[0]]
    assert SampleList.concat([samples[:1], samples[1:]]) == samples
    assert samples[:2] * 2 == PAIRS[:2] * 2 and 0 * samples == [] and isinstance(samples * 3, SampleList)
    assert samples.labels.tolist() == [0, 0, 1, 2]
    with pytest.raises(IndexError):
        samples[4]
    empty = SampleList.from_pairs([])
    assert len(empty) == 0 and list(empty) == [] and empty.take([]) == []


def test_its_buffers_cannot_be_written():
    samples = SampleList.from_pairs(PAIRS)
    with pytest.raises(ValueError):
        samples.labels[0] = 5


def _private_dirty_kb(pid: int) -> int:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    return fields["Private_Dirty"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/smaps_rollup"),
                    reason="reads /proc/PID/smaps_rollup (Linux)")
def test_a_forked_worker_that_indexes_every_sample_copies_almost_none_of_it():
    """The copy-on-write of pytorch/pytorch#13246, measured in a real forked child: indexing a
    list of tuples writes every object's reference count, so the child gets its own copy of
    the pages; indexing a SampleList writes none of them."""
    n = 300_000  # ImageNet-like paths; enough pages that a copy shows far above the noise
    pairs = [(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG", i % 1000) for i in range(n)]
    flat = SampleList.from_pairs(pairs)

    def dirtied_by_indexing(samples) -> int:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: index everything, as a DataLoader worker does over an epoch
            os.close(read)
            before = _private_dirty_kb(os.getpid())
            total = 0
            for i in range(len(samples)):
                path, label = samples[i]
                total += label + len(path)
            grown = _private_dirty_kb(os.getpid()) - before
            os.write(write, str(grown).encode())
            os._exit(0)
        os.close(write)
        grown = int(os.read(read, 64).decode())
        os.close(read)
        os.waitpid(pid, 0)
        return grown

    as_tuples = dirtied_by_indexing(pairs)
    as_flat = dirtied_by_indexing(flat)
    # The tuples: ~70 bytes of objects per sample touched, so >= 15 MB copied for 300k samples.
    assert as_tuples > 15_000, f"the baseline copied only {as_tuples} kB: the measurement is not seeing COW"
    assert as_flat < 4_000 and as_flat * 10 < as_tuples, (as_flat, as_tuples)
    # What it holds: the path bytes, one offset and one label per sample (no per-sample object).
    assert flat.nbytes == sum(len(os.fsencode(p)) for p, _ in pairs) + 8 * (n + 1) + 8 * n
