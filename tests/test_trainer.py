"""The trainer on real runs: exact resume, signals, non-finite loss, the run lock, DDP over gloo."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from alexnet_train.checkpoint import RunLock

from .conftest import DEMO_CONFIG as DEMO, assert_bit_identical, checkpoint_weights as weights, console_script
from .conftest import read_metrics as metrics, run_train as run, tiny_overrides

pytestmark = pytest.mark.slow


def args(train: Path, val: Path, out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return ["--config", DEMO, "--out", str(out), "--set", *tiny_overrides(train, val, 3, epochs),
            "data.batch_size=4", *extra]


def test_resume_between_epochs_is_bit_identical(tree, tmp_path, capsys):
    train, val = tree
    assert run(args(train, val, tmp_path / "straight")) == 0
    # Interrupted after epoch 1 (a run that was told to stop there), resumed with 2 loader workers.
    assert run(args(train, val, tmp_path / "split", epochs=1)) == 0
    assert run(args(train, val, tmp_path / "split", "data.workers=2")) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_bit_identical(weights(tmp_path / "straight" / "last.pth"), weights(tmp_path / "split" / "last.pth"))
    assert [m["val_top1"] for m in metrics(tmp_path / "straight")] == [m["val_top1"] for m in metrics(tmp_path / "split")]


def _start(argv: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([console_script("alexnet-train"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)


def test_sigterm_mid_epoch_saves_and_resume_is_bit_identical(tree, tmp_path):
    train, val = tree
    straight = tmp_path / "straight"
    assert run(args(train, val, straight, "data.batch_size=2", "train.log_interval=1", epochs=2)) == 0

    out = tmp_path / "interrupted"
    proc = _start(args(train, val, out, "data.batch_size=2", "train.log_interval=1", epochs=2), out)
    for line in proc.stdout:  # stop it a few steps into the first epoch
        if line.startswith("epoch 1/2 train 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "interrupted by SIGTERM" in rest
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 24  # saved inside epoch 1

    assert run(args(train, val, out, "data.batch_size=2", "train.log_interval=1", epochs=2)) == 0
    assert_bit_identical(weights(straight / "last.pth"), weights(out / "last.pth"))
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    assert metrics(out)[0]["train_loss"] == pytest.approx(metrics(straight)[0]["train_loss"], rel=1e-6)


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tree, tmp_path, capsys):
    train, val = tree
    out = tmp_path / "out"
    assert run(args(train, val, out, epochs=1)) == 0
    before = (out / "last.pth").read_bytes()
    capsys.readouterr()
    code = run(args(train, val, out, "optim.lr=1e12", epochs=2))
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "training loss is nan" in err or "training loss is inf" in err
    assert "epoch 2" in err and "step" in err and "lr 1e+12" in err
    assert (out / "last.pth").read_bytes() == before


def test_a_second_run_on_a_locked_out_exits_at_once_naming_the_lock(tree, tmp_path, capsys):
    train, val = tree
    out = tmp_path / "out"
    out.mkdir()
    lock = RunLock(out).acquire()  # a live run holds OUT
    try:
        started = time.monotonic()
        assert run(args(train, val, out)) == 75  # EX_TEMPFAIL: already running, try later
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert str(out / ".lock") in err and f"pid {os.getpid()}" in err
        assert not (out / "last.pth").exists()
    finally:
        lock.release()
    # The lock file stays behind, as after a crash: it does not block the next run.
    assert (out / ".lock").exists()
    assert run(args(train, val, out, epochs=1)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_eval(ckpt: Path, val: Path, tmp_path: Path) -> dict:
    out = tmp_path / "eval.json"
    subprocess.run([console_script("alexnet-eval"), str(ckpt), "--data", str(val), "--device", "cpu",
                    "--json", str(out)], check=True, capture_output=True)
    return json.loads(out.read_text())["center"]


def test_ddp_two_processes_counts_every_val_image_once(tree, tmp_path):
    train, val = tree
    out = tmp_path / "out"
    cmd = [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", console_script("alexnet-train"),
           *args(train, val, out, "dist.mode=ddp", "train.device=cpu", epochs=2)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["val_images"] == 9 for r in rows)
    single = _single_process_eval(out / "last.pth", val, tmp_path)
    assert single["images"] == 9
    assert rows[-1]["val_top1"] == pytest.approx(single["top1"], abs=1e-9)
    assert rows[-1]["val_loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert not any(k.startswith("module.") for k in weights(out / "last.pth"))


def test_ddp_two_nodes_on_loopback(tree, tmp_path):
    train, val = tree
    out = tmp_path / "out"
    port = str(_free_port())
    procs = []
    for node in ("0", "1"):
        cmd = [console_script("torchrun"), "--nnodes", "2", "--node_rank", node, "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", port, console_script("alexnet-train"),
               *args(train, val, out, "dist.mode=ddp", "train.device=cpu", epochs=1)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-1500:] for log in logs)
    rows = metrics(out)
    assert len(rows) == 1 and rows[0]["val_images"] == 9
    assert rows[0]["val_top1"] == pytest.approx(_single_process_eval(out / "last.pth", val, tmp_path)["top1"])


def test_configure_cuda_sets_autotuning_and_the_tf32_choice():
    from alexnet_train.device import configure_cuda

    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_cuda(tf32=False)
        assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        configure_cuda(tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
