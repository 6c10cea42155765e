"""The training loop: the step, the epoch, and the run of epochs.

Usage::

    result = fit(cfg, splits, out_dir, tracker, stop=stop_signals, resume_state=None)

``fit`` runs epochs of SGD and validation, writes checkpoints through
:mod:`alexnet_train.checkpoint` and everything visible through
:mod:`alexnet_train.tracking`.  When ``stop.signum`` is set (the run's
lifecycle turns SIGINT/SIGTERM/SIGUSR1 into it) the current step finishes, a
resumable checkpoint is saved and :class:`Interrupted` is raised; under DDP
the ranks agree on it every ~:data:`STOP_CHECK_SECONDS` of steps (training or
validation), whatever ``train.log_interval`` is, so all stop at the same step
within a bounded time.  ``train.checkpoint_steps`` / ``train.checkpoint_minutes``
save a resumable mid-epoch ``last.pth`` as well.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .agreement import Decision, RankAgreement
from .config import Config
from .configload import config_to_dict
from .data.datasets import BadImages
from .data.loaders import Loaders, Splits, build_loaders
from .data.ahead import decode_ahead
from .data.batching import DecodeOnDevice
from .data.transforms import BatchPreprocess
from .distributed import DistInfo, all_reduce_sum
from .evaluate import EvalResult, evaluate
from .logwindow import LogWindow
from .resume import sample_lists as split_sample_lists
from .rngstate import gather_rng_states, restore_rng_states, rng_state, seed_rank, step_seed
from .errors import REPEAT_SECONDS, Interrupted, NonFiniteLoss, OutOfMemory, run_errors
from .optim import build_sgd, start_momentum
from .device import MEMORY_FORMATS, configure_device, is_out_of_memory, memory_line, resolve_device
from .precision import amp_dtype
from .wrapping import compiled, settle_ddp_buckets, uses_cuda_graphs, wrap
from .schedule import LrPolicy
from .tracking import RunClock, Tracker, epoch_line, epoch_row, versions
from .transfer import Pretrained, start_model


class StopRequest:
    """What the trainer reads between steps: the signal number of a stop request, or None."""

    signum: int | None = None


# Under DDP the ranks check for a stop request together every this many seconds of steps
# (at the last log step's pace, the slowest rank's): a stop is acted on within ~2 s of
# steps plus the save, whatever train.log_interval is, at the cost of one small all-reduce
# (and host sync) per ~2 s.  One process acts on its own signal after the step it is in.
STOP_CHECK_SECONDS = 2.0


@dataclass
class FitResult:
    epochs_run: int
    best_top1: float
    last: EvalResult | None
    stopped_early: bool


class Trainer:
    def __init__(self, cfg: Config, splits: Splits, out_dir: Path, tracker: Tracker,
                 dist: DistInfo | None = None, resume_state: dict | None = None,
                 pretrained: Pretrained | None = None, resume_path: Path | None = None,
                 device: torch.device | None = None, sample_lists: dict | None = None) -> None:
        self.cfg, self.splits, self.out_dir, self.tracker = cfg, splits, out_dir, tracker
        # Each split's sample count and fingerprint, recorded in every checkpoint: a resume on
        # changed data says so (resume.resume_on_data).
        self.sample_lists = sample_lists if sample_lists is not None else split_sample_lists(splits)
        self.dist = dist or DistInfo()
        # The lifecycle chose it (and made it current) before the process group; alone, choose here.
        self.device = device if device is not None else resolve_device(cfg.train.device, self.dist.local_rank)[0]
        configure_device(self.device, cfg.train.tf32, cfg.train.threads)
        seed = cfg.train.seed
        seed_rank(seed, self.dist.rank)

        self.model = start_model(cfg.model, pretrained, resume_state is not None, tracker.log)
        self.model = self.model.to(self.device, memory_format=MEMORY_FORMATS[cfg.train.channels_last])
        # Where the weights came from; a resumed run keeps its checkpoint's record.
        self.transfer = pretrained.record() if pretrained is not None else None
        if cfg.optim.head_lr_mult != 1.0:
            tracker.log(f"optim.head_lr_mult={cfg.optim.head_lr_mult:g}: fc8 learns at {cfg.optim.head_lr_mult:g} x lr")
        self.amp_dtype = amp_dtype(cfg.train.amp, self.device, tracker.log)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._wrapped = wrap(self.model, cfg.dist.mode, self.device, self.dist.distributed, self.amp_dtype,
                             tracker.log)
        self.net = compiled(self._wrapped, cfg.train.compile, tracker.log, cfg.train.compile_mode)
        self.graphs = uses_cuda_graphs(cfg.train.compile, cfg.train.compile_mode, self.device)
        # On CUDA the fused kernel: besides being one launch, it is the SGD that takes the
        # GradScaler's inf check on the device, so fp16 steps need no .item() (a host sync).
        # The CPU keeps the default kernels.
        self.fused = self.device.type == "cuda"
        self.optimizer = build_sgd(self.model, cfg.optim, fused=self.fused)
        self.policy = LrPolicy(cfg.schedule, cfg.optim.lr, cfg.train.epochs)
        self.loaders: Loaders = build_loaders(cfg.data, splits, self.dist, seed, pin_memory=self.device.type == "cuda")
        tracker.log(self.loaders.workers_line)
        self.clock = RunClock(cfg.train.epochs, len(self.loaders.train), len(self.loaders.val))
        self.preprocess = BatchPreprocess(cfg.data, self.device, channels_last=cfg.train.channels_last)
        # The colour noise is drawn where it is used: a host draw would be copied over,
        # a host-device sync every step.
        self.noise_generator = torch.Generator(device=self.device)
        self.decoder = DecodeOnDevice(self.device) if cfg.data.decode == "device" else None
        self.epoch = 0  # next epoch to run (0-based)
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_top1 = -1.0
        self.best_epoch = 0
        self.accum = self._fresh_accum()
        bad = BadImages(cfg.data.on_bad_image, cfg.data.max_bad_fraction,
                        {"train": len(splits.train), "val": len(splits.val)}, tracker.log)
        # Under DDP what one rank meets alone (an unreadable image, a dead loader, rank 0's failed
        # write) is held there until the ranks' next agreement, where every rank acts on it.
        self.agreement = RankAgreement(self.dist, self.device, bad, run_errors(), self._count_bad,
                                       held_elsewhere=lambda: tracker.failure)
        self.saves = ckpt.SaveSchedule(cfg.train.checkpoint_steps, cfg.train.checkpoint_minutes)
        # Steps between the ranks' stop checks, agreed at each log step (1 until the first).
        self.stop_every = 1
        self.stopped_by = 0  # the stop agreed during validation (its signal number)
        # The fewest val batches any rank holds (shards differ by one): agreed once, here, not
        # at each validation's start, where the all-reduce would come just before the val
        # loader forks its workers (a fork while a gloo thread takes the GIL can leave the
        # child deadlocked in CPython's after-fork; seen once in ~200 2-rank launches).
        self.val_shared = len(self.loaders.val)
        if self.dist.distributed:
            self.val_shared = -int(self.agreement.agree(-self.val_shared)[0])
        self.batch = self.loaders.train.batch_size
        self.last_eval: EvalResult | None = None
        # What a failure can truthfully say is on disk (a NaN in the first epoch has nothing).
        self.last_saved: str | None = None
        if resume_state is not None:
            self._restore(resume_state)
            self.last_saved = f"the checkpoint this run resumed from, {resume_path} ({self._position()}), is kept"
        if isinstance(self._wrapped, nn.parallel.DistributedDataParallel):
            settle_ddp_buckets(self.net, self.optimizer, self._blank_inputs(), self.amp_dtype)

    @staticmethod
    def _fresh_accum() -> dict:
        return {"loss_sum": 0.0, "images": 0, "seconds": 0.0, "data_seconds": 0.0, "bad_images": 0}

    def _count_bad(self, n: int) -> None:
        self.accum["bad_images"] += n

    def _blank_inputs(self) -> torch.Tensor:
        """A batch of zeros in the training input's shape and layout (a zero-weight step's)."""
        size = self.cfg.data.crop_size
        x = torch.zeros((self.batch, 3, size, size), device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the device picks the kernel, not the checkpoint
            group["fused"] = True if self.fused else None
            group["foreach"] = None
        start_momentum(self.optimizer)  # a checkpoint written before the first step has no buffers
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.policy.load_state_dict(state["policy"])
        # The config may change the base lr on resume; a plateau's reduced lr is kept.
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_top1 = state["best_top1"]
        self.best_epoch = state["best_epoch"]
        self.accum = dict(state["accum"])
        self.transfer = state.get("transfer", self.transfer)
        # Each rank continues its own random streams (dropout differs per rank).
        restore_rng_states(state, self.dist)

    def _position(self) -> str:
        if self.step_in_epoch == 0:
            return f"after epoch {self.epoch}" if self.epoch else "before the first step"
        return f"epoch {self.epoch + 1}, step {self.step_in_epoch}"

    def state(self, rng_ranks: list | None = None) -> dict:
        rng_ranks = rng_ranks or [rng_state()]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "policy": self.policy.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "accum": dict(self.accum),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks,
            "config": config_to_dict(self.cfg),
            "classes": list(self.splits.classes),
            "sample_lists": self.sample_lists,
            "versions": versions(),
            "val": self.last_eval.as_dict() if self.last_eval else None,
            "transfer": self.transfer,
        }

    def save(self, names: tuple[str, ...] = ()) -> Path:
        """Write last.pth atomically and copy it to each of ``names``.

        Every rank calls it at the same step: rank 0 writes the random states of all ranks,
        and all ranks learn whether it could (rank 0's WriteError stops them all, one line).
        """
        last = self.out_dir / "last.pth"
        ranks = gather_rng_states(self.dist)
        failure: ckpt.WriteError | None = None
        if self.dist.is_main:
            try:
                ckpt.save_checkpoint(self.state(ranks), last)
                for name in names:
                    ckpt.copy_file(last, self.out_dir / name)
                ckpt.prune_epoch_checkpoints(self.out_dir, self.cfg.train.keep_last)
            except ckpt.WriteError as exc:
                failure = exc
        if failure is not None:
            self.agreement.fail(failure)  # one process: raised here
        self.agreement.settle(after_save=True)
        self.saves.saved()
        self.last_saved = f"the last good checkpoint, {last} ({self._position()}), is kept"
        return last

    def step_noise_generator(self, epoch: int, step: int) -> torch.Generator:
        """The generator of the colour noise of one training step, on the training device.

        Seeded from (train.seed, epoch, step) alone, so a resumed run draws what an
        uninterrupted one did: bit for bit on the CPU, and on CUDA for the same device and
        seed.  (The same generator object is reseeded each step.)
        """
        return self.noise_generator.manual_seed(step_seed(self.cfg.train.seed, epoch, step))

    def _sync_point(self, window: LogWindow, stop: int, save: bool) -> tuple[float, Decision]:
        """The one host sync of a log interval: the window's loss sum, and what every rank does
        next (stop, save, fail on a non-finite loss), agreed by all ranks; and how many steps
        make :data:`STOP_CHECK_SECONDS` at the slowest rank's pace."""
        loss_sum = window.read()
        decision = self.agreement.decide(stop, save, not math.isfinite(loss_sum), window.seconds_per_step())
        self.stop_every = max(1, int(STOP_CHECK_SECONDS / max(decision.step_seconds, 1e-6)))
        return loss_sum, decision

    def _stop_due(self, stop: StopRequest) -> bool:
        """After a step that is no log step: whether to stop now.  One process: its own signal.
        DDP: every ``stop_every`` steps, whether any rank holds one (all ranks check at the
        same steps: the count is agreed, and the steps are shared)."""
        if not self.dist.distributed:
            return stop.signum is not None
        if self.global_step % self.stop_every:
            return False
        return self.agreement.stop_now(stop.signum or 0) != 0

    def _stopping(self, signum: int) -> None:
        note = " (Slurm's warning before a time limit or preemption)" if signum == signal.SIGUSR1 else ""
        self.tracker.log(f"{signal.Signals(signum).name} received{note}: saving a resumable checkpoint "
                         f"({self._position()}); a stop signal {REPEAT_SECONDS:g} s or more after the first "
                         "aborts without saving")

    def _set_lr(self, lr: float) -> None:
        # The multiplier comes from the config (like the base lr, it may change on resume).
        for group in self.optimizer.param_groups:
            group["lr"] = lr * (self.cfg.optim.head_lr_mult if group.get("head") else 1.0)

    def train_epoch(self, stop: StopRequest) -> None:
        loader = self.loaders.train
        loader.sampler.set_epoch(self.epoch, start=self.step_in_epoch * loader.batch_size)
        total = self.step_in_epoch + len(loader)
        self.net.train()
        lr = self.policy.lr
        self._set_lr(lr)
        window = LogWindow(self.accum, self.cfg.train.log_interval, self.dist.world_size, self.device,
                           self.tracker, self.loaders.workers)
        with self.tracker.progress(total, f"epoch {self.epoch + 1}/{self.cfg.train.epochs} train", window.interval,
                                   initial=self.step_in_epoch, eta=self._eta("train")) as bar:
            for images, targets, bad in window.timed(self.agreement.guard(self._batches(loader), len(loader), stop,
                                                                         timeout=self.cfg.data.loader_timeout)):
                self.agreement.unreadable(bad, "train")
                window.add(*self._learn(images, targets))
                self.step_in_epoch += 1
                self.global_step += 1
                at_end = self.step_in_epoch == total
                steps_due = self.saves.steps_due(self.global_step, at_end)
                if not (window.should_log(self.step_in_epoch, at_end) or steps_due or self._stop_due(stop)):
                    bar.update(1)
                    continue
                loss_sum, decision = self._sync_point(window, stop.signum or 0, self.saves.time_due(at_end))
                if decision.nonfinite:
                    raise self.agreement.reported(self._nonfinite(loss_sum, lr))
                window.log(loss_sum, lr, self.global_step, bar)
                bar.update(1)
                if decision.stop:
                    self._stopping(decision.stop)
                    raise Interrupted(decision.stop, self.save())
                if steps_due or decision.save:
                    self._save_mid_epoch()
        if stop.signum is not None and self.step_in_epoch < total:  # the loader's workers died of the stop
            self._stopping(stop.signum)
            raise Interrupted(stop.signum, self.save())
        self.clock.finished("train", bar.seconds_per_step())

    def _learn(self, images: torch.Tensor | None, targets: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """One SGD step on a batch; returns (loss x images, images) for the log window.

        A batch with no readable image is no step in one process.  Under DDP the rank still
        takes a step, of the same shape with a zero loss: DDP's gradient all-reduce needs every
        rank, and a zero-weight step adds nothing to the others' gradients.
        """
        if images is None or targets.numel() == 0:
            if not self.dist.distributed:
                return None, 0
            inputs, targets = self._blank_inputs(), None
        else:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            gen = self.step_noise_generator(self.epoch, self.step_in_epoch)
            inputs = self.preprocess(images, train=True, generator=gen)
        if self.graphs:  # a new step: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.net(inputs)
        loss = F.cross_entropy(logits.float(), targets) if targets is not None else logits.float().sum() * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = targets.shape[0] if targets is not None else 0
        return loss.detach() * n, n

    def _nonfinite(self, loss_sum: float, lr: float) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"training loss is {loss_sum if not math.isfinite(loss_sum) else 'not finite'} at "
            f"epoch {self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step}), "
            f"lr {lr:.4g}; stopped without saving; "
            + (self.last_saved or f"no checkpoint was written yet, {self.out_dir} holds none of "
               "this run (lower optim.lr, or check the data)"))

    def _save_mid_epoch(self) -> None:
        started = time.perf_counter()
        path = self.save()
        self.tracker.log(f"checkpoint: {path} at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                         f"({time.perf_counter() - started:.1f} s)")

    def _eta(self, phase: str):
        """(epoch left, run left) in seconds for the progress of ``phase`` of the current epoch."""
        epoch = self.epoch
        return lambda steps_left, per_step: self.clock.left(epoch, phase, steps_left, per_step)

    def _batches(self, loader):
        """The loader's (uint8 images, targets, unreadable files), decoded on the device first
        under ``data.decode: device``, one batch ahead (:mod:`alexnet_train.data.ahead`)."""
        if self.decoder is None:
            for images, targets, bad in loader:
                yield images, targets, bad
        else:
            yield from decode_ahead(loader, self.decoder, self.device)

    def validate(self, stop: StopRequest) -> EvalResult | None:
        """The epoch's validation; None when a stop request ended it (``stopped_by`` says which)."""
        loader = self.loaders.val
        self.stopped_by = 0
        with self.tracker.progress(len(loader), f"epoch {self.epoch + 1}/{self.cfg.train.epochs} val",
                                   self.cfg.train.log_interval, eta=self._eta("val")) as bar:
            try:
                # Under the training's autocast: the accuracy it reports is the model it trains.
                batches = self.agreement.guard(self._batches(loader), len(loader), stop, blank=False,
                                               timeout=self.cfg.data.loader_timeout)
                batches = self._until_agreed(batches, stop) if self.dist.distributed else _until(batches, stop)
                result = evaluate(self.net, batches, self.preprocess, self.device,
                                  progress=bar,
                                  all_reduce=all_reduce_sum if self.dist.distributed else None,
                                  bad_images=lambda bad: self.agreement.unreadable(bad, "val"), amp_dtype=self.amp_dtype)
            except RuntimeError as exc:
                if stop.signum is not None and not self.dist.distributed and not is_out_of_memory(exc):
                    return None  # stopped before the first batch
                raise
        if self.stopped_by or stop.signum is not None and not self.dist.distributed:
            return None
        self.clock.finished("val", bar.seconds_per_step())
        return result

    def _until_agreed(self, batches, stop: StopRequest):
        """DDP validation's batches until the ranks agree to stop (``stopped_by``).  Ranks hold
        val shards that differ by a batch, so they check together every ``stop_every``
        batches below the fewest any rank holds (``val_shared``); all of them stop after the
        same batch.  A rank whose batches end early (its loader failed: the failure is held
        for the ranks' next agreement) still takes the checks the others take."""
        shared = self.val_shared
        taken = 0
        for i, batch in enumerate(batches):
            if 0 < i < shared and i % self.stop_every == 0 and self._stop_check(stop):
                return
            yield batch
            taken = i + 1
        for i in range(max(taken, 1), shared):
            if i % self.stop_every == 0 and self._stop_check(stop):
                return

    def _stop_check(self, stop: StopRequest) -> bool:
        self.stopped_by = self.agreement.stop_now(stop.signum or 0)
        return self.stopped_by != 0

    def run(self, stop: StopRequest | None = None) -> FitResult:
        cfg, tracker = self.cfg, self.tracker
        stop = stop or StopRequest()
        while self.epoch < cfg.train.epochs and not self.policy.should_stop:
            lr = self.policy.lr
            with self._memory("training"):
                self.train_epoch(stop)
            val_started = time.perf_counter()
            with self._memory("validation"):
                result = self.validate(stop)
            if self.dist.distributed:  # a rank's unreadable val images or dead loader, before the result is used
                self.agreement.settle()
            val_seconds = time.perf_counter() - val_started
            if result is None:
                # Validation abandoned: the epoch's training is saved, validation reruns on resume.
                signum = self.stopped_by or stop.signum
                self._stopping(signum)
                raise Interrupted(signum, self.save())
            self.last_eval = result
            events = self.policy.epoch_end(100.0 - result.top1)
            epoch = self.epoch + 1
            improved = result.top1 > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = result.top1, epoch
            row = epoch_row(epoch, lr, self.accum, result, self.dist.world_size, val_seconds)
            tracker.log(epoch_line(row, cfg.train.epochs) + (" *best*" if improved else ""))
            for event in events:
                tracker.log(event)
                tracker.text("schedule/events", event, epoch)
            tracker.epoch_metrics(row)
            tracker.filters("conv1/filters", self.model.convs()[0].weight, epoch)
            tracker.flush()
            self.epoch += 1
            self.step_in_epoch = 0
            self.accum = self._fresh_accum()
            names = [f"epoch-{epoch:03d}.pth"] if cfg.train.keep_last else []
            if improved:
                names.append("best.pth")
            if self.dist.distributed:  # rank 0's writes of this epoch's lines, before its checkpoint
                self.agreement.settle()
            last = self.save(tuple(names))
            signum = self.agreement.stop_now(stop.signum or 0)
            if signum:
                self.tracker.log(f"{signal.Signals(signum).name} received: stopping after epoch {epoch}, saved")
                raise Interrupted(signum, last)
        if self.last_eval is not None:
            tracker.run_hparams(cfg, self.epoch, self.best_top1, self.last_eval)
        if self.dist.distributed:
            self.agreement.settle()
        return FitResult(self.epoch, self.best_top1, self.last_eval, self.policy.should_stop)


    @contextlib.contextmanager
    def _memory(self, phase: str):
        """The device running out of memory in ``phase``, as one line: where, the batch size and
        what to try (OutOfMemory, exit 1).  Under DDP only the rank that met it knows; the
        others end with a lost peer (exit 1) once the backend notices it gone."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory is turned into a line
            if not is_out_of_memory(exc):
                raise
            data = self.cfg.data
            rank = f"rank {self.dist.rank}: " if self.dist.distributed else ""
            per = f" ({self.batch} per process)" if self.dist.world_size > 1 else ""
            failure = OutOfMemory(
                f"{rank}{self.device.type.upper() if self.device.type == 'cuda' else self.device.type} out of memory "
                f"in {phase} at epoch {self.epoch + 1}, step {self.step_in_epoch}, with data.batch_size="
                f"{data.batch_size}{per}{memory_line(self.device)}: lower data.batch_size (halve optim.lr with it: "
                f"--set data.batch_size={max(1, data.batch_size // 2)} optim.lr={self.cfg.optim.lr / 2:g})"
                + (", train in bf16 (train.amp=bf16)" if self.amp_dtype is None and self.device.type == "cuda" else "")
                + " or free the device of other processes; "
                + (self.last_saved or f"no checkpoint was written yet, {self.out_dir} holds none of this run"))
            raise failure from None


def _until(loader, stop: StopRequest):
    """Iterate ``loader`` until a stop signal arrives."""
    for batch in loader:
        if stop.signum is not None:
            return
        yield batch


def fit(cfg: Config, splits: Splits, out_dir: Path, tracker: Tracker, dist: DistInfo | None = None,
        resume_state: dict | None = None, pretrained: Pretrained | None = None,
        stop: StopRequest | None = None, resume_path: Path | None = None,
        device: torch.device | None = None, sample_lists: dict | None = None) -> FitResult:
    trainer = Trainer(cfg, splits, out_dir, tracker, dist, resume_state, pretrained, resume_path, device,
                      sample_lists)
    try:
        return trainer.run(stop)
    finally:
        trainer.loaders.close()
