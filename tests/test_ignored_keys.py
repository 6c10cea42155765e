"""Keys another setting leaves unread get one notice line at start, as the model keys an arch ignores do."""
from __future__ import annotations

from pathlib import Path

import pytest

from alexnet_train.configload import load_config
from alexnet_train.ignoredkeys import RULES, ignored_notices

from .conftest import CLASSES, DEMO_CONFIG, REPO, run_train, tiny_overrides, write_image_folder


def notices(*overrides: str) -> list[str]:
    return ignored_notices(load_config(None, list(overrides)))


@pytest.mark.parametrize("overrides, line", [
    (["schedule.kind=cosine", "schedule.patience=8"],
     "notice: schedule.patience=8 has no effect under schedule.kind: cosine (only plateau uses it)"),
    (["schedule.kind=step", "schedule.max_reductions=5"],
     "notice: schedule.max_reductions=5 has no effect under schedule.kind: step (only plateau uses it)"),
    (["schedule.kind=cosine", "schedule.factor=0.5"],
     "notice: schedule.factor=0.5 has no effect under schedule.kind: cosine (only plateau and step use it)"),
    (["schedule.step_size=20"],
     "notice: schedule.step_size=20 has no effect under schedule.kind: plateau (only step uses it)"),
    (["schedule.kind=step", "schedule.min_lr=0.001"],
     "notice: schedule.min_lr=0.001 has no effect under schedule.kind: step (only cosine uses it)"),
    (["data.augment=torchvision", "data.center_square=true"],
     "notice: data.center_square=true has no effect under data.augment: torchvision (only augment paper uses it)"),
    (["data.std=[50,50,50]"],
     "notice: data.std=[50, 50, 50] has no effect under data.normalize: paper "
     "(only normalize torchvision divides by it)"),
    (["data.pca_std=0", "data.eigval=[0.3,0.02,0.005]"],
     "notice: data.eigval=[0.3, 0.02, 0.005] has no effect under data.pca_std: 0 (the PCA colour noise is off)"),
    (["data.max_bad_fraction=0.01"],
     "notice: data.max_bad_fraction=0.01 has no effect under data.on_bad_image: error "
     "(only on_bad_image skip uses it)"),
    (["data.demo_cache=/tmp/x"],
     "notice: data.demo_cache=/tmp/x has no effect under data.demo: false "
     "(only a demo run that fills in a folder uses it)"),
    (["model.towers=split"],
     "notice: model.towers=split has no effect under model.groups: 1 (only groups > 1 has towers)"),
    (["optim.weight_decay=0", "optim.decay_biases=false"],
     "notice: optim.decay_biases=false has no effect under optim.weight_decay: 0 (nothing decays)"),
    (["train.compile_mode=max-autotune"],
     "notice: train.compile_mode=max-autotune has no effect under train.compile: false "
     "(only a compiled model uses it)"),
    (["train.device=cuda", "train.threads=4"],
     "notice: train.threads=4 has no effect under train.device: cuda (only a CPU run sets torch's threads)"),
    (["train.device=cpu", "train.tf32=false"],
     "notice: train.tf32=false has no effect under train.device: cpu (TF32 is a CUDA setting)"),
    (["dist.backend=gloo"],
     "notice: dist.backend=gloo has no effect under dist.mode: none (only ddp has a process group)"),
])
def test_a_key_another_setting_leaves_unread_gets_one_notice(overrides, line):
    assert notices(*overrides) == [line]


@pytest.mark.parametrize("overrides", [
    ["schedule.kind=plateau", "schedule.patience=8", "schedule.factor=0.5"],   # used
    ["schedule.kind=cosine", "schedule.patience=5", "schedule.factor=0.1"],    # unused but left at the defaults
    ["schedule.kind=step", "schedule.step_size=20", "schedule.factor=0.5"],
    ["data.augment=torchvision", "data.pca_std=0.2"],     # the colour noise works under either augment
    ["optim.head_lr_mult=10"],                            # fc8's lr multiplier works without model.weights too
    ["model.groups=2", "model.towers=split"],
    ["dist.mode=ddp", "dist.backend=gloo", "dist.timeout_minutes=2"],
    ["data.on_bad_image=skip", "data.max_bad_fraction=0.01"],
    ["data.demo=true", "data.demo_cache=/tmp/x"],
    ["train.compile=true", "train.compile_mode=reduce-overhead"],
])
def test_keys_in_use_or_at_their_defaults_are_quiet(overrides):
    assert notices(*overrides) == []


def test_several_ignored_keys_each_get_a_line_after_the_models():
    lines = notices("model.arch=torchvision", "model.groups=2", "schedule.kind=cosine", "schedule.patience=3",
                    "schedule.threshold=0.5", "dist.timeout_minutes=2")
    assert lines == [
        "notice: model.groups is ignored: model.arch=torchvision does not use it (only paper and custom do)",
        "notice: schedule.patience=3 has no effect under schedule.kind: cosine (only plateau uses it)",
        "notice: schedule.threshold=0.5 has no effect under schedule.kind: cosine (only plateau uses it)",
        "notice: dist.timeout_minutes=2 has no effect under dist.mode: none (only ddp has a process group)",
    ]


def test_every_rule_names_real_keys():
    from alexnet_train.config import SECTIONS

    for rule in RULES:
        for key in rule.keys:
            section, name = key.split(".")
            assert name in {f for f in SECTIONS[section].__dataclass_fields__}, key


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_ignore_nothing(path):
    assert ignored_notices(load_config(str(path), [])) == []


def test_val_labels_beside_a_val_of_shards(tmp_path):
    """data.val_labels with val_dir an ImageFolder is read (and checked); with shards it is not: a notice."""
    from alexnet_train.data.shardwriter import write_shards

    val = write_image_folder(tmp_path / "val", CLASSES, 2, seed=2)
    shards = tmp_path / "wds"
    write_shards(val, shards, size=64, log=lambda _m: None)
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"{p.name} {p.parent.name}\n" for p in sorted(val.glob("*/*.JPEG"))))
    assert notices(f"data.val_dir={val}", f"data.val_labels={labels}") == []
    assert notices(f"data.val_dir={shards}", f"data.val_labels={labels}") == [
        f"notice: data.val_labels={labels} has no effect under data.val_dir: {shards} "
        "(WebDataset shards carry their own labels)"]


@pytest.mark.slow
def test_a_real_run_prints_the_notice_once_at_start(image_tree, tmp_path, capsys):
    train, val, classes = image_tree
    code = run_train(["--config", DEMO_CONFIG, "--set", *tiny_overrides(train, val, len(classes), epochs=1), "schedule.kind=cosine",
                      "schedule.patience=8", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    line = "notice: schedule.patience=8 has no effect under schedule.kind: cosine (only plateau uses it)"
    assert out.count(line) == 1
    assert out.index(line) < out.index("device: ")  # at start, with the model keys' notices
