#!/usr/bin/env python3
"""The whole GPU check in one command: CUDA tests, benchmarks, a short paper.yaml run, one report.

    python scripts/gpu_check.py --data DIR --report FILE.json [--steps 300] [--skip-tests]

DIR is an ImageFolder of JPEGs (``<class>/<file>.JPEG``), e.g. the 1000 photos of
``alexnet-data imagenet-sample data/imagenet-sample`` (originals) or their prepared
256 px copy (``alexnet-prepare``, ~30 MB).  On a fresh GPU machine whose image has
torch, torchvision, tensorboard, tqdm, pyyaml and pillow, ``pip install --no-deps -e .``
is all the set-up it needs (TorchCodec, if absent, only turns ``data.decode: device``
into a skipped part).  In order, each part with its own time limit:

1. ``pytest -m cuda``: every test of what behaves differently on CUDA (AMP with the
   scaler, channels_last, compile, dp, NCCL DDP, resume, ten-crop eval, device decoding);
2. ``scripts/bench_model.py``: every variant (arch x precision x memory format, and
   compiled) against torchvision's AlexNet in float32, with the epoch time each implies;
3. ``scripts/bench_train.py``: the whole training step, ours against a
   pytorch/examples-style loop, with ``data.decode: worker`` and ``device``;
4. ``configs/paper.yaml`` trained for ``--steps`` steps on DIR with the best variant of 2.

It writes FILE.json (device, versions, every test's outcome, images/s and ratio per
variant, the implied ImageNet epoch, the training run's figures, what was skipped and
why) and FILE.txt, the same in a few lines, also printed.  Without a GPU it runs the
same plumbing on the CPU with tiny sizes, says so first, and lists what it skipped:
the numbers are then no GPU's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167


def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int, str, float]:
    """(exit code, stdout+stderr, seconds); 124 when it ran out of time."""
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - started
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.monotonic() - started


def environment(gpu: bool) -> dict:
    import torchvision

    from alexnet_train.data.decode import FAST_DECODER

    env = {
        "gpu": gpu,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu (no CUDA GPU found)",
        "gpus": torch.cuda.device_count() if gpu else 0,
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpu else None,
        "python": platform.python_version(), "host": platform.node(),
        "decoder": FAST_DECODER or "PIL (TorchCodec not loadable)",
    }
    if gpu:
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["bf16"] = torch.cuda.is_bf16_supported()
    return env


def cuda_tests(timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "cuda.xml"
        code, out, seconds = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                                  f"--junitxml={xml}", "tests"], timeout)
        outcomes = {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
                kind = "passed"
                for child in case:
                    if child.tag in ("failure", "error"):
                        kind = "failed"
                    elif child.tag == "skipped":
                        kind = "skipped: " + (child.get("message") or "")
                outcomes[name] = kind
    summary = {k: sum(1 for v in outcomes.values() if v.split(":")[0] == k) for k in ("passed", "failed", "skipped")}
    return {"exit_code": code, "seconds": round(seconds, 1), "summary": summary, "tests": outcomes,
            "tail": out[-3000:] if code not in (0, 5) else ""}


ROW = re.compile(r"^(?P<label>(baseline|ours): .+?)\s+(?P<rate>[\d.]+) images/s\s+(?P<ratio>[\d.]+)x\s+"
                 r"(?P<minutes>[\d.]+) min/epoch")


def bench_model(gpu: bool, timeout: float) -> dict:
    args = (["--device", "cuda", "--amps", "none", "tf32", "bf16", "fp16", "--compile"] if gpu else
            ["--device", "cpu", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--archs", "paper",
             "--amps", "none"])
    code, out, seconds = run([sys.executable, "scripts/bench_model.py", *args], timeout)
    rows = []
    for line in out.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows.append({"variant": m["label"], "images_per_s": float(m["rate"]), "ratio": float(m["ratio"]),
                         "imagenet_epoch_min": float(m["minutes"])})
    best = max((r for r in rows if r["variant"].startswith("ours")), key=lambda r: r["images_per_s"], default=None)
    return {"exit_code": code, "seconds": round(seconds, 1), "args": args, "rows": rows, "best": best,
            "tail": out[-3000:] if code else ""}


def bench_train(data: Path, gpu: bool, decode: str, timeout: float) -> dict:
    args = (["--device", "cuda", "--workers", str(min(16, os.cpu_count() or 1)), "--batch-size", "128",
             "--steps", "30"] if gpu else
            ["--device", "cpu", "--workers", "1", "--batch-size", "8", "--steps", "2", "--warmup", "1"])
    extra = ["--set", f"data.decode={decode}"] + (["train.amp=bf16", "train.channels_last=true"] if gpu else [])
    code, out, seconds = run([sys.executable, "scripts/bench_train.py", "--data", str(data), *args, *extra], timeout)
    found = {}
    for key, pattern in (("plain", r"plain .*?:\s+([\d.]+) images/s"), ("ours", r"ours .*?:\s+([\d.]+) images/s"),
                         ("speedup", r"^speedup: ([\d.]+)")):
        m = re.search(pattern, out, re.M)
        found[key] = float(m.group(1)) if m else None
    return {"exit_code": code, "seconds": round(seconds, 1), "decode": decode, "args": args + extra,
            "plain_images_per_s": found["plain"], "ours_images_per_s": found["ours"], "speedup": found["speedup"],
            "tail": out[-3000:] if code else ""}


def variant_overrides(best: dict | None) -> list[str]:
    """The train.* settings of bench_model's best row of ours."""
    label = best["variant"] if best else ""
    sets = [f"train.amp={amp}" for amp in ("bf16", "fp16") if f", {amp}" in label]
    sets.append(f"train.tf32={'false' if ', none' in label else 'true'}")
    sets.append(f"train.channels_last={'true' if 'channels_last' in label else 'false'}")
    sets.append(f"train.compile={'true' if 'compiled' in label else 'false'}")
    return sets


def paper_run(data: Path, gpu: bool, best: dict | None, steps: int, timeout: float, work: Path) -> dict:
    from alexnet_train.data.datasets import scan_image_folder

    classes, samples = scan_image_folder(str(data))
    batch = 128 if gpu else 8
    if not gpu:  # the plumbing only: a few images of two classes
        small = work / "small"
        for path, target in [s for s in samples if s[1] < 2][:16]:
            dest = small / classes[target] / Path(path).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
        data, samples = small, [s for s in samples if s[1] < 2][:16]
    per_epoch = max(1, len(samples) // batch)
    epochs = max(1, math.ceil(steps / per_epoch)) if gpu else 1
    out = work / "paper-run"
    sets = [f"data.train_dir={data}", f"data.val_dir={data}", "model.num_classes=null", f"data.batch_size={batch}",
            f"train.epochs={epochs}", "train.checkpoint_minutes=0", "train.log_interval=50",
            f"data.workers={min(16, os.cpu_count() or 1) if gpu else 1}", f"train.device={'cuda' if gpu else 'cpu'}",
            *(variant_overrides(best) if gpu else [])]
    code, log, seconds = run([sys.executable, "-m", "alexnet_train", "train", "--config", "configs/paper.yaml",
                              "--out", str(out), "--set", *sets], timeout)
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rate = max((r["images_per_s"] for r in rows[1:] or rows), default=None)  # epoch 1 holds the warm-up
    return {"exit_code": code, "seconds": round(seconds, 1), "overrides": sets, "epochs": len(rows),
            "steps": len(rows) * per_epoch, "images_per_s": rate,
            "data_wait": rows[-1]["data_wait"] if rows else None,
            "imagenet_epoch_min": round(IMAGENET_TRAIN / rate / 60, 1) if rate else None,
            "final_train_loss": rows[-1]["train_loss"] if rows else None, "tail": log[-3000:] if code else ""}


def summary_lines(report: dict) -> list[str]:
    env = report["environment"]
    lines = [f"gpu_check on {env['device']} ({env['host']}), torch {env['torch']}, CUDA {env['cuda']}, "
             f"decoder {env['decoder']}"]
    if not env["gpu"]:
        lines.append("NO GPU FOUND: the CPU ran the plumbing with tiny sizes; none of these numbers is a GPU's")
    for name in report["skipped"]:
        lines.append(f"skipped: {name}")
    t = report.get("cuda_tests")
    if t:
        lines.append(f"pytest -m cuda: {t['summary']['passed']} passed, {t['summary']['failed']} failed, "
                     f"{t['summary']['skipped']} skipped ({t['seconds']:.0f} s)")
        lines += [f"  FAILED {name}" for name, kind in t["tests"].items() if kind == "failed"]
    m = report.get("bench_model")
    if m:
        base = next((r for r in m["rows"] if r["variant"].startswith("baseline")), None)
        if base:
            lines.append(f"bench_model baseline {base['images_per_s']:.0f} img/s ({base['imagenet_epoch_min']} min/epoch)")
        if m["best"]:
            b = m["best"]
            lines.append(f"bench_model best: {b['variant']}: {b['images_per_s']:.0f} img/s, {b['ratio']:.2f}x, "
                         f"{b['imagenet_epoch_min']} min per ImageNet epoch if the loader keeps up")
    for t in report.get("bench_train", []):
        lines.append(f"bench_train data.decode={t['decode']}: ours {t['ours_images_per_s']} img/s vs plain "
                     f"{t['plain_images_per_s']} img/s, speedup {t['speedup']} (exit {t['exit_code']})")
    r = report.get("paper_run")
    if r:
        rate = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "?"
        wait = f"{100 * r['data_wait']:.0f}%" if r["data_wait"] is not None else "?"
        lines.append(f"paper.yaml: {r['steps']} steps in {r['epochs']} epochs, {rate} img/s, data wait {wait}, "
                     f"implied ImageNet epoch {r['imagenet_epoch_min']} min (exit {r['exit_code']})")
    lines.append(f"overall: {'OK' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="an ImageFolder of JPEGs (<class>/<file>.JPEG)")
    p.add_argument("--report", required=True, type=Path, help="the JSON report (a .txt summary goes beside it)")
    p.add_argument("--steps", type=int, default=300, help="training steps of configs/paper.yaml (on a GPU)")
    p.add_argument("--skip-tests", action="store_true", help="leave out pytest -m cuda")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        p.error(f"--data: directory not found: {args.data}")
    started = time.monotonic()
    gpu = torch.cuda.is_available()
    report: dict = {"environment": environment(gpu), "skipped": []}
    print(f"gpu_check: {report['environment']['device']}", flush=True)
    if not gpu:
        print("gpu_check: NO GPU FOUND - running the plumbing on the CPU with tiny sizes", flush=True)
        report["skipped"].append("GPU measurements: no CUDA GPU (every number below is from the CPU, tiny sizes)")
    if args.skip_tests:
        report["skipped"].append("pytest -m cuda: --skip-tests")
    else:
        print("gpu_check: pytest -m cuda ...", flush=True)
        report["cuda_tests"] = cuda_tests(timeout=300)
        if not gpu:
            report["skipped"].append("pytest -m cuda: every test skips without a GPU")
    print("gpu_check: bench_model ...", flush=True)
    report["bench_model"] = bench_model(gpu, timeout=180)
    report["bench_train"] = []
    for decode in ("worker", "device"):
        if decode == "device" and report["environment"]["decoder"] != "torchcodec":
            report["skipped"].append("bench_train data.decode=device: TorchCodec is not loadable")
            continue
        print(f"gpu_check: bench_train data.decode={decode} ...", flush=True)
        report["bench_train"].append(bench_train(args.data, gpu, decode, timeout=150))
    print("gpu_check: configs/paper.yaml ...", flush=True)
    with tempfile.TemporaryDirectory() as work:
        report["paper_run"] = paper_run(args.data, gpu, report["bench_model"]["best"], args.steps, 180, Path(work))
    parts = [report["bench_model"], *report["bench_train"], report["paper_run"]]
    tests = report.get("cuda_tests")
    report["ok"] = all(part["exit_code"] == 0 for part in parts) and (
        tests is None or (tests["exit_code"] in (0, 5) and tests["summary"]["failed"] == 0))
    report["seconds"] = round(time.monotonic() - started, 1)
    lines = summary_lines(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    args.report.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
