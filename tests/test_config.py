"""Config loading, --set overrides, validation, and every shipped YAML."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_train.config import (
    Config,
    ConfigError,
    replace,
)
from alexnet_train.configload import (
    config_from_dict,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override,
)
from alexnet_train.model import build_model
from alexnet_train.schedule import LrPolicy

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 5e-4)
    assert cfg.data.batch_size == 128 and cfg.data.crop_size == 224 and cfg.data.resize_size == 256
    assert cfg.schedule.kind == "plateau" and cfg.schedule.factor == 0.1 and cfg.schedule.max_reductions == 3
    assert cfg.model.init == "caffe" and cfg.data.normalize == "paper"  # as configs/paper.yaml


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shipped_configs_cover_the_three_recipes():
    names = {p.name for p in CONFIGS}
    assert {"paper.yaml", "paper-literal.yaml", "torchvision.yaml", "demo.yaml"} <= names
    paper = load_config(CONFIGS[0].parent / "paper.yaml")
    assert paper.model.arch == "paper" and paper.model.groups == 2
    assert paper.model.init == "caffe" and paper.data.normalize == "paper"  # measured: see init_study.py
    assert paper.data.batch_size == 128 and paper.train.epochs == 90 and paper.schedule.kind == "plateau"
    # paper-literal.yaml is paper.yaml with the paper's own init, nothing else changed
    literal = load_config(CONFIGS[0].parent / "paper-literal.yaml")
    assert literal.model.init == "paper"
    assert replace(replace(literal, "model", init="caffe"), "train", out_dir=paper.train.out_dir) == paper
    tv = load_config(CONFIGS[0].parent / "torchvision.yaml")
    assert tv.model.arch == "torchvision" and tv.data.normalize == "torchvision" and tv.optim.weight_decay == 1e-4


def test_set_overrides_are_yaml_scalars_checked_against_the_field_type():
    cfg = load_config(None, ["optim.lr=5e-4", "model.groups=2", "data.mean=[1, 2, 3]", "train.device=cpu",
                             "data.val_labels=null"])
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.model.groups == 2
    assert cfg.data.mean == (1.0, 2.0, 3.0)
    assert cfg.data.val_labels is None
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # int is a valid float


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lrr=1", ["optim.lrr", "valid keys in optim", "weight_decay"]),
        ("optim.lr=abc", ["optim.lr", "expected float", "'abc'"]),
        ("data.batch_size=1.5", ["data.batch_size", "expected int"]),
        ("data.hflip=maybe", ["data.hflip", "expected bool"]),
        ("model.arch=vgg", ["model.arch", "'paper'", "'vgg'"]),
        ("nosection.x=1", ["unknown section 'nosection'"]),
        ("optim.lr", ["expected KEY=VALUE"]),
        ("lr=0.1", ["SECTION.NAME"]),
    ],
)
def test_bad_override_names_the_key(override: str, fragments: list[str]):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.groups=3"], "model.groups"),
        (["model.arch=custom", "model.conv_widths=[8, 16, 16, 16, 15]", "model.groups=2"], "model.groups"),
        (["schedule.patience=0"], "schedule.patience"),
        (["data.crop_size=300"], "data.crop_size"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.momentum=1.5"], "optim.momentum"),
        (["schedule.factor=2"], "schedule.factor"),
        (["train.epochs=0"], "train.epochs"),
        (["model.arch=custom", "model.conv_widths=[1, 2, 3]"], "model.conv_widths"),
        (["data.mean=[1, 2]"], "data.mean"),
    ],
)
def test_inconsistent_values_are_rejected_naming_the_key(overrides: list[str], key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_yaml_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML at line"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'optim.learning_rate'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_include_merges_underneath(tmp_path: Path):
    (tmp_path / "stats.yaml").write_text("data:\n  mean: [100, 110, 120]\n  batch_size: 64\n")
    main = tmp_path / "main.yaml"
    main.write_text("include: stats.yaml\ndata:\n  batch_size: 32\n")
    cfg = load_config(main)
    assert cfg.data.mean == (100.0, 110.0, 120.0)
    assert cfg.data.batch_size == 32  # the including file wins


@pytest.mark.parametrize("arch, overrides, ignored", [
    ("paper", ["model.conv_widths=[8, 16, 16, 16, 16]", "model.lrn=false", "model.groups=2"], ["model.conv_widths",
                                                                                               "model.lrn"]),
    ("torchvision", ["model.groups=2"], ["model.groups"]),
    ("torchvision", ["model.groups=3", "model.fc_widths=[64, 64]"], ["model.groups", "model.fc_widths"]),
    ("custom", ["model.groups=2", "model.lrn=false"], []),
])
def test_one_rule_for_arch_specific_keys_ignored_with_a_notice(arch, overrides, ignored):
    """groups was refused for torchvision while the custom-only keys were ignored: now an arch
    that does not use a key ignores it, with a notice naming the key and the archs that use it."""
    cfg = load_config(None, [f"model.arch={arch}", *overrides])
    assert cfg.model.ignored_keys() == ignored
    notices = cfg.model.ignored_notices()
    assert len(notices) == len(ignored)
    for key, notice in zip(ignored, notices):
        assert notice.startswith(f"notice: {key} is ignored: model.arch={arch} does not use it (only ")
    if arch == "torchvision":
        assert "(only paper and custom do)" in notices[0]
        assert cfg.model.effective_groups == 1
        model = build_model(replace(cfg, "model", num_classes=10).model)
        assert all(m.groups == 1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_schedule_patience_counts_bad_epochs_and_0_is_refused_saying_what_it_means():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["schedule.patience=0"])
    assert str(info.value) == (
        "config with --set: schedule.patience: must be >= 1, got 0: it counts the epochs in a row without "
        "improvement before lr is cut (PyTorch's ReduceLROnPlateau(patience=N) is our N + 1, so its 0 is our 1)")
    # Our patience 1 cuts after the first bad epoch, as PyTorch's patience 0 does.
    ours = LrPolicy(load_config(None, ["schedule.patience=1"]).schedule, 0.01, 90)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=0, factor=0.1, threshold=0.0,
                                                        threshold_mode="abs")
    for error in (50.0, 40.0, 45.0, 39.0, 39.0, 39.5, 30.0):
        ours.epoch_end(error)
        theirs.step(error)
        assert ours.lr == pytest.approx(opt.param_groups[0]["lr"]), error


def test_custom_keys_are_reported_not_applied_for_fixed_archs():
    cfg = load_config(None, ["model.conv_widths=[8, 16, 16, 16, 16]"])
    assert cfg.model.arch == "paper"
    assert cfg.model.ignored_keys() == ["model.conv_widths"]
    assert cfg.model.widths()[0] == (96, 256, 384, 384, 256)
    custom = load_config(None, ["model.arch=custom", "model.conv_widths=[8, 16, 16, 16, 16]"])
    assert custom.model.ignored_keys() == [] and custom.model.widths()[0] == (8, 16, 16, 16, 16)


def test_dump_yaml_reloads_to_the_same_config(tmp_path: Path):
    cfg = load_config(None, ["optim.lr=0.02", "data.train_dir=/x/train"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_parse_override_splits_key_and_value():
    assert parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    assert parse_override("data.train_dir=/a=b") == (["data", "train_dir"], "/a=b")
