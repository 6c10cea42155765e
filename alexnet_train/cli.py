"""Command-line entry points: the only reader of argv and the only caller of sys.exit.

Exit codes: 0 done; otherwise the code of the error, one line on stderr
(:data:`alexnet_train.errors.EXITS`: 1 runtime failure, 2 bad usage or config,
75 another run holds OUT, 128 + the signal after a stop that saved).  The run
itself (lock, resume, launch environment, signals) is :mod:`alexnet_train.lifecycle`
and alexnet-eval's program is :mod:`alexnet_train.evalrun`; this module only
parses argv and maps exceptions to exit codes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from .errors import EXIT_CONFIG, EXIT_RUNTIME


def _path(text: str) -> str:
    """A path argument as a shell gives it: ``~`` expanded also where the shell leaves it
    (``--data=~/x``, a quoted argument, a script's)."""
    return os.path.expanduser(text)


def _fail(prog: str, code: int, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _log(message: str) -> None:
    print(message, flush=True)


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set optim.lr=0.02 model.groups=1 (repeatable; "
                             "values are YAML scalars)")


def git_sha() -> str | None:
    """The commit of the alexnet_train source tree (with -dirty), if it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------- alexnet-train


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-train",
        description="Train AlexNet on data.train_dir / data.val_dir: ImageFolder trees, a flat val folder with "
                    "data.val_labels, or folders of WebDataset tar shards (see README.md and docs/ for configs "
                    "and exit codes).",
    )
    p.add_argument("--config", required=True, metavar="FILE", type=_path, help="YAML config (e.g. configs/paper.yaml)")
    _add_set(p)
    p.add_argument("--out", metavar="DIR", type=_path, help="output directory (default: the config's train.out_dir)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH", type=_path,
                   help="auto (default): continue from OUT's newest valid checkpoint if any; "
                        "none: start fresh (refused if OUT already holds checkpoints); PATH: continue from that file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--log", metavar="FILE", type=_path,
                   help="append everything the run prints (its errors and its loader workers' output too) to "
                        "FILE, creating FILE's folder: the shell's `>> FILE 2>&1` for cron and batch jobs, "
                        "without the shell failing on a folder that is not there yet")
    return p


def log_to(path: str, prog: str) -> None:
    """From now on this process's stdout and stderr (file descriptors 1 and 2, so its children's
    and C libraries' output as well) append to ``path``; its folder is created.  An existing
    file is only appended to."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        _fail(prog, EXIT_RUNTIME, f"--log {path}: cannot write ({exc.strerror or exc})")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def train_main(argv: Sequence[str] | None = None, exiting: bool | None = None) -> None:
    """alexnet-train.  ``exiting`` (default: whether argv is None, i.e. the console script): the
    process exits when this returns."""
    prog = "alexnet-train"
    args = train_parser().parse_args(argv)
    if args.log:
        log_to(args.log, prog)
    from .config import ConfigError, replace
    from .configload import dump_yaml, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.out:
            cfg = replace(cfg, "train", out_dir=args.out)
    except ConfigError as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return

    from .errors import USER_ERRORS, Aborted, Interrupted, exit_code, message
    from .lifecycle import run_training
    from .tracking import versions

    provenance = "# resolved config of this run; alexnet-train --config this-file reproduces it\n"
    provenance += "# " + ", ".join(f"{k} {v}" for k, v in versions().items())
    provenance += f"\n# git {git_sha() or 'unknown'}\n"
    try:
        # Called as the program (argv from sys.argv), the process exits when the run returns:
        # a stop signal from then on must not turn its exit code into a kill.
        run_training(cfg, args.resume, _log, provenance, exiting=argv is None if exiting is None else exiting)
    except KeyboardInterrupt as exc:  # Aborted: a deliberate second stop; or Ctrl-C before training began
        if getattr(exc, "report", True):
            print(f"{prog}: {exc or 'interrupted before training began; nothing to save'}", file=sys.stderr,
                  flush=True)
        sys.exit(exit_code(exc) if isinstance(exc, Aborted) else 130)
    except USER_ERRORS as exc:
        # Under DDP every rank raises the same error at the same step; ``report`` is False on all
        # but rank 0, so the run prints one line (a lost peer is each survivor's own line).
        if getattr(exc, "report", True):
            if isinstance(exc, Interrupted):
                _log(str(exc))
            else:
                print(f"{prog}: error: {message(exc)}", file=sys.stderr, flush=True)
        sys.exit(exit_code(exc))


# --------------------------------------------------------------------------- alexnet-eval


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-eval",
        description="Evaluate a checkpoint (ours, or a torchvision AlexNet state_dict): top-1/top-5 for the centre "
                    "crop and, with --ten-crop, the paper's ten-crop test.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=_path,
                   help="a .pth written by alexnet-train, or torchvision weights")
    p.add_argument("--data", metavar="DIR", type=_path,
                   help="validation data: an ImageFolder tree, a flat folder with --labels, or a folder of WebDataset "
                        "tar shards (default: the checkpoint config's data.val_dir)")
    p.add_argument("--labels", metavar="FILE", type=_path, help="labels for a flat val folder: 'filename wnid' lines, "
                   "Kaggle's LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt "
                   "(with meta.mat beside it)")
    p.add_argument("--ten-crop", action="store_true",
                   help="also the paper's test: 4 corner + centre 224 crops and their mirrors, softmax averaged")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="images per batch (default: config's)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="loader processes (default: config's)")
    p.add_argument("--device", default="auto", metavar="D", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast on CUDA (default none)")
    p.add_argument("--json", metavar="FILE", type=_path, help='write {"center": {...}, "ten_crop": {...}} '
                                                  "(top1, top5 in percent, loss, images)")
    p.add_argument("--predictions", metavar="FILE", type=_path,
                   help="write CSV path,label,pred1..pred5 (wnids) for every image (ten-crop with --ten-crop)")
    return p


def eval_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-eval"
    args = eval_parser().parse_args(argv)
    for name in ("batch_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "batch_size" else 0):
            _fail(prog, EXIT_CONFIG, f"--{name.replace('_', '-')}: must be >= {1 if name == 'batch_size' else 0}")

    from .errors import USER_ERRORS, exit_code, message
    from .evalrun import run_eval

    try:
        run_eval(args)
    except USER_ERRORS as exc:
        _fail(prog, exit_code(exc), message(exc))


# --------------------------------------------------------------------------- alexnet-summary


def summary_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-summary"
    p = argparse.ArgumentParser(prog=prog, description="Per-layer output shapes, parameters and MACs of the model.")
    p.add_argument("--config", metavar="FILE", type=_path,
                   help="YAML config (default: the built-in defaults, arch paper)")
    _add_set(p)
    p.add_argument("--input-size", type=int, default=224, metavar="PX", help="square input size (default 224)")
    args = p.parse_args(argv)
    from .config import ConfigError, replace
    from .configload import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.input_size < 63:
            raise ConfigError(f"--input-size: AlexNet's strides need at least 63 px, got {args.input_size}")
        if cfg.model.num_classes is None:
            cfg = replace(cfg, "model", num_classes=_count_class_folders(cfg.data.train_dir))
    except ConfigError as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    from .model import build_model, format_summary, layer_summary

    m = cfg.model
    for notice in m.ignored_notices():
        print(notice, file=sys.stderr)
    model = build_model(m)
    title = (f"AlexNet arch={m.arch} groups={m.effective_groups} num_classes={m.num_classes} "
             f"input 3x{args.input_size}x{args.input_size}")
    print(format_summary(layer_summary(model, args.input_size), title))


def _count_class_folders(train_dir: str | None) -> int:
    """model.num_classes: null outside training: the class folders of data.train_dir, as training counts them."""
    from .config import ConfigError
    from .data.datasets import DataError, class_folders, scan_image_folder
    from .data.shards import is_shard_source

    if train_dir is None:
        raise ConfigError("model.num_classes: null counts the class folders of data.train_dir, which is not set; "
                          "pass --set model.num_classes=N or data.train_dir=DIR")
    try:
        if is_shard_source(train_dir):  # WebDataset shards: the classes their samples name
            return len(scan_image_folder(train_dir)[0])
        return len(class_folders(train_dir))
    except DataError as exc:
        raise ConfigError(f"model.num_classes: null counts the class folders of data.train_dir, but {exc}; "
                          "pass --set model.num_classes=N") from None


# --------------------------------------------------------------------------- alexnet-report


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-report",
        description="Summarise a training run's output directory and draw OUT/report.png: train/val loss, "
                    "val top-1/top-5 per epoch, lr steps marked (the plot needs matplotlib: "
                    "pip install 'alexnet-train[plot]').",
    )
    p.add_argument("out", metavar="OUT", type=_path, help="the run's output directory (holds metrics.jsonl)")
    p.add_argument("--png", metavar="FILE", type=_path, help="where to write the PNG (default: OUT/report.png)")
    p.add_argument("--no-plot", action="store_true", help="print the summary only")
    return p


def report_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-report"
    args = report_parser().parse_args(argv)
    from .errors import USER_ERRORS, exit_code, message
    from .report import draw, load_run, summary_lines

    try:  # ReportError (PlotUnavailable says how to install matplotlib), WriteError: exit 1
        run = load_run(args.out)
        for line in summary_lines(run):
            _log(line)
        if not args.no_plot:
            _log(f"report: {draw(run, args.png or run.out_dir / 'report.png')}")
    except USER_ERRORS as exc:
        _fail(prog, exit_code(exc), message(exc))


# --------------------------------------------------------------------------- alexnet-prepare


def prepare_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-prepare"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write the paper's down-sampled copy of an image tree: shorter side to --size, the central "
                    "square, JPEG. Same folders and file names; or with --shards, WebDataset tar shards laid out "
                    "as timm/imagenet-1k-wds. Resumable; unreadable sources are reported.",
    )
    p.add_argument("src", metavar="SRC", type=_path,
                   help="source tree (ImageFolder, or a flat folder such as ILSVRC val)")
    p.add_argument("dst", metavar="DST", type=_path,
                   help="destination tree, or with --shards the folder of shards (created)")
    p.add_argument("--size", type=int, default=256,
                   help="side of the square output (default 256; with --shards, 0 keeps the original bytes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores; 0 = in this process)")
    p.add_argument("--shards", action="store_true",
                   help="write WebDataset tar shards (DST/imagenet1k-train-NNNN.tar ... and DST/_info.json) "
                        "instead of a tree")
    p.add_argument("--shard-size", type=int, default=None, metavar="BYTES",
                   help="with --shards: the most bytes per shard (default 1000000000)")
    p.add_argument("--labels", metavar="FILE", type=_path,
                   help="with --shards: labels of a flat SRC ('filename wnid' lines, or any ILSVRC format)")
    args = p.parse_args(argv)
    if not args.shards and (args.shard_size is not None or args.labels is not None):
        p.error("--shard-size and --labels go with --shards")
    from .data.datasets import DataError
    from .errors import WriteError
    from .tracking import Tracker

    tracker = Tracker(None, tensorboard=False)
    try:
        if args.shards:
            from .data.shardwriter import DEFAULT_SHARD_SIZE, write_shards

            report = write_shards(args.src, args.dst, size=args.size, quality=args.quality,
                                  shard_size=args.shard_size or DEFAULT_SHARD_SIZE, workers=args.workers,
                                  labels_file=args.labels,
                                  progress=lambda n: tracker.progress(n, "prepare", interval=1000), log=tracker.log)
        else:
            from .data.prepare import prepare_tree

            report = prepare_tree(args.src, args.dst, size=args.size, quality=args.quality, workers=args.workers,
                                  progress=lambda n: tracker.progress(n, "prepare", interval=1000), log=tracker.log)
    except (DataError, ValueError) as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    except WriteError as exc:
        _fail(prog, EXIT_RUNTIME, str(exc))
    except OSError as exc:
        _fail(prog, EXIT_RUNTIME, f"{exc.filename or args.dst}: {exc.strerror or exc}")
    if report.failed:
        tracker.log(f"{len(report.failed)} unreadable source file(s) were not copied; "
                    f"listed in {Path(args.dst) / 'prepare-failures.txt'}")


# --------------------------------------------------------------------------- alexnet-stats


def stats_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-stats"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Mean pixel, std and RGB covariance eigenvalues/vectors of a training set, as a config "
                    "fragment (use it with `include: FILE` in a config).",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", type=_path,
                   help="training tree (or any folder of images, or a folder of WebDataset tar shards)")
    p.add_argument("--samples", type=int, default=10000, help="images drawn at random (default 10000)")
    p.add_argument("--resize-size", type=int, default=256, help="shorter side the images are resized to (256)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="loader processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    p.add_argument("--out", metavar="FILE", type=_path, help="write the YAML here (default: print it)")
    args = p.parse_args(argv)
    from .data.datasets import BadImageError, DataError
    from .data.stats import compute_stats, stats_yaml
    from .errors import LoaderFailed
    from .tracking import Tracker

    tracker = Tracker(None, tensorboard=False, stream=sys.stderr)
    try:
        stats = compute_stats(args.data_dir, samples=args.samples, resize_size=args.resize_size,
                              workers=args.workers, seed=args.seed,
                              progress=lambda n: tracker.progress(n, "stats", interval=1000))
    except (DataError, ValueError) as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    except (BadImageError, LoaderFailed) as exc:
        _fail(prog, EXIT_RUNTIME, str(exc))
    text = stats_yaml(stats)
    if args.out:
        from .checkpoint import atomic_write_bytes

        try:
            atomic_write_bytes(args.out, lambda fh: fh.write(text.encode()))
        except OSError as exc:
            _fail(prog, EXIT_RUNTIME, f"--out {args.out}: {exc.strerror or exc}")
        tracker.log(f"wrote {args.out} ({stats.images} images); add `include: {args.out}` to a config")
    else:
        print(text, end="")


# --------------------------------------------------------------------------- alexnet-export


def export_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-export"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a checkpoint: TorchScript (model.pt; ONNX model.onnx where the onnx package is "
                    "installed), torchvision_state_dict.pth for the torchvision arch, and model.json with the "
                    "classes and the input each file expects.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=_path,
                   help="a .pth written by alexnet-train, or torchvision weights")
    p.add_argument("out", metavar="OUT", type=_path, help="output directory (created)")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .export import ExportError, export_model

    try:
        export_model(args.checkpoint, args.out, log=_log)  # logs each file it writes
    except ValueError as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    except (CheckpointError, ExportError) as exc:
        _fail(prog, EXIT_RUNTIME, str(exc))


# --------------------------------------------------------------------------- alexnet-predict


def predict_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-predict"
    p = argparse.ArgumentParser(prog=prog, description="Top-5 classes of images, with names and probabilities.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=_path,
                   help="a .pth written by alexnet-train, or torchvision weights")
    p.add_argument("images", metavar="IMAGE", type=_path, nargs="+", help="image files")
    p.add_argument("--synsets", metavar="FILE", type=_path,
                   help="class names: 'wnid name, name...' lines (synset_words.txt)")
    p.add_argument("--top", type=int, default=5, metavar="K", help="how many classes per image (default 5)")
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda or cuda:N")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data.datasets import BadImageError
    from .export import format_predictions, predict

    try:
        preds = predict(args.checkpoint, args.images, synsets=args.synsets, topk=args.top, device=args.device)
    except ValueError as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    except (CheckpointError, BadImageError) as exc:
        _fail(prog, EXIT_RUNTIME, str(exc))
    except RuntimeError as exc:  # e.g. a --device torch cannot use
        _fail(prog, EXIT_CONFIG, f"--device {args.device}: {str(exc).splitlines()[0]}")
    print(format_predictions(preds), end="")


# --------------------------------------------------------------------------- alexnet-data


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-data",
        description="Download, verify and lay out a public dataset as the ImageFolder tree alexnet-train "
                    "reads: DIR/train/<wnid>/, DIR/val/<wnid>/ and DIR/synset_words.txt. Re-running resumes "
                    "a cut download or unpack; a half-made tree is never left in DIR.",
    )
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def common(sp: argparse.ArgumentParser, archive: bool = True) -> None:
        sp.add_argument("dir", metavar="DIR", type=_path,
                        help="where the tree goes (created), e.g. data/tiny-imagenet-200")
        if archive:
            sp.add_argument("--from", dest="source", metavar="ARCHIVE", type=_path,
                            help="use this archive instead of downloading it (it is verified too)")
            sp.add_argument("--keep-archive", action="store_true",
                            help="keep the downloaded archive in DIR/.alexnet-data/downloads")
        sp.add_argument("--no-verify", action="store_true",
                        help="skip the published-MD5 check (for a repacked or mirrored archive of the same layout)")

    tiny = sub.add_parser("tiny-imagenet", help="Tiny ImageNet 200 (CS231n; 200 classes, 64x64, 500 train + "
                                                "50 val per class, 248 MB)")
    common(tiny)
    tiny.add_argument("--classes", metavar="WNIDS",
                      help="keep only these classes: comma-separated wnids or a file of them (docs/data.md's "
                           "tiny-imagenet-10 is ten of them)")
    tiny.add_argument("--train-per-class", type=int, metavar="N",
                      help="keep only the first N training images of each class, by file name (val stays whole)")
    nette = sub.add_parser("imagenette", help="fast.ai's Imagenette (10 ImageNet classes, ~9.5k train / 3.9k val)")
    common(nette)
    nette.add_argument("--size", default="320", choices=["full", "320", "160"],
                       help="shorter side of the images: full (1.5 GiB), 320 (326 MiB, default) or 160 (94 MiB)")
    sample = sub.add_parser("imagenet-sample", help="one full-resolution ILSVRC-2012 training photo for each of "
                                                    "the 1000 classes (107 MB; what the benchmarks read)")
    common(sample)
    ils = sub.add_parser("ilsvrc", help="ILSVRC-2012 from image-net.org's tar files (you download them; "
                                        "they need a login)")
    common(ils, archive=False)
    ils.add_argument("--train-tar", metavar="FILE", type=_path,
                     help="ILSVRC2012_img_train.tar (138 GiB, a tar of per-class tars)")
    ils.add_argument("--val-tar", metavar="FILE", type=_path, help="ILSVRC2012_img_val.tar (6.3 GiB, 50,000 flat JPEGs)")
    ils.add_argument("--devkit", metavar="FILE", type=_path,
                     help="ILSVRC2012_devkit_t12.tar.gz (val labels, class names; "
                                                      "needs scipy)")
    ils.add_argument("--labels", metavar="FILE", type=_path, help="val labels without the devkit ('file wnid' lines, "
                                                      "Kaggle's LOC_val_solution.csv, ...)")
    ils.add_argument("--val-layout", default="folders", choices=["folders", "flat"],
                     help="val sorted into class folders (default) or kept flat with DIR/val_labels.txt")
    ils.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="processes unpacking the per-class train tars (default: all cores)")
    return p


def data_main(argv: Sequence[str] | None = None) -> None:
    prog = "alexnet-data"
    args = data_parser().parse_args(argv)
    from .data import public

    t0 = time.monotonic()
    try:
        if args.dataset == "tiny-imagenet":
            public.tiny_imagenet(args.dir, args.source, args.no_verify, args.keep_archive, log=_log,
                                 classes=public.parse_classes(args.classes), train_per_class=args.train_per_class)
        elif args.dataset == "imagenette":
            public.imagenette(args.dir, args.size, args.source, args.no_verify, args.keep_archive, log=_log)
        elif args.dataset == "imagenet-sample":
            public.imagenet_sample(args.dir, args.source, args.no_verify, args.keep_archive, log=_log)
        else:
            public.ilsvrc(args.dir, args.train_tar, args.val_tar, args.devkit, args.labels, args.val_layout,
                          args.no_verify, args.workers, log=_log)
    except public.UsageError as exc:
        _fail(prog, EXIT_CONFIG, str(exc))
    except public.PublicDataError as exc:
        _fail(prog, EXIT_RUNTIME, str(exc))
    except OSError as exc:
        _fail(prog, EXIT_RUNTIME, f"{exc.filename or args.dir}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        _fail(prog, 130, "interrupted; run the same command again to resume")
    where = f"data.train_dir={args.dir}/train" + (f" data.val_dir={args.dir}/val"
                                                   if (Path(args.dir) / "val").exists() else "")
    _log(f"{args.dir}: ready ({time.monotonic() - t0:.0f} s); train with {where}")
