"""Fine-tuning: ``model.weights``, ``model.freeze``, ``optim.head_lr_mult`` and ``model.num_classes: null``.

Real runs on real JPEG ImageFolders: a tiny 3-class model is trained for one epoch
and its checkpoint is the source of the fine-tunes below (on two *other* classes,
on the same classes, on other names); torchvision's ImageNet weights are read
offline from a planted torch hub cache file ($TORCH_HOME), and a download that
cannot happen (a proxy nothing listens on) must fail with where to put the file.
The exit codes users see are checked on the installed console scripts.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from alexnet_train.cli import train_main
from alexnet_train.config import ConfigError, ModelConfig
from alexnet_train.configload import load_config
from alexnet_train.model import build_model
from alexnet_train.transfer import read_source

from .conftest import CLASSES, DEMO_CONFIG, TINY_MODEL, console_script, read_metrics, tiny_overrides, write_image_folder

pytestmark = pytest.mark.slow

NEW_CLASSES = ["cat", "dog"]  # the fine-tune's classes: not the source's
TV_FILE = "alexnet-owt-7be5be79.pth"
TV_URL = f"https://download.pytorch.org/models/{TV_FILE}"
# Module names of conv1-conv5 and fc6-fc8 in the tiny (LRN) custom model.
CONV = ["features.0", "features.4", "features.8", "features.10", "features.12"]
FC67 = ["classifier.1", "classifier.4"]
HEAD = "classifier.6"
# The log lines of the seven layers a tiny fine-tune loads (the source: TINY_MODEL, 3 classes).
LOADED_LINES = [
    "  conv1 features.0    weight 8x3x11x11, bias 8       loaded",
    "  conv2 features.4    weight 16x4x5x5, bias 16       loaded",
    "  conv3 features.8    weight 16x16x3x3, bias 16      loaded",
    "  conv4 features.10   weight 16x8x3x3, bias 16       loaded",
    "  conv5 features.12   weight 16x8x3x3, bias 16       loaded",
    "  fc6   classifier.1  weight 32x576, bias 32         loaded",
    "  fc7   classifier.4  weight 32x32, bias 32          loaded",
]
FC8_NEW_COUNT = ("  fc8   classifier.6  weight 2x32, bias 2            "
                 "initialised (kaiming): the weights have 3 classes, this run 2")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


# --------------------------------------------------------------------------- helpers


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def keys_of(modules: list[str]) -> list[str]:
    return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]


def run(name: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([console_script(name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else os.environ.copy())


def train_args(train: Path, val: Path, out: Path, *extra: str, num_classes: object = "null",
               epochs: int = 1) -> list[str]:
    return ["--config", DEMO_CONFIG, "--set", *tiny_overrides(train, val, num_classes, epochs), *extra,
            "--out", str(out)]


def train_ok(capsys, *args: str) -> str:
    """alexnet-train in-process; expect success; its stdout."""
    try:
        train_main(list(args))
    except SystemExit as exc:  # pragma: no cover - shown on failure only
        captured = capsys.readouterr()
        pytest.fail(f"alexnet-train exited {exc.code}: {captured.err}\n{captured.out}")
    return capsys.readouterr().out


def one_error_line(err: str, prog: str = "alexnet-train") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got: {err!r}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def trainable_indices(optimizer_state: dict) -> list[int]:
    return [i for group in optimizer_state["param_groups"] for i in group["params"]]


def assert_optimizer_state_only_for(state: dict, names: list[str]) -> None:
    """The optimizer holds exactly ``names`` (in model order), each with a momentum buffer of its shape."""
    opt = state["optimizer"]
    indices = trainable_indices(opt)
    assert len(indices) == len(names), (len(indices), names)
    assert sorted(opt["state"]) == sorted(indices)
    # SGD numbers its parameters group by group; groups hold them in model order, head groups last.
    by_index = dict(zip(sorted(indices), names))
    for i, name in by_index.items():
        assert opt["state"][i]["momentum_buffer"].shape == state["model"][name].shape, name


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("trees")
    return {
        "source": (write_image_folder(root / "src" / "train", CLASSES, 8, seed=1),
                   write_image_folder(root / "src" / "val", CLASSES, 3, seed=2)),
        "new": (write_image_folder(root / "new" / "train", NEW_CLASSES, 8, seed=3),
                write_image_folder(root / "new" / "val", NEW_CLASSES, 3, seed=4)),
    }


@pytest.fixture(scope="module")
def source(trees, tmp_path_factory) -> Path:
    """last.pth of a tiny 3-class model trained one epoch: the weights every fine-tune here starts from."""
    train, val = trees["source"]
    out = tmp_path_factory.mktemp("source") / "runA"
    # Another seed than the fine-tunes': their fresh draws must not resemble these weights.
    train_main(train_args(train, val, out, "train.seed=7", num_classes=3))
    return out / "last.pth"


@pytest.fixture(scope="module")
def finetuned(trees, source, tmp_path_factory):
    """alexnet-train (the script) from ``source`` on cat/dog, num_classes null, conv layers frozen."""
    train, val = trees["new"]
    out = tmp_path_factory.mktemp("finetune") / "runB"
    proc = run("alexnet-train", *train_args(train, val, out, f"model.weights={source}", "model.freeze=features"))
    return proc, out


# --------------------------------------------------------------------------- from our own checkpoint


def test_finetune_from_a_checkpoint_logs_each_layer_and_keeps_the_frozen_convs(finetuned, source, trees):
    proc, out = finetuned
    assert proc.returncode == 0, proc.stderr
    log = proc.stdout.splitlines()
    train_dir = trees["new"][0]
    assert f"model.num_classes: 2, the class folders of {train_dir}" in log
    assert f"weights: {source} (alexnet-train checkpoint: arch custom, 3 classes, 1 epoch)" in log
    start = log.index(LOADED_LINES[0])
    assert log[start:start + 9] == LOADED_LINES + [FC8_NEW_COUNT, "weights: 7 layers loaded, 1 initialised"]
    assert any(line.startswith("model.freeze=features: conv1, conv2, conv3, conv4, conv5 fixed; training ")
               for line in log), proc.stdout

    src, state = load(source), load(out / "last.pth")
    assert state["classes"] == NEW_CLASSES
    assert state["config"]["model"]["num_classes"] == 2
    assert state["config"]["model"]["weights"] == str(source)
    assert state["transfer"] == {
        "weights": str(source),
        "description": f"{source} (alexnet-train checkpoint: arch custom, 3 classes, 1 epoch)",
        "loaded": CONV + FC67,
        "initialised": [HEAD],
    }
    model = state["model"]
    # Frozen: bit-identical to the source after a training epoch; fc6-fc8 trained.
    for key in keys_of(CONV):
        assert torch.equal(model[key], src["model"][key]), key
    assert not torch.equal(model["classifier.1.weight"], src["model"]["classifier.1.weight"])
    assert model[f"{HEAD}.weight"].shape == (2, 32) and model[f"{HEAD}.bias"].shape == (2,)
    assert src["model"][f"{HEAD}.weight"].shape == (3, 32)
    # No momentum buffers (nor any optimizer entry) for the frozen conv layers.
    assert_optimizer_state_only_for(state, keys_of(FC67 + [HEAD]))


def test_eval_export_and_predict_use_the_finetuned_classes(finetuned, trees, tmp_path):
    proc, out = finetuned
    assert proc.returncode == 0, proc.stderr
    best = out / "best.pth"
    _train, val = trees["new"]

    report = tmp_path / "eval.json"
    done = run("alexnet-eval", best, "--json", report)
    assert done.returncode == 0, done.stderr
    center = json.loads(report.read_text())["center"]
    best_row = max(read_metrics(out), key=lambda r: r["val_top1"])
    assert center["images"] == 2 * 3 == best_row["val_images"]
    assert center["top1"] == pytest.approx(best_row["val_top1"], abs=1e-6)
    assert center["top5"] == 100.0  # two classes: both are in the top 5

    exported = tmp_path / "exported"
    done = run("alexnet-export", best, exported)
    assert done.returncode == 0, done.stderr
    meta = json.loads((exported / "model.json").read_text())
    assert meta["classes"] == NEW_CLASSES and meta["num_classes"] == 2
    assert (exported / "model.pt").is_file() and f"wrote {exported / 'model.pt'}" in done.stdout

    images = [str(sorted((val / c).glob("*.JPEG"))[0]) for c in NEW_CLASSES]
    done = run("alexnet-predict", best, *images)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * (1 + 2), done.stdout  # per image: its path, then both classes
    for i, path in enumerate(images):
        assert lines[3 * i] == path
        guesses = [line.split() for line in lines[3 * i + 1: 3 * i + 3]]
        assert sorted(g[1] for g in guesses) == NEW_CLASSES
        assert sum(float(g[0].rstrip("%")) for g in guesses) == pytest.approx(100.0, abs=0.02)


def test_same_classes_load_fc8_too_and_all_but_last_trains_only_fc8_at_head_lr(trees, source, capsys, tmp_path):
    train, val = trees["source"]
    out = tmp_path / "OUT"
    log = train_ok(capsys, *train_args(train, val, out, f"model.weights={source}", "model.freeze=all_but_last",
                                       "optim.head_lr_mult=10", num_classes=3)).splitlines()
    assert "  fc8   classifier.6  weight 3x32, bias 3            loaded" in log
    assert "weights: 8 layers loaded, 0 initialised" in log
    assert ("model.freeze=all_but_last: conv1, conv2, conv3, conv4, conv5, fc6, fc7 fixed; "
            "training 99 of 28,803 parameters") in log  # fc8: 3 x 32 + 3
    assert "optim.head_lr_mult=10: fc8 learns at 10 x lr" in log

    src, state = load(source)["model"], load(out / "last.pth")
    for key in keys_of(CONV + FC67):
        assert torch.equal(state["model"][key], src[key]), key
    for key in keys_of([HEAD]):
        assert not torch.equal(state["model"][key], src[key]), f"{key} did not train"
    assert state["transfer"]["loaded"] == CONV + FC67 + [HEAD] and state["transfer"]["initialised"] == []
    assert_optimizer_state_only_for(state, keys_of([HEAD]))
    groups = state["optimizer"]["param_groups"]
    base_lr = read_metrics(out)[-1]["lr"]
    assert base_lr == pytest.approx(0.01)
    assert groups and all(g["head"] for g in groups)
    assert [g["lr"] for g in groups] == pytest.approx([10 * base_lr] * len(groups))


def test_other_class_names_of_the_same_count_get_a_fresh_fc8(source, capsys, tmp_path):
    others = ["n09000001", "n09000002", "n09000003"]
    train = write_image_folder(tmp_path / "train", others, 4, seed=5)
    val = write_image_folder(tmp_path / "val", others, 2, seed=6)
    out = tmp_path / "OUT"
    log = train_ok(capsys, *train_args(train, val, out, f"model.weights={source}",
                                       "model.freeze=all_but_last")).splitlines()
    assert ("  fc8   classifier.6  weight 3x32, bias 3            initialised (kaiming): "
            "the weights' 3 classes are not this run's (other names or order)") in log
    assert "weights: 7 layers loaded, 1 initialised" in log
    state, src = load(out / "last.pth"), load(source)["model"]
    assert state["transfer"]["initialised"] == [HEAD]
    assert all(torch.equal(state["model"][k], src[k]) for k in keys_of(CONV + FC67))


# --------------------------------------------------------------------------- plain state_dicts


def _tiny_model_config(num_classes: int) -> ModelConfig:
    return ModelConfig(arch="custom", num_classes=num_classes, conv_widths=(8, 16, 16, 16, 16), fc_widths=(32, 32),
                       groups=2, init="kaiming")


@pytest.mark.parametrize("prefix, nested, source_classes", [
    ("module.", False, 3),  # DataParallel / DDP: the source has another class count, fc8 drawn fresh
    ("_orig_mod.", True, 2),  # torch.compile, under "state_dict": the same count and unknown names, fc8 loaded
])
def test_plain_state_dict_loads_by_name_and_shape(prefix, nested, source_classes, trees, capsys, tmp_path):
    torch.manual_seed(123)
    plain = build_model(_tiny_model_config(source_classes)).state_dict()
    saved = {prefix + k: v for k, v in plain.items()}
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": saved, "epoch": 7} if nested else saved, path)

    train, val = trees["new"]
    out = tmp_path / "OUT"
    log = train_ok(capsys, *train_args(train, val, out, f"model.weights={path}",
                                       "model.freeze=all_but_last")).splitlines()
    assert f"weights: {path} (plain state_dict)" in log
    start = log.index(LOADED_LINES[0])
    assert log[start:start + 7] == LOADED_LINES
    state = load(out / "last.pth")
    for key in keys_of(CONV + FC67):
        assert torch.equal(state["model"][key], plain[key]), key
    if source_classes == 2:
        assert "  fc8   classifier.6  weight 2x32, bias 2            loaded" in log
        assert "weights: 8 layers loaded, 0 initialised" in log
        assert state["transfer"]["initialised"] == []
        assert not torch.equal(state["model"][f"{HEAD}.weight"], plain[f"{HEAD}.weight"])  # trained from there
    else:
        assert FC8_NEW_COUNT in log and "weights: 7 layers loaded, 1 initialised" in log
        assert state["transfer"]["initialised"] == [HEAD]


def test_compiled_ddp_state_dict_prefixes_are_stripped_in_either_order(tmp_path):
    plain = build_model(_tiny_model_config(2)).state_dict()
    for prefix in ("module._orig_mod.", "_orig_mod.module."):
        path = tmp_path / f"{prefix.replace('.', '_')}.pth"
        torch.save({prefix + k: v for k, v in plain.items()}, path)
        assert sorted(read_source(str(path), print).state) == sorted(plain), prefix


# --------------------------------------------------------------------------- weights that do not fit


def test_a_conv_width_mismatch_exits_2_naming_the_layer_and_both_shapes(trees, source, tmp_path):
    train, val = trees["new"]
    out = tmp_path / "OUT"
    proc = run("alexnet-train", *train_args(train, val, out, f"model.weights={source}",
                                            "model.conv_widths=[8,16,24,16,16]"))
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert line == (f"alexnet-train: error: model.weights: {source}: layer conv3 (features.8.weight) is 16x16x3x3 "
                    f"in the weights but 24x16x3x3 in this model (arch custom)")
    assert not out.exists()


def test_a_missing_weights_file_exits_2_naming_it(trees, tmp_path):
    train, val = trees["new"]
    out = tmp_path / "OUT"
    missing = tmp_path / "nowhere" / "last.pth"
    proc = run("alexnet-train", *train_args(train, val, out, f"model.weights={missing}"))
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in one_error_line(proc.stderr)
    assert not out.exists()


def test_a_directory_or_a_damaged_file_as_weights_is_one_line_naming_model_weights(trees, tmp_path):
    train, val = trees["new"]
    out = tmp_path / "OUT"
    proc = run("alexnet-train", *train_args(train, val, out, f"model.weights={tmp_path}"))
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr) == f"alexnet-train: error: model.weights: {tmp_path}: is a directory, not a checkpoint file"
    damaged = tmp_path / "damaged.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:-200])  # a cut copy
    proc = run("alexnet-train", *train_args(train, val, out, f"model.weights={damaged}"))
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith(f"alexnet-train: error: model.weights: {damaged}: unreadable checkpoint"), line
    assert not out.exists()


# --------------------------------------------------------------------------- torchvision's weights, offline


@pytest.fixture(scope="module")
def planted_hub(tmp_path_factory):
    """(TORCH_HOME, the planted state_dict): random torchvision AlexNet tensors where torch hub caches the file."""
    home = tmp_path_factory.mktemp("torch-home")
    torch.manual_seed(321)
    import torchvision

    state = torchvision.models.alexnet(weights=None).state_dict()
    cached = home / "hub" / "checkpoints" / TV_FILE
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    yield home, state
    shutil.rmtree(home, ignore_errors=True)  # 244 MB


def _tv_args(train: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return train_args(train, val, out, "model.arch=torchvision", "model.groups=1", "model.weights=torchvision",
                      "data.batch_size=4", "train.keep_last=0", *extra)


def _env(**changes: str | None) -> dict:
    env = os.environ.copy()
    for key, value in changes.items():
        env.pop(key, None)
        if value is not None:
            env[key] = value
    return env


def test_torchvision_weights_load_from_the_torch_hub_cache(planted_hub, trees, tmp_path):
    home, planted = planted_hub
    train, val = trees["new"]
    out = tmp_path / "OUT"
    try:
        proc = run("alexnet-train", *_tv_args(train, val, out, "model.freeze=all_but_last"),
                   env=_env(TORCH_HOME=str(home)))
        assert proc.returncode == 0, proc.stderr
        log = proc.stdout.splitlines()
        assert f"weights: reading {home / 'hub' / 'checkpoints' / TV_FILE} (torch hub cache)" in log
        assert f"weights: torchvision AlexNet_Weights.IMAGENET1K_V1 ({TV_URL})" in log
        assert ("  fc8   classifier.6  weight 2x4096, bias 2          initialised (kaiming): "
                "the weights have 1000 classes, this run 2") in log
        assert "weights: 7 layers loaded, 1 initialised" in log
        assert "downloading" not in proc.stdout.lower() and "Downloading" not in proc.stderr

        state = load(out / "last.pth")
        loaded = ["features.0", "features.3", "features.6", "features.8", "features.10"] + FC67
        assert state["transfer"]["weights"] == "torchvision"
        assert state["transfer"]["loaded"] == loaded and state["transfer"]["initialised"] == [HEAD]
        for key in keys_of(loaded):
            assert torch.equal(state["model"][key], planted[key]), key
        assert state["model"][f"{HEAD}.weight"].shape == (2, 4096) and planted[f"{HEAD}.weight"].shape == (1000, 4096)
        assert_optimizer_state_only_for(state, keys_of([HEAD]))
    finally:
        shutil.rmtree(out, ignore_errors=True)  # two 228 MB checkpoints


def test_torchvision_weights_download_failure_exits_1_saying_where_to_put_the_file(trees, tmp_path):
    home = tmp_path / "empty-torch-home"
    home.mkdir()
    train, val = trees["new"]
    out = tmp_path / "OUT"
    with socket.socket() as sock:  # bound, never listening: every connection to it is refused
        sock.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = _env(TORCH_HOME=str(home), NO_PROXY=None, no_proxy=None,
                   **{var: proxy for var in PROXY_VARS[:4]}, ALL_PROXY=None, all_proxy=None)
        proc = run("alexnet-train", *_tv_args(train, val, out), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    cached = home / "hub" / "checkpoints" / TV_FILE
    errors = [line for line in proc.stderr.splitlines() if line.startswith("alexnet-train: error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    assert TV_URL in errors[0] and f"copy that file to {cached}" in errors[0]
    # The only other stderr line allowed is torch hub's own notice of the attempt.
    others = [line for line in proc.stderr.strip().splitlines() if line != errors[0]]
    assert all(line == f'Downloading: "{TV_URL}" to {cached}' for line in others), others
    assert not out.exists()
    leftovers = [p for p in home.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_torchvision_weights_need_the_torchvision_arch(trees, tmp_path):
    train, val = trees["new"]
    out = tmp_path / "OUT"
    proc = run("alexnet-train", *train_args(train, val, out, "model.weights=torchvision"))
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert "model.weights" in line and "model.arch=torchvision" in line and "arch is custom" in line
    assert not out.exists()


# --------------------------------------------------------------------------- resume


def test_a_resumed_finetune_is_exact_and_refuses_other_freeze_or_head_lr(trees, source, capsys, tmp_path):
    train, val = trees["new"]
    recipe = (f"model.weights={source}", "model.freeze=features", "optim.head_lr_mult=5")
    straight, resumed = tmp_path / "STRAIGHT", tmp_path / "RESUMED"
    train_ok(capsys, *train_args(train, val, straight, *recipe, epochs=2))
    train_ok(capsys, *train_args(train, val, resumed, *recipe, epochs=1))
    before = (resumed / "last.pth").read_bytes()

    # As real processes: in-process, a refused resume leaves OUT's lock held (see train_main's early exits).
    for change, key in (("optim.head_lr_mult=2", "optim.head_lr_mult"), ("model.freeze=none", "model.freeze")):
        proc = run("alexnet-train", *train_args(train, val, resumed, *recipe, change, epochs=2))
        assert proc.returncode == 2, proc.stderr
        line = one_error_line(proc.stderr)
        assert key in line and "the checkpoint was trained with" in line, line
        assert (resumed / "last.pth").read_bytes() == before
        assert [r["epoch"] for r in read_metrics(resumed)] == [1]

    # Changing model.weights is only a notice: the checkpoint's weights are used.
    log = train_ok(capsys, *train_args(train, val, resumed, *recipe, "model.weights=null", epochs=2))
    assert (f"notice: model.weights changed since the checkpoint: {str(source)!r} -> None; "
            "it applies to fresh runs only, the checkpoint's weights are used") in log
    assert f"resuming from {resumed / 'last.pth'}" in log and "epoch 2/2:" in log
    assert [r["epoch"] for r in read_metrics(resumed)] == [1, 2]

    a, b = load(straight / "last.pth"), load(resumed / "last.pth")
    assert sorted(a["model"]) == sorted(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), \
        [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert b["transfer"] == a["transfer"] and b["transfer"]["weights"] == str(source)
    src = load(source)["model"]
    assert all(torch.equal(b["model"][k], src[k]) for k in keys_of(CONV))
    # fc6/fc7 at the epoch's lr, fc8 in its own group(s) at 5x.
    base_lr = read_metrics(resumed)[-1]["lr"]
    lrs = {g["head"]: g["lr"] for g in b["optimizer"]["param_groups"]}
    assert lrs == {False: pytest.approx(base_lr), True: pytest.approx(5 * base_lr)}
    assert_optimizer_state_only_for(b, keys_of(FC67 + [HEAD]))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, key", [
    ("model.weights=", "model.weights"),
    ("model.weights=' '", "model.weights"),
    ("optim.head_lr_mult=0", "optim.head_lr_mult"),
    ("optim.head_lr_mult=-2", "optim.head_lr_mult"),
    ("model.freeze=convs", "model.freeze"),
    ("model.num_classes=0", "model.num_classes"),
])
def test_bad_transfer_settings_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO_CONFIG, [*TINY_MODEL, override])
    assert key in str(info.value), str(info.value)


def test_transfer_settings_defaults_and_null_class_count():
    cfg = load_config(DEMO_CONFIG, [*TINY_MODEL, "model.num_classes=null", "model.weights=runs/a/last.pth",
                                    "model.freeze=all_but_last", "optim.head_lr_mult=10"])
    assert cfg.model.num_classes is None and cfg.model.weights == "runs/a/last.pth"
    assert cfg.model.freeze == "all_but_last" and cfg.optim.head_lr_mult == 10.0
    default = load_config(DEMO_CONFIG, [])
    assert (default.model.weights, default.model.freeze, default.optim.head_lr_mult) == (None, "none", 1.0)
    with pytest.raises(ConfigError, match="model.arch=torchvision"):
        load_config(DEMO_CONFIG, ["model.weights=torchvision"])
    assert load_config(DEMO_CONFIG, ["model.arch=torchvision", "model.groups=1",
                                     "model.weights=torchvision"]).model.weights == "torchvision"


def test_a_two_process_ddp_finetune_keeps_frozen_layers_and_agrees_across_ranks(trees, source, tmp_path):
    """torchrun, gloo: every rank loads the weights; frozen convs stay the source's, fc8 is one model's."""
    train, val = trees["new"]
    out = tmp_path / "OUT"
    proc = subprocess.run([console_script("torchrun"), "--standalone", "--nproc_per_node", "2",
                           console_script("alexnet-train"),
                           *train_args(train, val, out, f"model.weights={source}", "model.freeze=features",
                                       "optim.head_lr_mult=5", "dist.mode=ddp")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("weights: 7 layers loaded, 1 initialised") == 1  # the log is rank 0's
    state, src = load(out / "last.pth"), load(source)["model"]
    for key in keys_of(CONV):
        assert torch.equal(state["model"][key], src[key]), key
    assert not any(torch.equal(state["model"][k], src[k]) for k in keys_of(FC67))
    assert_optimizer_state_only_for(state, keys_of(FC67 + [HEAD]))
    # both ranks trained one model: the val result of rank 0's checkpoint is the DDP run's
    rows = read_metrics(out)
    done = subprocess.run([console_script("alexnet-eval"), str(out / "last.pth"), "--device", "cpu",
                           "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "e.json").read_text())["center"]["top1"] == pytest.approx(rows[-1]["val_top1"])
