"""Everything the operator sees: log lines, progress, metrics.jsonl and TensorBoard.

Usage::

    tracker = Tracker(out_dir, enabled=dist.is_main)
    tracker.log("epoch 1 ...")
    with tracker.progress(total=len(loader), desc="epoch 1") as bar:
        bar.update(1, loss=2.3)
    tracker.scalar("train/loss", 2.3, step)
    tracker.epoch_metrics({"epoch": 1, ...})     # one JSON line in OUT/metrics.jsonl
    tracker.close()

On a TTY progress is a tqdm bar; otherwise (cron, batch jobs, pipes) it is a
plain line every ``log_interval`` steps.  Only this module writes TensorBoard.
A file that cannot be written (metrics.jsonl, an event file: a full disk, say)
raises :class:`~alexnet_train.checkpoint.WriteError` naming it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from .checkpoint import WriteError, write_error


def format_duration(seconds: Any) -> str:
    """A duration a person reads at a glance: 46s, 3m05s, 1h02m, 1d02h ("?" when unknown)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return "?"
    if not math.isfinite(value):
        return "?"
    s = max(0, int(round(value)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_clock(timestamp: float) -> str:
    """Local wall-clock time, with the date (a long run ends days later)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def format_field(name: str, value: Any) -> str:
    """One value of a progress line, in the same units and digits everywhere."""
    if name == "loss":
        return f"loss {value:.4f}"
    if name == "lr":
        return f"lr {value:.4g}"
    if name == "img_s":
        return f"{value:.0f} img/s"
    if name == "data_wait":
        return f"data wait {100 * value:.0f}%"
    if isinstance(value, float):
        return f"{name} {value:.4g}"
    return f"{name} {value}"


class RunClock:
    """What is left of the epoch and of the run, from the time per step measured so far (pure).

    Each phase (``train``, ``val``) of an epoch runs a known number of steps.  The phase
    under way is timed by its own progress; the other phase takes the seconds per step of
    its last finished run, and validation, before it has run once, a third of a training
    step (a forward pass without the backward).  A plateau schedule may end the run sooner.
    """

    def __init__(self, epochs: int, train_steps: int, val_steps: int) -> None:
        self.epochs, self.train_steps, self.val_steps = epochs, train_steps, val_steps
        self.per_step: dict[str, float | None] = {"train": None, "val": None}

    def finished(self, phase: str, seconds_per_step: float | None) -> None:
        if seconds_per_step is not None:
            self.per_step[phase] = seconds_per_step

    def left(self, epoch: int, phase: str, steps_left: int, seconds_per_step: float) -> tuple[float, float]:
        """(seconds left in epoch ``epoch`` (0-based), seconds left in the run) during ``phase``."""
        train = seconds_per_step if phase == "train" else self.per_step["train"]
        val = seconds_per_step if phase == "val" else self.per_step["val"]
        if val is None:
            val = (train or 0.0) / 3
        if train is None:  # validating before any training step was timed (a resume at an epoch's end)
            train = 3 * val
        epoch_left = steps_left * seconds_per_step + (self.val_steps * val if phase == "train" else 0.0)
        later = max(0, self.epochs - epoch - 1) * (self.train_steps * train + self.val_steps * val)
        return epoch_left, epoch_left + later


class Progress:
    """A tqdm bar on a TTY, else a log line every ``interval`` updates (and at the end).

    A plain line reads ``epoch 3/90 train 400/10010 | loss 4.2130 | lr 0.01 | 1157 img/s |
    data wait 7% | elapsed 5m12s | ETA epoch 2h01m, run 6d03h (ends 2026-12-08 14:20)``: the
    values set with :meth:`set`, then the time spent and what is left.  ``eta(steps_left,
    seconds_per_step)`` gives (epoch left, run left); without it the ETA is this progress's own.
    """

    def __init__(self, total: int, desc: str, interval: int, enabled: bool, stream: TextIO, initial: int = 0,
                 eta: Callable[[int, float], tuple[float, float]] | None = None,
                 on_error: Callable[[OSError], None] | None = None) -> None:
        self.total, self.desc, self.interval, self.enabled, self.stream = total, desc, interval, enabled, stream
        self.on_error = on_error
        self.count = self.initial = initial
        self.eta = eta
        self.postfix: dict[str, Any] = {}
        self.started = time.monotonic()
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True, leave=False)

    def seconds_per_step(self) -> float | None:
        """Measured since this progress began; None before its first step."""
        steps = self.count - self.initial
        return (time.monotonic() - self.started) / steps if steps > 0 else None

    def set(self, **postfix: Any) -> None:
        """Values shown with the bar / the next log line."""
        self.postfix = postfix
        if self.bar is not None:  # tqdm shows this phase's ETA itself; the run's goes with the values
            shown = [format_field(k, v) for k, v in postfix.items()]
            left = self._left()
            if left is not None and self.eta is not None:
                shown.append(f"run ETA {format_duration(left[1])}")
            self.bar.set_postfix_str(", ".join(shown), refresh=False)

    def _left(self) -> tuple[float, float] | None:
        rate = self.seconds_per_step()
        if rate is None:
            return None
        steps_left = max(0, self.total - self.count)
        if self.eta is None:
            return steps_left * rate, steps_left * rate
        return self.eta(steps_left, rate)

    def line(self) -> str:
        """The plain progress line for the current state."""
        parts = [f"{self.desc} {self.count}/{self.total}"]
        parts += [format_field(k, v) for k, v in self.postfix.items()]
        parts.append(f"elapsed {format_duration(time.monotonic() - self.started)}")
        left = self._left()
        if left is not None:
            if self.eta is None:
                parts.append(f"ETA {format_duration(left[0])}")
            else:
                parts.append(f"ETA epoch {format_duration(left[0])}, run {format_duration(left[1])} "
                             f"(ends {format_clock(time.time() + left[1])})")
        return " | ".join(parts)

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.count % self.interval == 0 or self.count == self.total:
            try:
                print(self.line(), file=self.stream, flush=True)
            except OSError as exc:  # stdout gone (a closed pipe) or full (a redirect)
                self.enabled = False
                if self.on_error is None:
                    raise
                self.on_error(exc)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


class Tracker:
    def __init__(self, out_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True,
                 stream: TextIO | None = None, defer_errors: bool = False) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        # Under DDP only rank 0 writes, so its failed write must not end rank 0 alone: with
        # defer_errors the first WriteError is kept in ``failure`` (for the trainer to share at
        # the ranks' next agreement) and the tracker stops writing.
        self.defer_errors = defer_errors
        self.failure: WriteError | None = None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.writer = None
        if enabled and tensorboard and self.out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_event_writer_thread()
            try:
                self.writer = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except (OSError, RuntimeError) as exc:
                raise write_error(self.out_dir / "tb", exc) from None

    def _tb(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """One TensorBoard call; a failed write (surfaced by any later call) becomes a WriteError."""
        try:
            call(*args, **kwargs)
        except (OSError, RuntimeError) as exc:
            event_file = getattr(getattr(self.writer.file_writer, "event_writer", None), "_file_name", None)
            self.writer = None  # it cannot write any more; close() must not try again
            self._deferred(exc, event_file or self.out_dir / "tb")

    def _deferred(self, exc: BaseException, what: str | Path) -> None:
        """Raise the failed write ``exc`` as a WriteError, or keep it (``defer_errors``)."""
        err = exc if isinstance(exc, WriteError) else write_error(what, exc)
        if not self.defer_errors:
            raise err from None
        if self.failure is None:
            self.failure = err
        self.enabled, self.writer = False, None

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            self._print(message)
        except OSError as exc:  # a closed pipe, a full disk under a redirect
            self._deferred(exc, getattr(self.stream, "name", "stdout"))

    def _print(self, message: str) -> None:
        if self.stream.isatty():
            from tqdm import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def progress(self, total: int, desc: str, interval: int = 50, initial: int = 0,
                 eta: Callable[[int, float], tuple[float, float]] | None = None) -> Progress:
        return Progress(total, desc, interval, self.enabled, self.stream, initial, eta,
                        on_error=lambda exc: self._deferred(exc, getattr(self.stream, "name", "stdout")))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and math.isfinite(value):
            self._tb(self.writer.add_scalar, tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            # TensorBoard renders text as markdown; indenting keeps YAML as a code block.
            self._tb(self.writer.add_text, tag, "    " + text.replace("\n", "\n    "), step)

    def filters(self, tag: str, weight: torch.Tensor, step: int) -> None:
        """conv1's filters as an image grid (the paper's Figure 3)."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        w = weight.detach().float().cpu()
        if w.shape[1] != 3:
            return
        lo = w.amin(dim=(1, 2, 3), keepdim=True)
        hi = w.amax(dim=(1, 2, 3), keepdim=True)
        w = (w - lo) / (hi - lo).clamp_min(1e-12)
        grid = make_grid(w, nrow=int(math.ceil(math.sqrt(w.shape[0]))), padding=1, pad_value=1.0)
        self._tb(self.writer.add_image, tag, grid, step)

    def run_hparams(self, cfg, epochs: int, best_top1: float, last) -> None:
        """The run's hyperparameters and final metrics, for TensorBoard's HParams view."""
        self.hparams(
            {"arch": cfg.model.arch, "groups": cfg.model.effective_groups, "init": cfg.model.init, "lr": cfg.optim.lr,
             "batch_size": cfg.data.batch_size, "weight_decay": cfg.optim.weight_decay,
             "schedule": cfg.schedule.kind, "epochs": epochs},
            {"hparam/best_top1": best_top1, "hparam/val_top1": last.top1, "hparam/val_top5": last.top5},
        )

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer is None:
            return
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self._tb(self.writer.add_hparams, flat, metrics, run_name="hparams")

    def epoch_metrics(self, row: dict) -> None:
        if not self.enabled or self.out_dir is None:
            return
        path = self.out_dir / "metrics.jsonl"
        line = (json.dumps(row) + "\n").encode()
        # One write of the whole line; on failure the file is cut back, so no half row is left.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self._deferred(exc, path)
            return
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, os.strerror(28))  # a short write: the disk filled up
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, size)
                except OSError:  # not a regular file (a device, a pipe): nothing to cut back
                    pass
                self._deferred(exc, path)
                return
        finally:
            os.close(fd)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(f"epoch/{key}", float(value), row["epoch"])

    def flush(self) -> None:
        if self.writer is not None:
            self._tb(self.writer.flush)

    def close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except (OSError, RuntimeError) as exc:
                raise write_error(self.out_dir / "tb", exc) from None


def _quiet_event_writer_thread() -> None:
    """TensorBoard's writer thread prints a traceback when its write fails, then hands the
    error to the next call on the writer, which :meth:`Tracker._tb` turns into one line."""
    previous = threading.excepthook
    if getattr(previous, "_alexnet_train", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._alexnet_train = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def epoch_row(epoch: int, lr: float, acc: dict, result, world_size: int, val_seconds: float) -> dict:
    """The epoch's metrics.jsonl row from the trainer's accumulators and the validation result."""
    seconds = max(acc["seconds"], 1e-9)
    return {
        "epoch": epoch, "lr": lr, "train_loss": acc["loss_sum"] / max(1, acc["images"]), "val_loss": result.loss,
        "val_top1": result.top1, "val_top5": result.top5, "val_images": result.images,
        "bad_images": acc["bad_images"], "images_per_s": acc["images"] * world_size / seconds,
        "data_wait": acc["data_seconds"] / seconds,
        # training (across an interruption) and validation, not the time between runs
        "epoch_seconds": acc["seconds"] + val_seconds,
    }


def epoch_line(row: dict, epochs: int) -> str:
    """The log line of an epoch's row."""
    return (f"epoch {row['epoch']}/{epochs}: lr {row['lr']:.4g} train_loss {row['train_loss']:.4f} "
            f"val_loss {row['val_loss']:.4f} val_top1 {row['val_top1']:.2f}% val_top5 {row['val_top5']:.2f}% "
            f"({row['val_images']} images) {row['images_per_s']:.0f} img/s, data wait {100 * row['data_wait']:.0f}%, "
            f"took {format_duration(row['epoch_seconds'])}"
            + (f", {row['bad_images']} unreadable images skipped" if row["bad_images"] else ""))


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows :meth:`Tracker.epoch_metrics` wrote to ``OUT/metrics.jsonl``, one dict per epoch."""
    text = (Path(out_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def versions() -> dict:
    import PIL
    import torchvision

    from . import __version__

    return {
        "alexnet_train": __version__,
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only=True
        "torchvision": str(torchvision.__version__),
        "pillow": str(PIL.__version__),
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
    }
