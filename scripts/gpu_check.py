#!/usr/bin/env python3
"""Every GPU number the docs need (docs/benchmarks.md), in one command that fits a fixed time window.

    python scripts/gpu_check.py --data DIR --report FILE.json [--budget 300] [--steps 300]
                                [--wheels DIR] [--skip PART ...]
    python scripts/gpu_check.py --plan [--budget 300] [--skip PART ...]   # the plan only; runs nothing

DIR is an ImageFolder of JPEGs (``<class>/<file>.JPEG``), e.g. the 256 px copy
(``alexnet-prepare``, ~30 MB) of the 1000 photos of ``alexnet-data imagenet-sample``.
A fresh GPU machine whose image has torch, torchvision, tensorboard, tqdm, pyyaml,
pillow and pytest needs only ``python -m pip install --no-deps -e .``.  ``--wheels DIR`` installs
the wheels carried there (e.g. a TorchCodec built for that torch) into a temporary
folder put first on every part's PYTHONPATH; without it nothing is installed.

The parts, in this order, each a subprocess; share = of the time left when it starts:

  part                 GPU: share  min   CPU: share  min   what it gives the docs
  smoke                      6 %   25 s        14 %  28 s  the environment, and one real training step per
                                                           precision (fp32, tf32, bf16, fp16, bf16 +
                                                           channels_last) through Trainer.train_epoch on
                                                           DIR's images: finite loss, seconds, host syncs
  cuda_guards               16 %   50 s         5 %  10 s  pytest -m "cuda and guard": the LRN kernels equal
                                                           F.local_response_norm, fp16's step 2 after an
                                                           overflow, one device per rank, the sync-free step
  lrn                        8 %   25 s         5 %   8 s  bench_lrn: the LRN alone, the one-pass LRN (Triton,
                                                           torch, torch.compile) against the model's old
                                                           F.local_response_norm, conv1/conv2 x NCHW/channels_last
  bench_model               14 %   40 s        10 %  12 s  the model's ceiling, eager: paper/torchvision x
                                                           bf16/fp16/tf32/none x NCHW/channels_last
  breakdown                 14 %   45 s        10 %  12 s  bench_model --breakdown: the paper's widths, bf16,
                                                           LRN off/fused/legacy x groups 1/grouped/split x
                                                           NCHW/channels_last, and each part's ms per step
  loader                     8 %   30 s         8 %  10 s  bench_data --rate: the loader alone, the 256 px copy
                                                           as files and as shards, at 8, 12 and 16 workers
  paper_run                 12 %   40 s        20 %  25 s  configs/paper.yaml with its own defaults (train.amp
                                                           auto, NCHW), one epoch of N steps, one checkpoint
  bench_train_worker         6 %   25 s         8 %  15 s  the whole step, ours against a pytorch/examples
                                                           loop, data.decode=worker
  bench_train_device         6 %   25 s         8 %  15 s  the same with data.decode=device
  cuda_tests                12 %   45 s        12 %  10 s  pytest -m "cuda and not guard", each test's outcome
  compiled                  20 %   75 s          (skipped) torch.compile'd variants, best eager precision,
                                                           modes default and reduce-overhead (CUDA graphs)

Why this order: a window can end early, so what the docs need most comes first.  At
``--budget 300`` everything through bench_train_worker runs (``--plan`` shows it).
The smoke part is cheap and says at once whether each precision trains at all (a NaN
under fp16 makes every later fp16 number moot); the guard tests come next: they check
what would corrupt a run or stop it before step 1 (the LRN kernels' values and gradients,
fp16's momentum after a skipped step, the GPU each rank takes, a step without host
syncs), and a number measured on a run they fail is moot; the LRN ratio and the
breakdown say where the paper model's step goes; bench_model's best variant is the
headline (minutes per ImageNet epoch if the loader keeps up) and picks the variant
bench_train uses; the loader's own ceiling says whether the data side can keep up; the
paper run confirms it end to end at paper.yaml's own settings, sized from bench_model's
rate.  bench_train and the other cuda tests come after the numbers: they are
correctness checks and comparisons whose CPU halves already pass here, and a cut run
still records each test that finished.  Compiling takes a minute or more per variant,
for a gain the eager numbers already bound, so it runs last, on what is left.
Why these shares: the benchmarks are sized to their share (steps per variant, timed
seconds, training steps), so a share is what a figure costs at a useful precision;
pytest cannot be sized, so it gets a large one.  Each part's share is of the time
left when it starts, over the parts still to run: time a part did not use goes to
the later ones.  A part whose minimum no longer fits is skipped ("budget").  A
minimum is what the part needs to say anything: on a GPU the imports, model builds,
loader start and cuDNN autotuning before the first figure (a compile before the
first compiled row); on the CPU, what the 61M-parameter model's builds and steps
take on 2 cores, where the paper run gets the largest share for the same reason.

The budget is never overrun: the hard stop comes a few seconds before the budget's
end.  Every part runs in its own process group (``start_new_session``) with a
deadline, the earlier of its share's end and the hard stop; at the deadline its
whole group gets SIGTERM, after a short grace SIGKILL (``subprocess.run(timeout=)``
would kill the child only and leave DataLoader workers or pytest's children running),
and what it printed so far is parsed, so a cut part still reports what it measured.
A part that ends by itself has whatever it left in its group killed too.  Each part
leader also gets SIGKILL when gpu_check dies (Linux's PR_SET_PDEATHSIG); a running
part's process group is in the report (``pgid``).

FILE.json and FILE.txt (the same in lines that say what each figure means, printed
at the end) are replaced atomically at the start, when each part starts and ends,
and while a part reports figures, so gpu_check killed at any moment, even by
SIGKILL, leaves a valid report: every part done, cut, failed, skipped (each with
why) or running, ``finished: false``.  FILE.log holds every part's output.

Peak GPU memory: every part that trains or benchmarks on CUDA (smoke per variant, lrn,
bench_model, breakdown, paper_run, bench_train_*, compiled) records torch.cuda's
max_memory_allocated() and max_memory_reserved() into its figures (``gpu_memory``; smoke:
each variant's row, after reset_peak_memory_stats), printed with the part.  A part's
script runs inside a small wrapper process (``--worker peak``) that polls the peaks every
second and writes them once more at exit, so a cut part keeps its peak too.  The figure
is the part's largest (over all its variants where one process runs several); the
loader and pytest parts are not measured.  Reserved is what torch's caching allocator
holds; nvidia-smi shows that plus the CUDA context (a few hundred MiB).

Without a GPU it says so first and runs the same plumbing on the CPU at tiny sizes
(compiled variants are skipped: minutes of compiling on a CPU say nothing about a
GPU); the numbers are then no GPU's.

Exit codes: 0 nothing failed (cut and skipped parts are not failures; the report
says which and why); 1 a part failed; 2 bad usage; 128 + signal number when
gpu_check itself was stopped by SIGINT / SIGTERM / SIGHUP (the report says so).
"""
from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, before anything else is loaded

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images: one epoch
# alexnet_train.data.datasets's list; this process does not import torch (it only plans and waits).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRACE_S = 2.0  # between a cut part's SIGTERM and its SIGKILL
MARGIN_S = GRACE_S + 2.0  # the hard stop is this long before the budget's end: the grace, the reaping, the report
PROBE_S = 60.0  # the environment probe imports torch once; longer means something is wrong
SAVE_EVERY_S = 2.0  # a running part's new figures reach the report at most this often
TAG = "gpu_check-row: "  # how the probe and smoke workers mark their JSON lines
PEAK_POLL_S = 1.0  # how often the peak wrapper writes torch.cuda's peaks while the part runs
GIB = 2**30
BEST_DEFAULT = "ours: paper, bf16, channels_last"  # when bench_model measured nothing to choose from


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    gpu: tuple[float, float]  # (share of the time left, minimum seconds) with a GPU
    cpu: tuple[float, float] | None  # the same on the CPU; None: not run without a GPU


SPECS = (
    Spec("smoke", "one real paper.yaml training step per precision (Trainer.train_epoch on DIR's images)",
         (0.06, 25), (0.14, 28)),
    Spec("cuda_guards", "pytest -m 'cuda and guard': the LRN kernels' equalities, fp16's step 2, one device per "
         "rank, the sync-free step", (0.16, 50), (0.05, 10)),
    Spec("lrn", "the paper's LRN alone, forward + backward: the one-pass LRN (Triton) against "
         "F.local_response_norm as the model ran it before", (0.08, 25), (0.05, 8)),
    Spec("bench_model", "model-only training step on a batch already on the device, eager "
         "(the ceiling); ratio to torchvision's AlexNet in float32", (0.14, 40), (0.10, 12)),
    Spec("breakdown", "where the paper model's step goes: LRN off/fused/legacy x groups 1/grouped/split x "
         "NCHW/channels_last, bf16", (0.14, 45), (0.10, 12)),
    Spec("loader", "the loader alone, no model: the 256 px copy as files and as shards, at 8, 12 and 16 workers",
         (0.08, 30), (0.08, 10)),
    Spec("paper_run", "configs/paper.yaml with its own defaults: one epoch of N steps, one checkpoint at the end",
         (0.12, 40), (0.20, 25)),
    Spec("bench_train_worker", "whole training step, ours vs a pytorch/examples loop, data.decode=worker",
         (0.06, 25), (0.08, 15)),
    Spec("bench_train_device", "whole training step, ours vs a pytorch/examples loop, data.decode=device",
         (0.06, 25), (0.08, 15)),
    Spec("cuda_tests", "pytest -m 'cuda and not guard': the other tests of what behaves differently on CUDA",
         (0.12, 45), (0.12, 10)),
    Spec("compiled", "torch.compile'd bench_model variants at the best eager precision, modes default and "
         "reduce-overhead (CUDA graphs)", (0.20, 75), None),
)
NAMES = [s.name for s in SPECS]

# Seconds a part spends besides what it is sized by (imports, model builds, loader
# start, cuDNN autotuning, checkpoint writes): guesses, kept on the safe side.
OVERHEAD = {  # (GPU, CPU)
    "bench_model": (10.0, 4.0), "bench_model_variant": (2.0, 1.5), "bench_train": (15.0, 14.0),
    "paper_run": (25.0, 16.0),
}
SIZED = 0.8  # the part of its time a sized part plans to use; the rest absorbs bad guesses

ROW = re.compile(r"^(?P<label>(?:baseline|ours): .+?)\s+(?P<rate>[\d.]+) images/s\s+(?P<ratio>[\d.]+)x\s+"
                 r"(?P<minutes>[\d.]+) min/epoch")
PYTEST_LINE = re.compile(r"^(?P<id>\S+::\S+)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                         r"(?:\s+\((?P<reason>.*)\))?\s*(?:\[\s*\d+%\])?\s*$")
AMPS = ("none", "tf32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead")  # the compiled part's torch.compile modes (train.compile_mode)
BREAKDOWN_ROWS = 9  # bench_model --breakdown's variants per memory format: LRN off/fused/legacy x 3 towers
LRN_ROW = re.compile(r"^(?P<impl>\S.*?)\s+(?P<layer>conv\d)\s+(?P<dtype>\w+)\s+(?P<fmt>nchw|channels_last)\s+"
                     r"(?P<ms>[\d.]+) ms\s+(?P<ratio>[\d.]+)x$")


def probe_worker() -> int:
    """Print the environment as one JSON line: device, versions, decoders."""
    import platform

    import torch
    import torchvision

    import alexnet_train
    from alexnet_train.data import decode

    gpu = torch.cuda.is_available()
    env = {
        "gpu": gpu, "device": torch.cuda.get_device_name(0) if gpu else "cpu (no CUDA GPU found)",
        "gpus": torch.cuda.device_count() if gpu else 0, "host": platform.node(), "cpus": os.cpu_count(),
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
        "alexnet_train": getattr(alexnet_train, "__version__", "?"), "python": platform.python_version(),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpu else None,
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    # DEVICE_DECODER (torchcodec | torchvision | None) where alexnet_train has the torchvision
    # fallback; before it, data.decode: device meant TorchCodec, i.e. FAST_DECODER.
    env["decoder_device"] = getattr(decode, "DEVICE_DECODER", getattr(decode, "FAST_DECODER", None))
    env["decoder_device_problem"] = getattr(decode, "DEVICE_DECODER_PROBLEM", None)
    env["decoder_worker"] = getattr(decode, "FAST_DECODER", None) or "PIL"
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg  # noqa: F401  (the native library loads here)

        env["torchcodec"] = f"loads ({getattr(torchcodec, '__version__', '?')})"
    except Exception as exc:  # any failure to load is the answer, not an error of the probe
        env["torchcodec"] = f"not loadable: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    print(TAG + json.dumps(env), flush=True)
    return 0


SMOKE_VARIANTS = (  # name, train.* overrides
    ("fp32", ["train.amp=none", "train.tf32=false"]),
    ("tf32", ["train.amp=none", "train.tf32=true"]),
    ("bf16", ["train.amp=bf16"]),
    ("fp16", ["train.amp=fp16"]),
    ("bf16+channels_last", ["train.amp=bf16", "train.channels_last=true"]),
)


def smoke_worker(data: str, device: str) -> int:
    """One JSON line per variant: a few real steps of Trainer.train_epoch on DIR's images."""
    import tempfile as tmp
    import warnings

    import torch

    from alexnet_train.configload import load_config
    from alexnet_train.data.datasets import scan_image_folder
    from alexnet_train.data.loaders import Splits
    from alexnet_train.distributed import DistInfo
    from alexnet_train.tracking import Tracker
    from alexnet_train.errors import NonFiniteLoss
    from alexnet_train.train import StopRequest, Trainer

    gpu = device == "cuda"
    batch, steps = (32, 4) if gpu else (2, 2)
    classes, samples = scan_image_folder(data)
    picked = (samples * (batch * steps // len(samples) + 1))[: batch * steps]
    failed = False
    for name, sets in SMOKE_VARIANTS:
        row: dict = {"variant": name, "overrides": sets, "steps": steps, "batch": batch}
        started = time.perf_counter()
        if gpu:  # each variant's own peak, not the largest so far
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            # log_interval above the steps: the only sync the loop itself asks for is the
            # loss read at the epoch's last step.
            cfg = load_config(ROOT / "configs" / "paper.yaml", [
                f"model.num_classes={len(classes)}", f"data.batch_size={batch}", "data.workers=0",
                f"train.device={device}", "train.epochs=1", "train.log_interval=1000", *sets])
            with tmp.TemporaryDirectory() as out:
                trainer = Trainer(cfg, Splits(classes, picked, picked[:batch]), Path(out),
                                  Tracker(None, enabled=False), DistInfo())
                row["built_s"] = round(time.perf_counter() - started, 2)
                batches = trainer._batches

                def counted(loader):
                    for i, item in enumerate(batches(loader)):
                        yield item
                        if i == 0 and gpu:  # step 1 is done; count from the fetch of batch 2 on
                            torch.cuda.synchronize()
                            torch.cuda.set_sync_debug_mode("warn")

                trainer._batches = counted
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # the same warning from the same line, each time
                    try:
                        trainer.train_epoch(StopRequest())  # no signal handler: SIGTERM ends it at once
                    finally:
                        if gpu:
                            torch.cuda.set_sync_debug_mode(0)
                acc = trainer.accum
                loss = acc["loss_sum"] / max(1, acc["images"])
                row.update(loss=round(loss, 4) if math.isfinite(loss) else str(loss), finite=math.isfinite(loss),
                           train_s=round(acc["seconds"], 3),
                           precision=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "float32",
                           channels_last=cfg.train.channels_last, tf32=cfg.train.tf32 if gpu else None,
                           host_syncs=sum("synchroniz" in str(w.message) for w in caught) if gpu else None)
                failed |= not row["finite"]
        except NonFiniteLoss as exc:
            row.update(finite=False, error=str(exc))
            failed = True
        except Exception as exc:  # reported per variant; the next one still runs
            row.update(finite=None, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:400])
            failed = True
        row["seconds"] = round(time.perf_counter() - started, 2)
        row["gpu_memory"] = (memory_figures(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
                             if gpu else memory_figures(None, None, "no CUDA: the smoke part ran on the CPU"))
        print(TAG + json.dumps(row), flush=True)
    return 1 if failed else 0


def memory_figures(allocated: int | None, reserved: int | None, why: str | None = None) -> dict:
    """The report's record of a peak: torch.cuda.max_memory_allocated() / max_memory_reserved() in bytes
    and GiB, or why nothing was measured."""
    if allocated is None or reserved is None:
        return {"measured": False, "why": why or "not measured"}
    return {"measured": True, "max_memory_allocated": int(allocated), "max_memory_reserved": int(reserved),
            "allocated_gib": round(allocated / GIB, 2), "reserved_gib": round(reserved / GIB, 2)}


def memory_text(m: dict | None) -> str:
    """One phrase for a peak record, as the report prints it."""
    if not m:
        return "peak GPU memory: not recorded"
    if not m.get("measured"):
        return f"peak GPU memory: not measured ({m.get('why', '?')})"
    return (f"peak GPU memory {m['allocated_gib']:.2f} GiB allocated, {m['reserved_gib']:.2f} GiB reserved "
            "(torch.cuda.max_memory_allocated / max_memory_reserved)")


def replace_text(path: str | Path, body: str) -> None:
    """Write ``body`` to ``path`` through a temporary file and ``os.replace``: a reader, or a process
    killed mid-write, sees the old file or the new one, never half of one.  No fsync: a killed
    process, not a lost machine, is the case this guards (the kernel still writes the pages)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(body)
    os.replace(tmp, path)


def peak_worker(out: str, cmd: list[str]) -> None:
    """Run a part's script (``PATH ARGS``) or module (``-m NAME ARGS``) in this process and keep torch.cuda's
    peak memory in ``out`` (JSON): every PEAK_POLL_S while it runs, so a part cut by SIGKILL still leaves
    its peak, and once more when it ends.  Its exit is the script's own (SystemExit passes through)."""
    import runpy
    import threading

    import torch

    cuda = torch.cuda.is_available()

    def record() -> None:
        if not cuda:
            value = memory_figures(None, None, "no CUDA device in this process")
        elif not torch.cuda.is_initialized():
            value = memory_figures(None, None, "the part never used CUDA")
        else:
            value = memory_figures(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        try:
            replace_text(out, json.dumps(value))
        except OSError:  # the work dir is gone (gpu_check ended): nobody reads it any more
            pass

    record()
    stop = threading.Event()
    poller = None
    if cuda:  # a fresh process: its peaks are this part's alone, nothing to reset first
        def poll() -> None:
            while not stop.wait(PEAK_POLL_S):
                if torch.cuda.is_initialized():
                    record()

        poller = threading.Thread(target=poll, name="gpu_check-peak", daemon=True)
        poller.start()
    try:
        if cmd[0] == "-m":
            sys.argv = [cmd[1], *cmd[2:]]
            runpy.run_module(cmd[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(cmd)
            runpy.run_path(cmd[0], run_name="__main__")
    finally:
        stop.set()
        if poller is not None:
            poller.join(timeout=2 * PEAK_POLL_S)
        record()


def read_peak(path: Path) -> dict:
    """What the peak wrapper left in ``path``; not measured when it left nothing."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return memory_figures(None, None, "the part left no record (it died before the wrapper started)")


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux-like: no prctl
        return None


LIBC = _libc()
PARENT = os.getpid()


def _die_with_parent() -> None:
    """In the part's leader, after setsid: SIGKILL when gpu_check dies, even by SIGKILL."""
    if LIBC is not None and sys.platform.startswith("linux"):
        LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != PARENT:  # gpu_check died before the prctl took hold
        os._exit(1)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """True once the child has exited, without reaping it: the zombie keeps its pid, so the
    process group id stays its own while what it left behind is killed."""
    if hasattr(os, "waitid"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


@dataclass
class Ran:
    rc: int
    seconds: float
    cut: str | None  # why gpu_check stopped it; None when it ended by itself
    tail: list[str]
    partial: str  # its last unfinished line (pytest -v's test under way)


def parse_rows(lines: list[tuple[float, str]]) -> list[dict]:
    """bench_model's rows, with the seconds since the previous row (compile time shows there)."""
    rows, last = [], 0.0
    for at, line in lines:
        m = ROW.match(line.strip())
        if m:
            rows.append({"variant": m["label"], "images_per_s": float(m["rate"]), "ratio": float(m["ratio"]),
                         "imagenet_epoch_min": float(m["minutes"]), "seconds": round(at - last, 1)})
            last = at
    return rows


def best_row(rows: list[dict], arch: str | None = None) -> dict | None:
    ours = [r for r in rows if r["variant"].startswith("ours: ") and (arch is None or f"ours: {arch}," in r["variant"])]
    return max(ours, key=lambda r: r["images_per_s"], default=None)


def variant_of(label: str) -> tuple[str, str, bool]:
    """(arch, amp, channels_last) of a bench_model label such as 'ours: paper, bf16, channels_last'."""
    fields = [f.strip() for f in label.split(":", 1)[1].split(",")]
    return fields[0], fields[1], "channels_last" in fields[2:]


def variant_sets(label: str) -> list[str]:
    """The train.* overrides that make alexnet-train step the way bench_model's variant did."""
    _, amp, cl = variant_of(label)
    return [f"train.amp={amp if amp in ('bf16', 'fp16') else 'none'}",
            f"train.tf32={'false' if amp == 'none' else 'true'}",
            f"train.channels_last={'true' if cl else 'false'}", "train.compile=false"]


def parse_progress(line: str) -> dict | None:
    """Step, loss, img/s and data wait of one plain progress line of alexnet-train:
    'epoch 1/1 train 25/300 | loss 6.9077 | lr 0.01 | 812 img/s | data wait 3% | elapsed ...'."""
    m = re.match(r"^epoch \d+/\d+ train (\d+)/(\d+) \| (.*)$", line.strip())
    if not m:
        return None
    row = {"step": int(m[1]), "total": int(m[2])}
    for field in m[3].split(" | "):
        if field.startswith("loss "):
            row["loss"] = float(field[5:]) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", field[5:]) else field[5:]
        elif field.endswith(" img/s"):
            row["images_per_s"] = float(field[:-6])
        elif field.startswith("data wait ") and field.endswith("%"):
            row["data_wait"] = float(field[10:-1]) / 100
    return row


def fmt(value, spec: str = ".1f", none: str = "?") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else none


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.budget = float(args.budget)
        self.hard_stop = START + self.budget - MARGIN_S
        self.interrupted: int | None = None
        self.env: dict = {}
        self.gpu = False
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.pyenv = dict(os.environ, PYTHONUNBUFFERED="1")
        self.report_path: Path | None = args.report
        self.log_file = None
        self.images: list[tuple[str, str]] = []  # (class, path) of DIR
        self.parts = [{"name": s.name, "title": s.title, "status": "pending", "reason": None, "share": None,
                       "min_s": None, "allotted_s": None, "started_s": None, "seconds": None, "figures": {}}
                      for s in SPECS]
        self.report: dict = {
            "tool": "scripts/gpu_check.py", "finished": False, "interrupted": None, "exit_code": None,
            "budget_s": self.budget, "hard_stop_s": round(self.budget - MARGIN_S, 1), "seconds": 0.0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "gpu": None,
            "device": "probing", "versions": {}, "decoder": {}, "environment": {}, "wheels": None,
            "data": None, "work_dir": str(self.work), "notes": [], "parts": self.parts,
        }

    def elapsed(self) -> float:
        return time.monotonic() - START

    def spec_of(self, i: int) -> tuple[float, float] | None:
        return SPECS[i].gpu if self.gpu else SPECS[i].cpu

    def allotment(self, i: int, now: float) -> tuple[float | None, float]:
        """(seconds for part i, or None when its minimum does not fit; the seconds left)."""
        left = self.hard_stop - now
        todo = [j for j in range(i, len(SPECS)) if self.parts[j]["status"] in ("pending", "running")]
        total = sum(self.spec_of(j)[0] for j in todo) or 1.0
        share, need = self.spec_of(i)
        if left < need:
            return None, left
        return min(left, max(need, left * share / total)), left

    def save(self) -> None:
        if self.report_path is None:
            return
        self.report["seconds"] = round(self.elapsed(), 1)
        self.report["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        text = "\n".join(text_lines(self.report)) + "\n"
        replace_text(self.report_path, json.dumps(self.report, indent=2) + "\n")
        replace_text(self.report_path.with_suffix(".txt"), text)

    def say(self, message: str) -> None:
        print(f"gpu_check: {message}", flush=True)
        self.log(f"gpu_check: {message}")

    def log(self, line: str) -> None:
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def run(self, name: str, cmd: list[str], deadline: float, why: str, on_line=None, part: dict | None = None,
            env: dict | None = None, echo: bool = True) -> Ran:
        """Run ``cmd`` in its own process group until it ends or ``deadline`` (monotonic) passes;
        ``on_line(seconds, line)`` sees each line as it comes."""
        started = time.monotonic()
        tmpdir = self.work / f"tmp-{name}"  # the part's temporary files go with it, even when killed
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.log(f"$ {' '.join(cmd)}")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env or self.pyenv, TMPDIR=str(tmpdir)),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
        if part is not None:
            part["pgid"] = proc.pid
            self.save()
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        pending, eof, tail = b"", False, collections.deque(maxlen=60)
        exited_at = term_at = None
        killed, cut, last_save, dirty = False, None, time.monotonic(), False
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and _exited(proc):
                    exited_at = now
                    _killpg(proc.pid, signal.SIGKILL)  # whatever it left running in its group
                if exited_at is not None and (eof or now - exited_at > 0.5):
                    break  # (a pipe still open then is held outside the group: stop reading it)
                if exited_at is None:
                    if cut is None and (self.interrupted or now >= deadline):
                        cut = (f"gpu_check was interrupted by {signal.Signals(self.interrupted).name}"
                               if self.interrupted else why)
                        _killpg(proc.pid, signal.SIGTERM)
                        term_at = now
                    elif term_at is not None and not killed and now - term_at >= GRACE_S:
                        _killpg(proc.pid, signal.SIGKILL)
                        killed = True
                if eof:
                    time.sleep(0.05)
                    continue
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        eof = True
                        continue
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        dirty |= self._line(name, raw.decode(errors="replace").rstrip("\r"), started, tail,
                                            on_line, echo)
                if dirty and part is not None and time.monotonic() - last_save >= SAVE_EVERY_S:
                    self.save()
                    last_save, dirty = time.monotonic(), False
        finally:  # also when a parser raised: nothing of the part may outlive this call
            if exited_at is None:
                _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            shutil.rmtree(tmpdir, ignore_errors=True)
            if part is not None:
                part.pop("pgid", None)
        partial = pending.decode(errors="replace").strip()
        if partial:  # the last line without its newline: pytest -v's test under way, when cut
            self._line(name, partial, started, tail, on_line, echo)
        return Ran(proc.returncode, time.monotonic() - started, cut, list(tail), partial)

    def _line(self, name: str, line: str, started: float, tail, on_line, echo: bool) -> bool:
        """Echo and log one line of a part; True when ``on_line`` took a figure from it."""
        tail.append(line)
        if echo:
            print(f"  {name} | {line}", flush=True)
        self.log(f"{name} | {line}")
        return bool(on_line is not None and on_line(time.monotonic() - started, line))

    def install_wheels(self) -> None:
        wheels = sorted(self.args.wheels.glob("*.whl"))
        target = self.work / "wheels"
        ran = self.run("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--target", str(target), *map(str, wheels)],
                       min(time.monotonic() + 180, self.hard_stop), "the budget's hard stop")
        ok = ran.rc == 0 and ran.cut is None
        self.report["wheels"] = {"dir": str(self.args.wheels), "files": [w.name for w in wheels], "installed": ok,
                                 "seconds": round(ran.seconds, 1),
                                 **({} if ok else {"error": ran.cut or "\n".join(ran.tail[-10:])})}
        if ok:
            self.pyenv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), self.pyenv.get("PYTHONPATH")]))

    def probe(self) -> bool:
        found: list[dict] = []

        def on_line(_at, line):
            if line.startswith(TAG):
                found.append(json.loads(line[len(TAG):]))

        ran = self.run("probe", [sys.executable, str(Path(__file__).resolve()), "--worker", "probe"],
                       min(time.monotonic() + PROBE_S, self.hard_stop), f"the probe took over {PROBE_S:.0f} s",
                       on_line, echo=False)
        if not found:
            self.report["device"] = "unknown (the probe failed)"
            self.report["environment"] = {"error": ran.cut or "\n".join(ran.tail[-15:]),
                                          "seconds": round(ran.seconds, 1)}
            return False
        env = self.env = found[0]
        self.gpu = bool(env["gpu"])
        env["probe_s"] = round(ran.seconds, 1)
        self.report.update(
            gpu=self.gpu, device=env["device"], environment=env,
            versions={k: env.get(k) for k in ("torch", "torchvision", "alexnet_train", "python", "cuda", "cudnn")},
            decoder={"device": env.get("decoder_device"), "worker": env.get("decoder_worker"),
                     "torchcodec": env.get("torchcodec"), "device_problem": env.get("decoder_device_problem")})
        if not self.gpu:
            self.report["notes"].insert(0, "NO GPU FOUND: the CPU ran the same plumbing with tiny sizes; "
                                           "none of these numbers is a GPU's")
        return True

    def scan_data(self) -> None:
        root = self.args.data
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
                    dirnames.sort()
                    self.images += [(entry.name, os.path.join(dirpath, f)) for f in sorted(filenames)
                                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        classes = {c for c, _ in self.images}
        self.report["data"] = {"dir": str(root.resolve()), "classes": len(classes), "images": len(self.images)}

    def static_skips(self) -> None:
        """Parts that cannot run here whatever the budget: --skip, no GPU, no device decoder."""
        for i, spec in enumerate(SPECS):
            reason = None
            if spec.name in self.args.skip:
                reason = "--skip"
            elif self.spec_of(i) is None:
                reason = ("no GPU: compiled variants are measured on a GPU only (compiling takes minutes on a "
                          "CPU and says nothing about a GPU)")
            elif spec.name == "bench_train_device" and not self.env.get("decoder_device"):
                reason = ("no device JPEG decoder loads here (" + (self.env.get("decoder_device_problem") or
                          f"TorchCodec {self.env.get('torchcodec')}; no torchvision fallback in this alexnet_train")
                          + ")")
            if reason:
                self.parts[i].update(status="skipped", reason=reason)
            else:
                share, need = self.spec_of(i)
                self.parts[i].update(share=share, min_s=need)

    def part_smoke(self, part: dict, seconds: float, deadline: float) -> tuple[Ran, str | None]:
        rows = part["figures"].setdefault("variants", [])

        def on_line(_at, line):
            if line.startswith(TAG):
                rows.append(json.loads(line[len(TAG):]))
                return True

        ran = self.run("smoke", [sys.executable, str(Path(__file__).resolve()), "--worker", "smoke",
                                 "--data", str(self.args.data), "--device", "cuda" if self.gpu else "cpu"],
                       deadline, self.cut_why(deadline), on_line, part)
        bad = [r["variant"] for r in rows if r.get("finite") is not True]
        measured = [r["gpu_memory"] for r in rows if (r.get("gpu_memory") or {}).get("measured")]
        part["figures"]["gpu_memory"] = (
            max(measured, key=lambda m: m["max_memory_allocated"]) if measured else
            rows[-1].get("gpu_memory") if rows and rows[-1].get("gpu_memory") else
            memory_figures(None, None, "no variant finished"))
        return ran, (f"variants without a finite loss or with an error: {', '.join(bad)}" if bad else None)

    def bench_model_cmd(self, seconds: float, archs: list[str], amps: list[str], formats: list[str],
                        compiled: bool, breakdown: bool = False, modes: tuple[str, ...] = ()) -> list[str]:
        rows = 1 + (BREAKDOWN_ROWS * len(formats) if breakdown else len(archs) * len(amps) * len(formats)
                    * max(1, len(modes)))
        g = 0 if self.gpu else 1
        per_variant = (SIZED * seconds - OVERHEAD["bench_model"][g]) / rows - OVERHEAD["bench_model_variant"][g]
        # Past a few seconds a rate hardly changes: longer runs would only take time from the later parts.
        # A compiled variant's time is its compiling, which no step count sizes: 1 s of steps after it.
        per_variant = 1.0 if compiled else min(3.0 if self.gpu else 2.0, max(0.25, per_variant))
        size = (["--device", "cuda", "--batch-size", "128", "--steps", "500", "--warmup", "5"] if self.gpu else
                ["--device", "cpu", "--batch-size", "2", "--steps", "20", "--warmup", "1"])
        return [sys.executable, str(ROOT / "scripts" / "bench_model.py"), *size,
                "--max-seconds", f"{per_variant:.2f}",
                "--archs", *archs, "--amps", *amps, "--memory-formats", *formats,
                *(["--compiled-only", "--compile-modes", *modes] if compiled else []),
                *(["--breakdown"] if breakdown else [])]

    def part_bench_model(self, part: dict, seconds: float, deadline: float, compiled: bool = False,
                         breakdown: bool = False) -> tuple[Ran, str | None]:
        figures = part["figures"]
        if breakdown:
            amp = "bf16" if self.gpu else "none"
            cmd = self.bench_model_cmd(seconds, ["paper"], [amp], ["nchw", "channels_last"], False, breakdown=True)
            figures["precision"] = amp
        elif compiled:
            best = self.best_eager()
            arch, amp, cl = variant_of(best)
            formats = ["channels_last", "nchw"] if cl else ["nchw", "channels_last"]
            archs = [arch] + [a for a in ("paper", "torchvision") if a != arch]
            cmd = self.bench_model_cmd(seconds, archs, [amp], formats, compiled=True, modes=COMPILE_MODES)
            figures["precision"] = amp
            figures["eager_best"] = best
        else:
            # bf16 first: the likely best; fp32 ("none") last, the baseline already is fp32
            amps = list(AMPS[2:] + AMPS[1:2] + AMPS[:1]) if self.gpu else ["none"]
            if not self.gpu:
                figures["note"] = ("CPU: float32 only (train.tf32/amp are CUDA features; alexnet-train trains "
                                   "float32 on a CPU)")
            cmd = self.bench_model_cmd(seconds, ["paper", "torchvision"], amps, ["nchw", "channels_last"], False)
        figures["args"] = cmd[2:]
        seen: list[tuple[float, str]] = []

        def on_line(at, line):
            if ROW.match(line.strip()):
                seen.append((at, line))
                figures["rows"] = parse_rows(seen)
                figures["best"] = best_row(figures["rows"])
                figures["best_paper"] = best_row(figures["rows"], "paper")
                return True
            if line.startswith("speedup: "):
                figures["speedup"] = float(line.split()[1])
            if line.startswith("cost: "):
                figures.setdefault("costs", []).append(line[len("cost: "):].strip())
                return True

        ran = self.run_measured(part, cmd, deadline, on_line)
        return ran, None

    def part_lrn(self, part: dict, seconds: float, deadline: float) -> tuple[Ran, str | None]:
        figures = part["figures"]
        size = (["--device", "cuda", "--batch-size", "128", "--repeats", "20", "--dtypes", "bfloat16", "float32"]
                if self.gpu else ["--device", "cpu", "--batch-size", "2", "--repeats", "2", "--threads", "1"])
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_lrn.py"), *size]
        figures["args"] = cmd[2:]
        rows = figures.setdefault("rows", [])

        def on_line(_at, line):
            m = LRN_ROW.match(line.strip())
            if m:
                rows.append({"impl": m["impl"], "layer": m["layer"], "dtype": m["dtype"], "format": m["fmt"],
                             "ms": float(m["ms"]), "ratio": float(m["ratio"])})
                return True
            if line.startswith("speedup: "):
                figures["speedup"] = float(line.split()[1])

        ran = self.run_measured(part, cmd, deadline, on_line)
        return ran, None

    def part_loader(self, part: dict, seconds: float, deadline: float) -> tuple[Ran, str | None]:
        """bench_data.py --rate: the loader alone at 8, 12 and 16 workers (those the host has)."""
        figures = part["figures"]
        cpus = self.env.get("cpus") or 1
        if self.gpu:
            workers = [w for w in (8, 12, 16) if w <= cpus] or [cpus]
            size = ["--batch-size", "128", "--images", "8192", "--repeats", "2"]
        else:
            workers, size = [1], ["--batch-size", "8", "--images", "32", "--repeats", "1"]
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_data.py"), "--data", str(self.args.data), "--rate",
               "--workers", *map(str, workers), *size]
        figures.update(args=cmd[2:], cpus=cpus)

        def on_line(_at, line):
            if line.startswith("rate: "):
                for field in line[len("rate: "):].split():
                    key, _, values = field.partition("=")
                    figures[key] = [float(v) if key != "workers" else int(v) for v in values.split(",") if v]
                return True

        ran = self.run(part["name"], cmd, deadline, self.cut_why(deadline), on_line, part)
        return ran, None

    def best_eager(self) -> str:
        """The paper-arch variant the later parts use: bench_model's fastest eager paper row."""
        row = self.parts[NAMES.index("bench_model")]["figures"].get("best_paper")
        return row["variant"] if row else BEST_DEFAULT

    def part_bench_train(self, part: dict, seconds: float, deadline: float, decode: str) -> tuple[Ran, str | None]:
        figures = part["figures"]
        g = 0 if self.gpu else 1
        per_side = min(20.0, max(1.0, (SIZED * seconds - OVERHEAD["bench_train"][g]) / 2))
        variant = self.best_eager()
        sets = [f"data.decode={decode}"] + (variant_sets(variant) if self.gpu else [])
        workers = min(16, self.env.get("cpus") or 1) if self.gpu else 1
        size = (["--device", "cuda", "--workers", str(workers), "--batch-size", "128", "--steps", "1000",
                 "--warmup", "3"] if self.gpu else
                ["--device", "cpu", "--workers", "1", "--batch-size", "2", "--steps", "50", "--warmup", "1"])
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--data", str(self.args.data), *size,
               "--seconds", f"{per_side:.1f}", "--set", *sets]
        figures.update(args=cmd[2:], decode=decode, variant=variant if self.gpu else "float32 (CPU)",
                       decoder=self.env.get("decoder_device") if decode == "device" else self.env.get("decoder_worker"))

        def on_line(_at, line):
            for key, pattern in (("plain_images_per_s", r"^plain .*?:\s+([\d.]+) images/s"),
                                 ("ours_images_per_s", r"^ours .*?:\s+([\d.]+) images/s"),
                                 ("speedup", r"^speedup: ([\d.]+)")):
                m = re.match(pattern, line)
                if m:
                    figures[key] = float(m[1])
                    return True

        ran = self.run_measured(part, cmd, deadline, on_line)
        return ran, None

    def part_paper_run(self, part: dict, seconds: float, deadline: float) -> tuple[Ran, str | None]:
        figures = part["figures"]
        g = 0 if self.gpu else 1
        batch = 128 if self.gpu else 4
        rate, source = None, None
        for name in ("bench_train_worker", "bench_train_device"):
            rate = self.parts[NAMES.index(name)]["figures"].get("ours_images_per_s")
            if rate:
                source = f"{name}'s ours"
                break
        best = self.parts[NAMES.index("bench_model")]["figures"].get("best_paper")
        if not rate and best:  # the model's ceiling: sizes on the long side, and the deadline still holds
            rate, source = best["images_per_s"], f"bench_model's {best['variant']}"
        if not rate:
            rate, source = (1000.0, "a guess (bench_model measured nothing)") if self.gpu else (1.0, "a guess")
        fit = int((SIZED * seconds - OVERHEAD["paper_run"][g]) * rate / batch)
        steps = max(2, min(self.args.steps, fit))
        # One epoch of exactly `steps` batches: a tree of links that repeats DIR's files.
        root = self.work / "paper"
        shutil.rmtree(root, ignore_errors=True)
        by_class: dict[str, list[str]] = {}
        for cls, path in self.images:
            by_class.setdefault(cls, []).append(path)
        # class by class in turn, so that a short run still sees many classes
        order = [(c, paths[k]) for k in range(max(map(len, by_class.values()))) for c, paths in by_class.items()
                 if k < len(paths)]
        picked = [order[i % len(order)] for i in range(steps * batch)]
        for k, (cls, path) in enumerate(picked):
            dest = root / "train" / cls / f"{k // len(order):04d}_{os.path.basename(path)}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(path), dest)
        for cls, path in picked[: 2 * batch if self.gpu else batch]:
            dest = root / "val" / cls / os.path.basename(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.symlink(os.path.abspath(path), dest)
        out = root / "out"
        interval = max(1, steps // 12) if self.gpu else 1
        sets = [f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}", "model.num_classes=null",
                f"data.batch_size={batch}", *([] if self.gpu else ["data.workers=1"]),  # a GPU: auto, as shipped
                "data.decode=worker", "train.epochs=1", "train.keep_last=0", "train.checkpoint_minutes=0",
                "train.checkpoint_steps=0", f"train.log_interval={interval}",
                f"train.device={'cuda' if self.gpu else 'cpu'}",
                # The CPU's batch of 4 repeats a dozen images: at the paper's lr (for batch 128) it memorises
                # them, then momentum blows the loss up (seen: NaN at step 43).  Scaled to the batch instead.
                # On a GPU: paper.yaml's own precision and memory format (train.amp auto, NCHW).
                *([] if self.gpu else [f"optim.lr={0.01 * batch / 128:g}"])]
        figures.update(steps_planned=steps, batch=batch, sized_from=f"{rate:.1f} img/s, {source}",
                       variant=("paper.yaml's own: train.amp auto (bf16), NCHW, data.workers auto" if self.gpu else
                                "float32 (CPU), optim.lr scaled to the batch"),
                       overrides=sets)
        windows: list[dict] = []

        def on_line(_at, line):
            row = parse_progress(line)
            if row:
                windows.append(row)
                later = [w["images_per_s"] for w in windows[1:] if "images_per_s" in w] or \
                        [w["images_per_s"] for w in windows if "images_per_s" in w]
                figures.update(steps_done=row["step"], final_loss=row.get("loss"),
                               images_per_s=round(statistics.fmean(later), 1) if later else None,
                               data_wait=row.get("data_wait"))
                if figures["images_per_s"]:
                    figures["imagenet_epoch_min"] = round(IMAGENET_TRAIN / figures["images_per_s"] / 60, 1)
                return True

        ran = self.run_measured(part, [sys.executable, "-m", "alexnet_train", "train", "--config",
                                       str(ROOT / "configs" / "paper.yaml"), "--out", str(out), "--set", *sets],
                                deadline, on_line)
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if rows:
                figures.update(epoch_images_per_s=round(rows[-1]["images_per_s"], 1),
                               epoch_train_loss=round(rows[-1]["train_loss"], 4),
                               data_wait=rows[-1].get("data_wait", figures.get("data_wait")))
        last = out / "last.pth"
        figures["last_pth"] = last.exists()
        figures["last_pth_mb"] = round(last.stat().st_size / 2**20, 1) if last.exists() else None
        figures["checkpoints"] = sorted(p.name for p in out.glob("*.pth")) if out.exists() else []
        shutil.rmtree(root, ignore_errors=True)  # ~1 GB of checkpoints
        problem = None
        if ran.rc == 0 and not figures["last_pth"]:
            problem = "alexnet-train ended without writing last.pth"
        return ran, problem

    def part_cuda_tests(self, part: dict, seconds: float, deadline: float,
                        marks: str = "cuda and not guard") -> tuple[Ran, str | None]:
        figures = part["figures"]
        tests = figures.setdefault("tests", {})
        name = part["name"]
        xml = self.work / f"{name.replace('_', '-')}.xml"

        def on_line(_at, line):
            m = PYTEST_LINE.match(line.strip())
            if m:
                tests[m["id"]] = m["outcome"].lower() + (f": {m['reason']}" if m["reason"] else "")
                return True

        ran = self.run(name, [sys.executable, "-m", "pytest", "-m", marks, "-v", "-p", "no:cacheprovider",
                                      "--color=no", f"--junitxml={xml}", "tests"],
                       deadline, self.cut_why(deadline), on_line, part,
                       env=dict(self.pyenv, COLUMNS="200"))  # -v cuts skip reasons to the terminal's width
        if ran.cut and "::" in ran.partial:
            figures["running_when_cut"] = ran.partial.split()[0]
        failures = {}
        if xml.exists():
            try:
                for case in ET.parse(xml).getroot().iter("testcase"):
                    for child in case:
                        if child.tag in ("failure", "error"):
                            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
                            failures[name] = (child.get("message") or "").strip().split("\n")[0][:300]
            except ET.ParseError:
                pass
        figures["failures"] = failures
        figures["summary"] = dict(collections.Counter(v.split(":")[0] for v in tests.values()))
        if ran.rc == 5:
            figures["note"] = "no test is marked cuda"
        if not self.gpu:
            figures["note"] = "no GPU: every cuda test skips (the plumbing ran)"
        failed = [k for k, v in tests.items() if v.startswith(("failed", "error"))]
        return ran, (f"{len(failed)} failed" if failed else None)

    def run_measured(self, part: dict, cmd: list[str], deadline: float, on_line) -> Ran:
        """``self.run`` of ``cmd`` (``python SCRIPT ...`` or ``python -m MODULE ...``) inside the peak wrapper:
        the part's peak GPU memory goes to its figures (``gpu_memory``), also when the part is cut."""
        path = self.work / f"peak-{part['name']}.json"
        path.unlink(missing_ok=True)
        wrapped = [cmd[0], str(Path(__file__).resolve()), "--worker", "peak", str(path), *cmd[1:]]
        try:
            return self.run(part["name"], wrapped, deadline, self.cut_why(deadline), on_line, part)
        finally:
            part["figures"]["gpu_memory"] = read_peak(path)

    def cut_why(self, deadline: float) -> str:
        return "the budget's hard stop" if deadline >= self.hard_stop else "its share of the budget ran out"

    def run_parts(self) -> None:
        for i, spec in enumerate(SPECS):
            part = self.parts[i]
            if part["status"] != "pending":
                continue
            if self.interrupted:
                part.update(status="skipped",
                            reason=f"gpu_check was interrupted by {signal.Signals(self.interrupted).name}")
                continue
            now = time.monotonic()
            seconds, left = self.allotment(i, now)
            if seconds is None:
                part.update(status="skipped",
                            reason=f"budget: needs at least {part['min_s']:.0f} s, {max(0, left):.0f} s left")
                self.save()
                continue
            deadline = min(now + seconds, self.hard_stop)
            part.update(status="running", allotted_s=round(seconds, 1), started_s=round(now - START, 1))
            self.say(f"{spec.name} ({seconds:.0f} s): {spec.title}")
            self.save()
            runner = {"smoke": self.part_smoke, "bench_model": self.part_bench_model,
                      "bench_train_worker": lambda p, s, d: self.part_bench_train(p, s, d, "worker"),
                      "bench_train_device": lambda p, s, d: self.part_bench_train(p, s, d, "device"),
                      "paper_run": self.part_paper_run, "cuda_tests": self.part_cuda_tests,
                      "cuda_guards": lambda p, s, d: self.part_cuda_tests(p, s, d, marks="cuda and guard"),
                      "compiled": lambda p, s, d: self.part_bench_model(p, s, d, compiled=True),
                      "lrn": self.part_lrn, "loader": self.part_loader,
                      "breakdown": lambda p, s, d: self.part_bench_model(p, s, d, breakdown=True)}[spec.name]
            try:
                ran, problem = runner(part, seconds, deadline)
            except Exception as exc:  # e.g. the link tree could not be made: the window still serves the rest
                part.update(status="failed", reason=f"gpu_check: {type(exc).__name__}: {exc}",
                            seconds=round(time.monotonic() - now, 1))
                self.say(f"{spec.name}: failed ({part['reason']})")
                self.save()
                continue
            part["seconds"] = round(ran.seconds, 1)
            part["exit_code"] = ran.rc
            if ran.cut:
                part.update(status="cut", reason=ran.cut)
            elif ran.rc != 0 or problem:
                part.update(status="failed", reason=problem or f"exit code {ran.rc}")
            else:
                part.update(status="done", reason=problem)
            if part["status"] != "done":
                part["tail"] = "\n".join(ran.tail[-40:])[-4000:]
            memory = part["figures"].get("gpu_memory") or {}
            self.say(f"{spec.name}: {part['status']}" + (f" ({part['reason']})" if part["reason"] else "")
                     + f" in {ran.seconds:.0f} s" + (f"; {memory_text(memory)}" if memory.get("measured") else ""))
            self.save()

    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + self.interrupted
        wheels_failed = self.report["wheels"] is not None and not self.report["wheels"]["installed"]
        probe_failed = self.report["gpu"] is None
        return 1 if wheels_failed or probe_failed or any(p["status"] == "failed" for p in self.parts) else 0


def text_lines(r: dict) -> list[str]:
    v, env, dec = r["versions"], r["environment"], r["decoder"]
    lines = [f"gpu_check on {r['device']} ({r['host']}): torch {v.get('torch', '?')}, torchvision "
             f"{v.get('torchvision', '?')}, CUDA {v.get('cuda') or '-'}, cuDNN {v.get('cudnn') or '-'}, "
             f"Python {v.get('python', '?')}" + (f", {env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else "")]
    lines += r["notes"]
    if dec:
        lines.append(f"JPEG decoding: data.decode=device by {dec.get('device') or 'nothing (its part is skipped)'}, "
                     f"loader workers by {dec.get('worker')}; TorchCodec {dec.get('torchcodec')}")
    if r["wheels"]:
        w = r["wheels"]
        lines.append(f"--wheels {w['dir']}: {', '.join(w['files'])} "
                     + ("installed" if w["installed"] else f"NOT installed: {w.get('error', '')[-300:]}"))
    if r["data"]:
        lines.append(f"data: {r['data']['dir']} ({r['data']['images']} images, {r['data']['classes']} classes)")
    counts = collections.Counter(p["status"] for p in r["parts"])
    state = ("finished" if r["finished"] else
             f"INTERRUPTED by {r['interrupted']}" if r["interrupted"] else "NOT FINISHED (still running, or killed)")
    lines.append(f"budget {r['budget_s']:.0f} s (hard stop at {r['hard_stop_s']:.0f} s): {state} after "
                 f"{r['seconds']:.0f} s; parts " + ", ".join(f"{n} {s}" for s, n in counts.items())
                 + (f"; exit {r['exit_code']}" if r["exit_code"] is not None else "")
                 + ("" if not counts.get("cut") and not counts.get("skipped") else
                    " (cut and skipped parts are not failures: see why below)"))
    for i, p in enumerate(r["parts"], 1):
        status = p["status"] if p["status"] not in ("failed",) else "FAILED"
        if p["reason"]:
            status += f": {p['reason']}"
        took = (f", {p['seconds']:.0f} s of {p['allotted_s']:.0f} s" if p["seconds"] is not None and p["allotted_s"]
                else f", {p['allotted_s']:.0f} s allotted" if p["allotted_s"] else "")
        lines.append(f"{i}. {p['name']} [{status}{took}] {p['title']}")
        lines += ["     " + x for x in FIGURE_LINES.get(p["name"], lambda f, p: [])(p["figures"], p)]
        if "gpu_memory" in p["figures"]:
            lines.append("     " + memory_text(p["figures"]["gpu_memory"])
                         + (" (the largest of its variants)" if p["figures"]["gpu_memory"].get("measured")
                            and p["name"] in ("smoke", "bench_model", "breakdown", "lrn", "compiled") else ""))
    return lines


def smoke_lines(f: dict, _p: dict) -> list[str]:
    out = []
    for row in f.get("variants", []):
        if row.get("error"):
            out.append(f"{row['variant']}: ERROR {row['error']}")
            continue
        syncs = ("host syncs not counted on a CPU" if row.get("host_syncs") is None else
                 f"{row['host_syncs']} host syncs in steps 2-{row['steps']} (1 expected: the loss read at the "
                 "epoch's last step)")
        memory = row.get("gpu_memory") or {}
        out.append(f"{row['variant']}: loss {row['loss']} {'finite' if row['finite'] else 'NOT FINITE'}, "
                   f"{row['steps']} steps of {row['batch']} in {fmt(row.get('train_s'), '.2f')} s "
                   f"({row['seconds']:.1f} s with the build), computed in {row['precision']}; {syncs}"
                   + (f"; {memory_text(memory)}" if memory.get("measured") else ""))
    return out


def bench_model_lines(f: dict, p: dict) -> list[str]:
    out = [f["note"]] if f.get("note") else []
    if p["name"] == "compiled" and f.get("precision"):
        out.append(f"precision {f['precision']} (bench_model's best eager paper variant: {f['eager_best']})")
    rows = f.get("rows", [])
    if rows:
        out.append("images/s of one SGD step on a batch already on the device; x = ratio to torchvision's AlexNet "
                   "in float32; minutes per ImageNet epoch if the loader keeps up; s = seconds for the row"
                   + (" (compiling included)" if p["name"] == "compiled" else ""))
    out += [f"  {r['variant']:44s} {r['images_per_s']:9.1f} img/s {r['ratio']:5.2f}x {r['imagenet_epoch_min']:8.1f} "
            f"min/epoch {r['seconds']:5.1f} s" for r in rows]
    for key, what in (("best", "best"), ("best_paper", "best of paper.yaml's arch (the later parts train it)")):
        b = f.get(key)
        if b and (key == "best" or b != f.get("best")):
            out.append(f"{what}: {b['variant']}: {b['images_per_s']:.0f} img/s, {b['ratio']:.2f}x, "
                       f"{b['imagenet_epoch_min']:.1f} min per ImageNet epoch if the loader keeps up")
    return out


def bench_train_lines(f: dict, _p: dict) -> list[str]:
    if "ours_images_per_s" not in f and "plain_images_per_s" not in f:
        return []
    return [f"ours (Trainer.train_epoch) {fmt(f.get('ours_images_per_s'))} img/s vs plain (pytorch/examples loop) "
            f"{fmt(f.get('plain_images_per_s'))} img/s: speedup {fmt(f.get('speedup'), '.2f')}x; decoded by "
            f"{f.get('decoder')}; ours as {f.get('variant')}"]


def paper_run_lines(f: dict, _p: dict) -> list[str]:
    if "steps_planned" not in f:
        return []
    out = [f"{fmt(f.get('steps_done'), 'd', '0')} of {f['steps_planned']} steps of batch {f['batch']} "
           f"(sized from {f['sized_from']}), as {f['variant']}"]
    if f.get("images_per_s"):
        wait = f"{100 * f['data_wait']:.0f}%" if isinstance(f.get("data_wait"), (int, float)) else "?"
        epoch = (f" (the epoch's average with its warm-up: {f['epoch_images_per_s']:.1f})"
                 if f.get("epoch_images_per_s") else "")
        out.append(f"{f['images_per_s']:.1f} img/s after the first log window{epoch}, data wait {wait} (of step time "
                   f"spent waiting for the loader): one ImageNet epoch (1,281,167 images) ~ "
                   f"{fmt(f.get('imagenet_epoch_min'))} min")
    if "last_pth" in f:
        mean = f" (epoch mean {f['epoch_train_loss']})" if "epoch_train_loss" in f else ""
        loss = f.get("final_loss")
        out.append(f"final loss {fmt(loss, '.4g', str(loss))} (last log window){mean}; "
                   + (f"last.pth written ({f['last_pth_mb']} MB)" if f["last_pth"] else "NO last.pth")
                   + f"; checkpoints: {', '.join(f['checkpoints']) or 'none'}")
    return out


def cuda_tests_lines(f: dict, _p: dict) -> list[str]:
    if not f.get("tests") and not f.get("running_when_cut"):
        return []
    s = f.get("summary", {})
    out = [", ".join(f"{n} {k}" for k, n in sorted(s.items())) or "no test finished"]
    out += [f["note"]] if f.get("note") else []
    out += [f"FAILED {t}: {f.get('failures', {}).get(t, '')}".rstrip(": ")
            for t, v in f["tests"].items() if v.startswith(("failed", "error"))]
    if f.get("running_when_cut"):
        out.append(f"running when cut: {f['running_when_cut']}")
    return out


def loader_lines(f: dict, _p: dict) -> list[str]:
    if "workers" not in f:
        return []
    out = [f"images/s of the training loader alone (no model), {f.get('cpus')} cores; the 256 px copy:"]
    for i, w in enumerate(f["workers"]):
        cells = []
        for key, what in (("files", "files"), ("shards", "shards"), ("tv_files", "torchvision ImageFolder")):
            values = f.get(key) or []
            cells.append(f"{what} {values[i]:.0f}" if i < len(values) else f"{what} ?")
        out.append(f"  {w:2d} workers: " + ", ".join(cells))
    return out


def lrn_lines(f: dict, _p: dict) -> list[str]:
    rows = f.get("rows", [])
    if not rows:
        return []
    out = ["forward + backward of the LRN alone, ms per call; x = ratio to F.local_response_norm (the model's "
           "LRN before) in the same layer, dtype and layout"]
    out += [f"  {r['impl']:24s} {r['layer']} {r['dtype']:9s} {r['format']:13s} {r['ms']:9.3f} ms {r['ratio']:6.2f}x"
            for r in rows]
    return out


def breakdown_lines(f: dict, p: dict) -> list[str]:
    out = bench_model_lines(f, p)
    if f.get("costs"):
        out.append("what each part costs per step (ms), over the same model without it, in this run:")
        out += [f"  {c}" for c in f["costs"]]
    return out


FIGURE_LINES = {"smoke": smoke_lines, "bench_model": bench_model_lines, "compiled": bench_model_lines,
                "lrn": lrn_lines, "breakdown": breakdown_lines, "loader": loader_lines,
                "bench_train_worker": bench_train_lines, "bench_train_device": bench_train_lines,
                "paper_run": paper_run_lines, "cuda_tests": cuda_tests_lines, "cuda_guards": cuda_tests_lines}


def print_plan(check: Check, probed: bool) -> None:
    c = check
    where = (f"{c.env['device']} (GPU sizes)" if c.gpu else "the CPU (no CUDA GPU found: tiny sizes)") if probed \
        else "an unknown device (the probe failed; CPU sizes)"
    print(f"gpu_check plan: budget {c.budget:.0f} s on {where}; hard stop at {c.budget - MARGIN_S:.0f} s.")
    print("Each part's share is of the time left when it starts, over the parts still to run; a part that ends "
          "early leaves its time to the later ones, so this is the plan if every part uses all of its time.")
    print(f"{'part':20s} {'share':>6s} {'min':>6s} {'planned':>8s}  what")
    now = time.monotonic()
    for i, spec in enumerate(SPECS):
        part = c.parts[i]
        if part["status"] == "skipped":
            print(f"{spec.name:20s} {'-':>6s} {'-':>6s} {'-':>8s}  skipped: {part['reason']}")
            continue
        seconds, left = c.allotment(i, now)
        share, need = c.spec_of(i)
        if seconds is None:
            part["status"] = "skipped"
            print(f"{spec.name:20s} {100 * share:5.0f}% {need:5.0f}s {'-':>8s}  skipped: budget (needs {need:.0f} s, "
                  f"{max(0, left):.0f} s left)")
            continue
        part["status"] = "planned"  # out of the shares still to come
        now += seconds
        print(f"{spec.name:20s} {100 * share:5.0f}% {need:5.0f}s {seconds:7.0f}s  {spec.title}")
    if c.args.wheels:
        print(f"--wheels: would install {len(list(c.args.wheels.glob('*.whl')))} wheels from {c.args.wheels} first "
              "(the decoder above is the one without them)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="parts: " + ", ".join(NAMES) + " (in this order)")
    p.add_argument("--data", type=Path, help="an ImageFolder of JPEGs (<class>/<file>.JPEG); not needed with --plan")
    p.add_argument("--report", type=Path, help="the JSON report; FILE.txt and FILE.log go beside it")
    p.add_argument("--budget", type=float, default=300.0, help="seconds the whole check may take (default 300)")
    p.add_argument("--plan", action="store_true", help="print the plan and run nothing")
    p.add_argument("--steps", type=int, default=300, help="at most this many training steps of configs/paper.yaml")
    p.add_argument("--wheels", type=Path, help="a folder of wheels to install for the check (e.g. TorchCodec)")
    p.add_argument("--skip", nargs="+", default=[], metavar="PART", choices=NAMES + ["bench_train"],
                   help="leave out these parts (bench_train: both of its parts)")
    p.add_argument("--worker", choices=["probe", "smoke"], help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if "bench_train" in args.skip:
        args.skip += ["bench_train_worker", "bench_train_device"]
    if args.budget < 10:
        p.error(f"--budget: {args.budget:g} s is too short to run anything (at least 10)")
    if args.steps < 1:
        p.error("--steps: must be >= 1")
    if args.wheels is not None and (not args.wheels.is_dir() or not list(args.wheels.glob("*.whl"))):
        p.error(f"--wheels: no .whl files in {args.wheels}")
    if args.plan:
        return args
    if args.data is None or args.report is None:
        p.error("--data and --report are required (or --plan)")
    if not args.data.is_dir():
        p.error(f"--data: directory not found: {args.data}")
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(args.data)):
        p.error(f"--data: {args.data} has no class folders (expected DIR/<class>/<image>)")
    if args.report.suffix == ".txt":
        p.error(f"--report: {args.report} would be overwritten by the text report; name it .json")
    try:
        args.report.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--report: cannot create {args.report.parent}: {exc.strerror}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--worker", "peak"]:  # --worker peak OUT.json (SCRIPT | -m MODULE) ARGS...: not argparse's
        if len(argv) < 4:
            print("gpu_check: --worker peak OUT.json (SCRIPT | -m MODULE) ARGS...", file=sys.stderr)
            return 2
        peak_worker(argv[2], argv[3:])
        return 0
    args = parse_args(argv)
    if args.worker == "probe":
        return probe_worker()
    if args.worker == "smoke":
        return smoke_worker(str(args.data), args.device)
    if args.plan:
        args.report = None
    check = Check(args)

    def stop(signum, _frame):
        check.interrupted = check.interrupted or signum

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        if args.plan:
            probed = check.probe()
            check.static_skips()
            print_plan(check, probed)
            return 0
        check.log_file = open(args.report.with_suffix(".log"), "w")
        check.save()  # a report exists from the first second: every part pending
        check.scan_data()
        if not check.images:
            check.report["notes"].append(f"--data: {args.data} holds no images under its class folders")
            print(f"gpu_check: --data: {args.data} holds no images under its class folders", file=sys.stderr)
            check.report.update(finished=True, exit_code=2)
            check.save()
            return 2
        if args.wheels:
            check.install_wheels()
        if check.probe():
            if not check.gpu:
                check.say("NO GPU FOUND - running the plumbing on the CPU with tiny sizes; no number here is a GPU's")
            check.say(f"{check.env['device']}, torch {check.env['torch']}, device decoder "
                      f"{check.env.get('decoder_device')}, {check.budget:.0f} s budget")
            check.static_skips()
            check.save()
            check.run_parts()
        else:
            for part in check.parts:
                part.update(status="skipped", reason="the environment probe failed (see environment.error)")
        check.report["finished"] = not check.interrupted
        check.report["interrupted"] = signal.Signals(check.interrupted).name if check.interrupted else None
        check.report["exit_code"] = check.exit_code()
        check.save()
        print("\n".join(text_lines(check.report)), flush=True)
        return check.report["exit_code"]
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
        if check.log_file is not None:
            check.log_file.close()


if __name__ == "__main__":
    sys.exit(main())
