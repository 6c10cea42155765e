"""docs/scaling.md keeps its own rules: every training line it prints divides its global batch
evenly among its GPUs, gives paper.yaml the linear lr rule (0.01 x batch / 128) with a 5-epoch
warmup above 128, says it has not run on 2 or more GPUs where it uses them, and agrees with the
page's table; the page's --print-config line runs and prints those values."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from alexnet_train.configload import load_config

from .conftest import REPO
from .test_docs import bash_commands, code_blocks

PAGE = REPO / "docs" / "scaling.md"
NOT_RUN = "NOT RUN YET on 2 or more GPUs"
SBATCH_DEFAULTS = {"--nodes": 1, "--ntasks-per-node": 8, "--gpus-per-node": 8}  # train.sbatch's #SBATCH lines


def launch(command: str) -> tuple[int, list[str]] | None:
    """(GPUs, alexnet-train's argv) of a training line; None for any other line."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(words[1:])
        nodes = int(str(args.nnodes).split(":")[-1])  # --standalone's default is "1:1"
        return nodes * int(args.nproc_per_node), list(args.training_script_args)
    if words[0] == "sbatch":
        at = next(i for i, w in enumerate(words) if w.endswith("train.sbatch"))
        opts = dict(SBATCH_DEFAULTS)
        for name, value in zip(words[1:at:2], words[2:at:2]):
            opts[name] = int(value)
        assert opts["--ntasks-per-node"] == opts["--gpus-per-node"], f"{command}: one task per GPU"
        return opts["--nodes"] * opts["--gpus-per-node"], ["--set", "dist.mode=ddp", *words[at + 1:]]
    if words[0] == "alexnet-train" and "--print-config" not in words:
        return 1, words[1:]
    return None


def resolved(argv: list[str]):
    config = argv[argv.index("--config") + 1]
    overrides = [w for w in argv[argv.index("--set") + 1:] if "=" in w and not w.startswith("-")]
    return config, load_config(REPO / config, overrides)


LINES = [(c, found) for c in bash_commands(PAGE) if (found := launch(c)) is not None]


def test_the_page_prints_a_line_for_1_4_8_and_16_gpus():
    gpus = {n for _, (n, _) in LINES}
    assert {1, 4, 8, 16} <= gpus
    assert any(c.startswith("torchrun") for c, _ in LINES) and any(c.startswith("sbatch") for c, _ in LINES)


@pytest.mark.parametrize("command,found", LINES, ids=[c[:60] for c, _ in LINES])
def test_each_line_splits_its_batch_evenly_and_follows_the_lr_rule(command, found):
    gpus, argv = found
    config, cfg = resolved(argv)
    assert cfg.data.batch_size % gpus == 0, f"{command}: {cfg.data.batch_size} over {gpus} GPUs"
    if gpus > 1:
        assert cfg.dist.mode == "ddp", command
    if config == "configs/paper.yaml":
        assert cfg.optim.lr == pytest.approx(0.01 * cfg.data.batch_size / 128), command
        assert cfg.schedule.warmup_epochs == (5 if cfg.data.batch_size > 128 else 0), command


def test_every_multi_gpu_line_says_it_has_not_run():
    for lang, body in code_blocks(PAGE):
        if lang != "bash":
            continue
        comment = ""
        for line in body.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                comment = line
                continue
            found = launch(line) if line.strip() else None
            if found and found[0] > 1:
                assert NOT_RUN in comment, f"{line}\n  no '# {NOT_RUN}' comment above it"
            if line.strip():
                comment = ""


def test_the_table_follows_the_rule_and_the_lines():
    rows = re.findall(r"^\| (1|4|8|2 × 8) \| `(\w+)\.yaml`[^|]*\| (\d+) \| (\d+) \| ([\d.]+) \| (\d+) \|",
                      PAGE.read_text(), flags=re.M)
    assert len(rows) == 5
    shown = {(n, resolved(argv)[0], resolved(argv)[1].data.batch_size, round(resolved(argv)[1].optim.lr, 6))
             for _, (n, argv) in LINES}
    for gpus, config, batch, per_gpu, lr, warmup in rows:
        n = 16 if gpus == "2 × 8" else int(gpus)
        assert int(batch) == n * int(per_gpu)
        if config == "paper":
            assert float(lr) == pytest.approx(0.01 * int(batch) / 128)
            assert int(warmup) == (5 if int(batch) > 128 else 0)
        assert (n, f"configs/{config}.yaml", int(batch), round(float(lr), 6)) in shown, (gpus, config)


def test_the_print_config_line_runs_and_prints_the_8_gpu_values(capsys):
    from alexnet_train.cli import train_main

    line = next(c for c in bash_commands(PAGE) if "--print-config" in c)
    train_main(shlex.split(line)[1:])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["batch_size"] == 1024
    assert printed["optim"]["lr"] == pytest.approx(0.08)
    assert printed["schedule"]["warmup_epochs"] == 5
