"""``data.decode: device`` one batch ahead: the next batch decodes while the current step runs.

Usage::

    for images, targets, bad in decode_ahead(loader, DecodeOnDevice(device), device):
        ...  # the step on this batch; the next one is already decoding on its own CUDA stream

Decoding a batch on the GPU (nvJPEG, then the batched crops and flips) used to run on the
training stream between two steps, so the step waited for it.  Here batch k+1 is taken from
the loader and its decode launched on a stream of its own *before* batch k is handed over, so
on the GPU the decode of k+1 overlaps step k.  The training stream waits for k's decode (an
event) before it reads the images, and the images are recorded on the training stream, so the
allocator does not hand their memory to the decoder's stream while the step still reads them.

Nothing else changes: the batches, their order, their targets and their unreadable files are
what decoding in turn gives (the CPU runs the same code without a stream); an exception raised
while decoding batch k+1 is raised where batch k+1 would have been handed over, not a step early.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

Batch = tuple  # (images, targets, [(path, reason)] of unreadable files)


class _Decoded:
    """One batch decoded (or the exception decoding raised), and the event that marks it done."""

    __slots__ = ("batch", "error", "event")

    def __init__(self, batch: Batch | None, error: BaseException | None, event) -> None:
        self.batch, self.error, self.event = batch, error, event


def _decode(decoder: Callable, item: Batch, stream) -> _Decoded:
    images, targets, bad = item
    try:
        if stream is None:
            decoded, kept, undecodable = decoder(images, targets)
            return _Decoded((decoded, kept, bad + undecodable), None, None)
        # The side stream starts after what the training stream has queued so far (the previous
        # step's use of memory the allocator may now hand to this decode).
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            decoded, kept, undecodable = decoder(images, targets)
            event = torch.cuda.Event()
            event.record(stream)
        return _Decoded((decoded, kept, bad + undecodable), None, event)
    except Exception as exc:  # noqa: BLE001 - raised when its batch's turn comes
        return _Decoded(None, exc, None)


def _hand_over(done: _Decoded) -> Batch:
    if done.error is not None:
        raise done.error
    images, targets, bad = done.batch
    if done.event is not None:
        current = torch.cuda.current_stream(images.device)
        current.wait_event(done.event)
        images.record_stream(current)
    return images, targets, bad


def decode_ahead(batches: Iterable[Batch], decoder: Callable, device: torch.device) -> Iterator[Batch]:
    """``decoder``'s batches of ``batches``, each decoded while the previous one is in use."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending: _Decoded | None = None
    for item in batches:
        ahead = _decode(decoder, item, stream)
        if pending is not None:
            yield _hand_over(pending)
        pending = ahead
    if pending is not None:
        yield _hand_over(pending)
