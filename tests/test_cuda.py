"""What behaves differently on a CUDA GPU: AMP (bf16; fp16 with its GradScaler), channels_last,
torch.compile, dist.mode=dp, NCCL DDP, resume, ten-crop eval and data.decode: device; a
training step with no host sync, validation under the training's autocast, dp replicas in
the autocast dtype.

Every test here is marked ``cuda``: without a GPU they skip (conftest says why);
``pytest -m cuda`` or ``scripts/gpu_check.py`` runs them on one.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet_train.config import DataConfig
from alexnet_train.configload import load_config
from alexnet_train.data.datasets import EncodedDataset, ImageDataset, scan_image_folder
from alexnet_train.data.loaders import Splits
from alexnet_train.data.batching import collate_encoded, collate_hwc, DecodeOnDevice
from alexnet_train.data.transforms import CenterPreset, TrainPreset
from alexnet_train.distributed import DistInfo
from alexnet_train.tracking import Tracker
from alexnet_train.train import StopRequest, Trainer

from .conftest import DEMO_CONFIG as DEMO, checkpoint_weights, console_script, loader_batches, read_metrics, run_train
from .conftest import decoder_disagreement, tiny_overrides, write_image_folder
from .near_ties import assert_same_up_to_near_ties, logit_bound, near_ties

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def argv(tree: tuple[Path, Path], out: Path, *extra: str, epochs: int = 2) -> list[str]:
    train, val = tree
    overrides = [o for o in tiny_overrides(train, val, 3, epochs) if o != "train.device=cpu"]
    return ["--config", DEMO, "--out", str(out), "--set", *overrides, "train.device=cuda", "data.batch_size=8",
            *extra]


def finite_rows(out: Path) -> list[dict]:
    rows = read_metrics(out)
    assert rows and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    return rows


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_saves_its_scaler(tree, tmp_path, amp):
    out = tmp_path / amp
    assert run_train(argv(tree, out, f"train.amp={amp}")) == 0
    finite_rows(out)
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["model"]["features.0.weight"].dtype == torch.float32  # autocast keeps float32 master weights
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler ran and its state is in the checkpoint
    assert run_train(argv(tree, out, f"train.amp={amp}", epochs=3)) == 0  # resumes with it
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]


def test_channels_last_trains_and_saves_a_loadable_model(tree, tmp_path):
    out = tmp_path / "cl"
    assert run_train(argv(tree, out, "train.channels_last=true", "train.amp=bf16")) == 0
    finite_rows(out)
    from alexnet_train.configload import load_config
    from alexnet_train.model import build_model

    cfg = load_config(out / "config.yaml")
    build_model(cfg.model).load_state_dict(checkpoint_weights(out / "last.pth"))


def test_compile_trains(tree, tmp_path):
    out = tmp_path / "compiled"
    assert run_train(argv(tree, out, "train.compile=true", epochs=1)) == 0
    finite_rows(out)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_resume_under_each_compile_mode_continues_the_same_run(tree, tmp_path, mode):
    """Every train.compile_mode a config can turn on, CUDA graphs included: a run resumed after
    epoch 1 ends where the uninterrupted one does (dropout's random stream replayed), up to
    cuDNN's non-deterministic kernels, as test_sigterm_and_resume_on_cuda allows."""
    extra = ("train.compile=true", f"train.compile_mode={mode}", "train.amp=bf16")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(argv(tree, straight, *extra, epochs=2)) == 0
    assert run_train(argv(tree, split, *extra, epochs=1)) == 0
    assert run_train(argv(tree, split, *extra, epochs=2)) == 0
    assert [r["epoch"] for r in read_metrics(split)] == [1, 2]
    a, b = checkpoint_weights(straight / "last.pth"), checkpoint_weights(split / "last.pth")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4), key


def test_dp_uses_every_gpu_or_says_it_needs_two(tree, tmp_path, capsys):
    out = tmp_path / "dp"
    assert run_train(argv(tree, out, "dist.mode=dp", epochs=1)) == 0
    log = capsys.readouterr().out
    if torch.cuda.device_count() < 2:
        assert "dist.mode=dp needs 2+ CUDA devices" in log
    else:
        assert "needs 2+" not in log
    finite_rows(out)


def test_nccl_ddp_with_one_process(tree, tmp_path):
    out = tmp_path / "ddp"
    cmd = [console_script("torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "alexnet_train",
           *argv(tree, out, "dist.mode=ddp", "dist.backend=nccl", epochs=1)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rank 0 of 1 from torchrun" in done.stdout
    assert read_metrics(out)[0]["val_images"] == 9


def test_sigterm_and_resume_on_cuda_continue_the_same_run(tree, tmp_path):
    straight = tmp_path / "straight"
    assert run_train(argv(tree, straight, "data.batch_size=2", "train.log_interval=1")) == 0
    out = tmp_path / "resumed"
    proc = subprocess.Popen([console_script("alexnet-train"), *argv(tree, out, "data.batch_size=2",
                                                                    "train.log_interval=1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        if line.startswith("epoch 1/2 train 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, rest
    saved = torch.load(out / "last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["step_in_epoch"] > 0 and "cuda_device" in saved["rng"]
    assert run_train(argv(tree, out, "data.batch_size=2", "train.log_interval=1")) == 0
    # cuDNN picks non-deterministic kernels (atomics in the backward pass), so two CUDA runs
    # are not bit-identical even uninterrupted; the resumed one must be the same run up to that.
    a, b = checkpoint_weights(straight / "last.pth"), checkpoint_weights(out / "last.pth")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-4), key
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def _scores(path: Path, val: Path, device: str, ten_crop: bool, amp_dtype=None):
    """(per-image scores in loader order, EvalResult) of alexnet-eval's evaluation on ``device``:
    centre logits, or the log of the ten-crop softmax average."""
    from alexnet_train.data.transforms import BatchPreprocess, TenCropPreset
    from alexnet_train.evaluate import evaluate_crops
    from alexnet_train.inference import load_for_inference

    loaded = load_for_inference(str(path), torch.device(device))
    _, samples = scan_image_folder(str(val))
    preset = TenCropPreset(loaded.data) if ten_crop else CenterPreset(loaded.data)
    batches = loader_batches(ImageDataset(samples, preset), collate_hwc, batch_size=4)
    rows = []
    results = evaluate_crops(loaded.model, batches, BatchPreprocess(loaded.data, device), torch.device(device),
                             ten_crop=ten_crop, amp_dtype=amp_dtype,
                             on_batch=lambda scores, _t, _b: rows.append(scores.float().cpu()))
    scores = torch.cat(rows)
    return (scores.log() if ten_crop else scores), results["ten_crop" if ten_crop else "center"]


def test_ten_crop_eval_on_cuda_matches_the_cpu(tree, tmp_path):
    """Up to what TF32 convolutions can change (tests/near_ties.py): top-1 may differ only at a
    near tie, so the accuracies differ by at most the near ties' share."""
    out = tmp_path / "run"
    assert run_train(argv(tree, out, epochs=1)) == 0
    _, val = tree
    for ten_crop in (False, True):
        cpu, cpu_result = _scores(out / "last.pth", val, "cpu", ten_crop)
        gpu, gpu_result = _scores(out / "last.pth", val, "cuda", ten_crop)
        assert cpu_result.images == gpu_result.images == 9  # exact: the same images on both
        ties = assert_same_up_to_near_ties(cpu, gpu, "tf32", factor=2.0 if ten_crop else 1.0)
        assert abs(gpu_result.top1 - cpu_result.top1) <= 100.0 * ties / 9 + 1e-9


@pytest.mark.parametrize("preset", [TrainPreset, CenterPreset])
def test_device_decoding_on_cuda_gives_the_worker_crops(tree, preset):
    train, _ = tree
    cfg = DataConfig(resize_size=72, crop_size=64)
    _, samples = scan_image_folder(str(train))

    worker = loader_batches(ImageDataset(samples, preset(cfg)), collate_hwc, batch_size=8, seed=3)
    device = loader_batches(EncodedDataset(samples, preset(cfg)), collate_encoded, batch_size=8, seed=3,
                            decoder=DecodeOnDevice("cuda"))
    # The decoders alone disagree by a few grey levels; a wrong crop, flip or channel order would
    # differ by tens (the images are noise of sigma 20 around each class's colour).
    disagreement = decoder_disagreement(train)
    assert disagreement < 8.0, f"nvJPEG and the CPU decoder disagree by {disagreement:.2f} levels per pixel"
    assert len(worker) == len(device)
    for (wi, wt, wb), (di, dt, db) in zip(worker, device):
        assert di.device.type == "cuda" and di.shape == wi.shape and torch.equal(wt, dt) and wb == db == []
        diff = float((di.cpu().float() - wi.float()).abs().mean())
        assert diff < 1.25 * disagreement + 0.25, f"crops differ by {diff:.2f}, decoders by {disagreement:.2f}"


def test_training_with_device_decoding_on_cuda(tree, tmp_path):
    out = tmp_path / "device-decode"
    assert run_train(argv(tree, out, "data.decode=device", "data.workers=2", "train.amp=bf16")) == 0
    finite_rows(out)


def cuda_trainer(tree, out: Path, *extra: str) -> Trainer:
    """A Trainer on the GPU over ``tree``'s 48 training images in equal batches of 8."""
    train, val = tree
    overrides = [o for o in tiny_overrides(train, val, 3, 1) if o != "train.device=cpu"]
    cfg = load_config(DEMO, [*overrides, "train.device=cuda", "data.batch_size=8", "data.pca_std=0.1", *extra])
    classes, samples = scan_image_folder(str(train))
    _, val_samples = scan_image_folder(str(val))
    return Trainer(cfg, Splits(classes, samples, val_samples), out, Tracker(None, enabled=False), DistInfo())


@pytest.mark.guard
@pytest.mark.parametrize("variant", [[], ["train.amp=bf16"], ["train.amp=fp16"],
                                     ["train.amp=bf16", "train.channels_last=true"]],
                         ids=["fp32", "bf16", "fp16", "bf16-channels_last"])
def test_training_steps_make_no_host_sync_between_log_intervals(tree, tmp_path, variant):
    trainer = cuda_trainer(tree, tmp_path, "train.log_interval=3", *variant)
    real, synced_at = trainer._sync_point, []

    def sync_point(*args):  # the one sync an interval may make; everything else raises
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(*args)
        finally:
            synced_at.append(trainer.step_in_epoch)
            torch.cuda.set_sync_debug_mode("error")

    trainer._sync_point = sync_point
    try:  # steps 1-3 warm up (cuDNN's autotuning, the first momentum buffers); 4-6 are checked
        trainer.train_epoch(StopRequest())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert synced_at == [3, 6]


def test_evaluation_makes_no_host_sync_per_batch(tree):
    from alexnet_train.data.transforms import BatchPreprocess
    from alexnet_train.evaluate import evaluate
    from alexnet_train.model import build_model

    train, val = tree
    cfg = load_config(DEMO, tiny_overrides(train, val, 3, 1))
    model = build_model(cfg.model).cuda()
    _, samples = scan_image_folder(str(train))
    batches = loader_batches(ImageDataset(samples[:16], CenterPreset(cfg.data)), collate_hwc, batch_size=4)
    pinned = [(images.pin_memory(), targets.pin_memory(), bad) for images, targets, bad in batches]

    def feed():  # batch 1 warms up (cuDNN); batches 2-4 run with any sync an error; the final read is allowed
        for k, batch in enumerate(pinned):
            yield batch
            if k == 0:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
        torch.cuda.set_sync_debug_mode(0)

    try:
        result = evaluate(model, feed(), BatchPreprocess(cfg.data, "cuda"), torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.images == 16


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_validation_runs_under_the_training_autocast_and_matches_float32(tmp_path, amp):
    """CUDA's autocast casts other ops than the CPU's, so the CPU's measured bounds
    (tests/test_precision.py) do not carry over: per image, the autocast logits stay within
    what the format's rounding can do (tests/near_ties.py) and top-1 moves only at near ties."""
    classes = ["n01", "n02", "n03"]
    train = write_image_folder(tmp_path / "train", classes, 16, seed=1)
    val = write_image_folder(tmp_path / "val", classes, 30, seed=2)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(train, val, 3, 2) if o not in ("train.device=cpu",
                                                                           "data.normalize=torchvision")]
    assert run_train(["--config", DEMO, "--out", str(out), "--set", *overrides, "train.device=cuda",
                      f"train.amp={amp}", "data.normalize=paper", "optim.lr=0.0003", "data.batch_size=4"]) == 0
    logged = read_metrics(out)[-1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    ref, ref_result = _scores(out / "last.pth", val, "cuda", ten_crop=False)
    got, got_result = _scores(out / "last.pth", val, "cuda", ten_crop=False, amp_dtype=dtype)
    assert logged["val_images"] == got_result.images == ref_result.images == 90  # exact
    ties = assert_same_up_to_near_ties(ref, got, amp)
    assert abs(got_result.top1 - ref_result.top1) <= 100.0 * ties / 90 + 1e-9
    # Validation ran under the training's autocast: what evaluation under it gives, up to cuDNN
    # choosing other kernels in this process (sums in another order: well inside the same bound).
    ties_logged = int(near_ties(ref, logit_bound(ref, amp)).sum())
    assert abs(logged["val_top1"] - got_result.top1) <= 100.0 * ties_logged / 90 + 1e-9


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="dist.mode=dp needs 2+ GPUs")
def test_dp_replicas_run_in_the_autocast_dtype(tree, tmp_path):
    trainer = cuda_trainer(tree, tmp_path, "dist.mode=dp", "train.amp=bf16")
    seen = set()
    trainer.model.features[0].register_forward_hook(lambda _m, _i, out: seen.add((out.device.index, out.dtype)))
    trainer.train_epoch(StopRequest())
    assert len({device for device, _ in seen}) >= 2  # replicas ran on several GPUs ...
    assert {dtype for _, dtype in seen} == {torch.bfloat16}  # ... each in bf16 (DataParallel alone: fp16)


def test_the_cuda_tests_ran_on_a_gpu():
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1, sys.version


# --------------------------------------------------------------------------- guards
# Marked guard: scripts/gpu_check.py runs these first, inside any --budget of 300 s or more.


@pytest.mark.guard
def test_fused_sgd_on_cuda_after_an_fp16_overflow_at_step_1_takes_stock_sgds_step_2():
    """The CUDA half of tests/test_precision.py's: the fused kernel and GradScaler("cuda"),
    with the caching allocator holding NaN blocks of the momentum buffers' sizes."""
    import copy

    import torch.nn.functional as F

    from alexnet_train.model import build_model
    from alexnet_train.optim import build_sgd

    cfg = load_config(DEMO, ["model.arch=custom", "model.conv_widths=[8,16,16,16,16]", "model.fc_widths=[32,32]",
                             "model.num_classes=3", "model.init=kaiming"])
    torch.manual_seed(0)
    fused_model = build_model(cfg.model).cuda().eval()
    stock_model = copy.deepcopy(fused_model)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    y = torch.tensor([0, 1, 2, 0], device="cuda")
    for model, fused in ((fused_model, True), (stock_model, False)):
        opt = build_sgd(model, cfg.optim, fused=fused)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
        for step in (1, 2):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            if step == 1:
                for p in model.parameters():
                    p.grad.fill_(float("inf"))  # an fp16 overflow
                junk = [torch.full_like(p, float("nan")) for p in model.parameters()]
                del junk  # freed blocks of the buffers' sizes, for empty_like to hand out
            scaler.step(opt)
            scaler.update()
            if step == 1:
                assert scaler.get_scale() == 2.0 ** 15
    for a, b in zip(fused_model.parameters(), stock_model.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.guard
def test_a_rank_whose_task_sees_one_gpu_trains_on_it(tree, tmp_path, monkeypatch):
    """Slurm's --gpus-per-task=1: every task's one visible GPU is its cuda:0, whatever its local
    rank (rank 1 once asked DDP for cuda:1: "invalid device ordinal").  gloo, so that two
    ranks may share this machine's one GPU."""
    from .test_ddp_agreement import Ranks

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    out = tmp_path / "out"
    results = Ranks([argv(tree, out, "dist.mode=ddp", "dist.backend=gloo", "data.batch_size=4", epochs=1)] * 2
                    ).wait(timeout=240)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "device: cuda:0 " in results[0][1]
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.guard
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: 2+ GPUs")
def test_torchrun_with_every_gpu_visible_puts_each_rank_on_its_own_gpu_for_training_and_eval(tree, tmp_path):
    """One process per GPU, all visible (torchrun): NCCL refuses two ranks on one GPU, so a run
    that finishes had them apart; alexnet-eval --device cuda follows the same rule."""
    out = tmp_path / "out"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, "-m", "alexnet_train", "train",
                           *argv(tree, out, "dist.mode=ddp", "dist.backend=nccl", epochs=1)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "eval.json"
    done = subprocess.run([*torchrun, "-m", "alexnet_train", "eval", str(out / "last.pth"), "--device", "cuda",
                           "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(report.read_text())["center"]["images"] == 9  # every image once over both ranks

