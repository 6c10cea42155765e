"""One log interval of training steps: loss, images, data time and throughput.

Usage (inside an epoch)::

    window = LogWindow(trainer.accum, interval=50, world_size=8, device=device, tracker=tracker,
                       workers=loaders.workers)
    for batch in window.timed(loader):        # measures the wait for each batch
        window.add(loss_times_images, images)  # a device tensor: no host sync
        if window.should_log(step, at_end):
            loss_sum = window.read()           # the interval's one host sync
            window.log(loss_sum, lr, global_step, bar)

``log`` adds the interval to the epoch's totals (the ``accum`` dict the trainer saves in
its checkpoints), writes the TensorBoard scalars, updates the progress bar's fields and
warns once per epoch when a GPU waited for data more than a quarter of the interval.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import torch

from .tracking import Tracker


class LogWindow:
    def __init__(self, totals: dict, interval: int, world_size: int, device: torch.device, tracker: Tracker,
                 workers: int) -> None:
        self.totals, self.interval, self.world_size = totals, interval, world_size
        self.device, self.tracker, self.workers = device, tracker, workers
        self.loss = torch.zeros((), device=device)  # sum of loss x images, kept on the device
        self.images = 0
        self.steps = 0
        self.data_seconds = 0.0
        self.started = time.perf_counter()
        self.warned_wait = False

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, adding the time spent waiting for each to the window's data time."""
        fetch = time.perf_counter()
        for batch in batches:
            self.data_seconds += time.perf_counter() - fetch
            yield batch
            fetch = time.perf_counter()

    def add(self, loss_sum: torch.Tensor | None, images: int) -> None:
        if loss_sum is not None:
            self.loss += loss_sum
        self.images += images
        self.steps += 1

    def seconds_per_step(self) -> float:
        """The interval's wall time per step so far (data waits and collectives included)."""
        return (time.perf_counter() - self.started) / max(1, self.steps)

    def should_log(self, step_in_epoch: int, at_end: bool) -> bool:
        return at_end or step_in_epoch % self.interval == 0

    def read(self) -> float:
        """The interval's loss sum on the host: the one host-device sync of the interval."""
        return float(self.loss)

    def log(self, loss_sum: float, lr: float, global_step: int, bar) -> None:
        """Add the interval to the epoch's totals, show it, and start the next interval."""
        elapsed = time.perf_counter() - self.started
        totals = self.totals
        totals["loss_sum"] += loss_sum
        totals["images"] += self.images
        totals["seconds"] += elapsed
        totals["data_seconds"] += self.data_seconds
        loss = loss_sum / max(1, self.images)
        ips = self.images * self.world_size / max(elapsed, 1e-9)
        wait = self.data_seconds / max(elapsed, 1e-9)
        self.tracker.scalar("train/loss", loss, global_step)
        self.tracker.scalar("train/lr", lr, global_step)
        self.tracker.scalar("train/images_per_s", ips, global_step)
        self.tracker.scalar("train/data_wait_fraction", wait, global_step)
        bar.set(loss=loss, lr=lr, img_s=ips, data_wait=wait)
        if not self.warned_wait and wait > 0.25 and self.device.type == "cuda":
            self.warned_wait = True
            self.tracker.log(
                f"warning: the GPU waited for data {100 * wait:.0f}% of the last {self.interval} steps: the "
                f"loader is the bottleneck; read the 256 px copy made by alexnet-prepare and/or raise "
                f"data.workers (now {self.workers})"
            )
        self.loss.zero_()
        self.images, self.steps, self.data_seconds = 0, 0, 0.0
        self.started = time.perf_counter()
