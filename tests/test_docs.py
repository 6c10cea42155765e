"""The README and docs/*.md: their links lead somewhere, and the commands they show are accepted.

(a) Every relative link and image target in README.md and docs/*.md exists, and
    an anchor (``page.md#heading``) names a heading of that page, slugged as
    GitHub does.
(b) Every command in a ```bash block (or a ```crontab block, after its five schedule
    fields) that runs one of this project's console scripts (by name or by a path to it,
    such as ``.venv/bin/alexnet-train``), ``python -m alexnet_train ...`` or ``torchrun ... -m alexnet_train
    ...`` (also after ``srun``, and the alexnet-train options given to
    ``sbatch scripts/slurm/train.sbatch``) is parsed by that command's own
    argparse parser: only parsed, never run (parse_known_args is intercepted
    once the whole command line is parsed).  ``--config`` must name a config of
    the repository and ``--set`` keys must be config keys (with their values
    type-checked where they are not ``...`` placeholders).  torchrun's own
    options go through torchrun's parser.  ``python scripts/X.py ...``: the
    script exists and every option shown is one its parser defines.

A bare ``...`` word stands for "more of the same" and is dropped; any other
placeholder must be written so that the parser accepts it, so a doc showing an
option the parser rejects fails here.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
import textwrap
import typing
from pathlib import Path

import pytest

from .conftest import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --------------------------------------------------------------------------- (a) links


def strip_code(text: str) -> str:
    """The text without fenced code blocks, inline code and HTML comments (links there are not links)."""
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(), flags=re.S | re.M)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


def links(path: Path) -> list[str]:
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", strip_code(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


LINKS = sorted({(doc, target) for doc in DOCS for target in links(doc)}, key=lambda x: (rel(x[0]), x[1]))


def test_every_page_has_links_to_check():
    assert (REPO / "README.md") in DOCS and len(DOCS) > 5
    assert any(t.startswith("docs/") for d, t in LINKS if d.name == "README.md")


@pytest.mark.parametrize("doc,target", LINKS, ids=[f"{rel(d)}->{t}" for d, t in LINKS])
def test_link_target_exists(doc, target):
    file, _, anchor = target.partition("#")
    dest = (doc.parent / file).resolve() if file else doc
    assert dest.exists(), f"{rel(doc)}: link to {target}: {file} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), (
            f"{rel(doc)}: link to {target}: no heading of {dest.name} has the anchor #{anchor} "
            f"(it has: {', '.join(sorted(anchors(dest)))})")


# --------------------------------------------------------------------------- (b) commands


def console_scripts() -> dict[str, str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = None
    text = (REPO / "pyproject.toml").read_text()
    if tomllib is not None:
        return dict(tomllib.loads(text)["project"]["scripts"])
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


SCRIPTS = console_scripts()
REDIRECT = re.compile(r"\s*\d*(?:>>|>&|&>|>|<)\s*[^\s;&|]+")
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
KEYWORDS = {"until", "while", "if", "then", "else", "do", "done", "fi", "!", "time", "exec"}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block, also one indented under a list item."""
    return [(lang, textwrap.dedent(body)) for lang, body in
            re.findall(r"^[ \t]*```(\w*)[ \t]*\n(.*?)^[ \t]*```", path.read_text(), flags=re.S | re.M)]


def crontab_command(line: str) -> str:
    """A crontab line's command: what follows its five schedule fields."""
    return line.split(None, 5)[5]


def bash_commands(path: Path) -> list[str]:
    """Each simple command of the file's ```bash and ```crontab blocks: continuations joined,
    comments and redirections gone."""
    commands = []
    blocks = [body.replace("\\\n", " ") for lang, body in code_blocks(path) if lang == "bash"]
    blocks += ["\n".join(crontab_command(line) for line in body.splitlines() if line.strip() and not
                         line.lstrip().startswith("#"))
               for lang, body in code_blocks(path) if lang == "crontab"]
    for block in blocks:
        for line in block.splitlines():
            lexer = shlex.shlex(REDIRECT.sub(" ", line), posix=True, punctuation_chars=";&|()")
            lexer.commenters = "#"
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token in SEPARATORS:
                    while words and (words[0] in KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
                        words.pop(0)  # `until ...`, `do ...`, and VAR=value before a command
                    if words:
                        commands.append(shlex.join(words))
                    words = []
                else:
                    words.append(token)
    return commands


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, extras: list[str]):
        super().__init__(parser.prog)
        self.parser, self.namespace, self.extras = parser, namespace, extras


@contextlib.contextmanager
def parse_only():
    """Make the first complete parse of a command line raise Parsed instead of returning: main() stops there."""
    original = argparse.ArgumentParser.parse_known_args
    depth = 0

    def parse_known_args(self, args=None, namespace=None):
        nonlocal depth
        depth += 1
        try:
            namespace, extras = original(self, args, namespace)
        finally:
            depth -= 1
        if depth == 0:  # not a subparser's parse inside the outer one
            raise Parsed(self, namespace, extras)
        return namespace, extras

    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def parse_with(main, argv: list[str], shown: str) -> argparse.Namespace:
    """argv through the argparse parser that ``main`` builds, without running the command."""
    stderr = io.StringIO()
    with parse_only(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except Parsed as parsed:
            assert not parsed.extras, f"{shown}\n  {parsed.parser.prog} does not accept: {' '.join(parsed.extras)}"
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"{shown}\n  rejected by its parser (exit {exc.code}): {stderr.getvalue().strip()}")
    pytest.fail(f"{shown}\n  {main.__module__}.{main.__name__} returned without parsing its command line")


def check_config_args(ns: argparse.Namespace, shown: str) -> None:
    """--config names a file of the repository; --set keys exist and their values have the key's type."""
    from alexnet_train.config import Config, ConfigError
    from alexnet_train.configload import load_config

    sections = typing.get_type_hints(Config)
    config = getattr(ns, "config", None)
    if config is not None:
        assert (REPO / config).is_file(), f"{shown}\n  --config {config}: no such file in the repository"
    checked = []
    for item in getattr(ns, "overrides", None) or []:
        key, eq, value = item.partition("=")
        assert eq, f"{shown}\n  --set {item}: not KEY=VALUE"
        section, _, field = key.partition(".")
        assert section in sections and field in typing.get_type_hints(sections[section]), (
            f"{shown}\n  --set {item}: {key} is not a config key")
        if "..." not in value:
            checked.append(item)
    try:
        load_config(REPO / config if config else None, checked)
    except ConfigError as exc:
        pytest.fail(f"{shown}\n  {exc}")


def script_options(script: Path) -> set[str]:
    """The option strings of every add_argument call in a script's source."""
    options = {"-h", "--help"}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return options


def check_command(command: str) -> str | None:
    """Check one shown command; returns what kind it was, or None when it is none of this project's."""
    from alexnet_train import __main__ as module_main
    from alexnet_train import cli

    words = [w for w in shlex.split(command) if w != "..."]
    if words[0] in ("srun", "sbatch"):
        starts = [i for i, w in enumerate(words) if w in SCRIPTS or w.endswith("train.sbatch")]
        if not starts:
            return None
        i = starts[0]
        if words[i].endswith("train.sbatch"):
            assert (REPO / words[i]).is_file(), f"{command}\n  {words[i]} does not exist"
            # train.sbatch runs `alexnet-train --set dist.mode=ddp data.workers=N "$@"`
            words = ["alexnet-train", "--set", "dist.mode=ddp", *words[i + 1:]]
        else:
            words = words[i:]
    name = words[0]
    if "/" in name and Path(name).name in SCRIPTS:  # a console script by its path: .venv/bin/alexnet-train
        name = words[0] = Path(name).name
    if name in SCRIPTS:
        target = SCRIPTS[name].split(":")[1]
        ns = parse_with(getattr(cli, target), words[1:], command)
        if name == "alexnet-train":
            check_config_args(ns, command)
        return name
    if Path(name).name.startswith("python") and words[1:3] == ["-m", "alexnet_train"]:
        ns = parse_with(module_main.main, words[3:], command)
        if not words[3:] or words[3] not in module_main.COMMANDS or words[3] == "train":
            check_config_args(ns, command)
        return "python -m alexnet_train"
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                launch = get_args_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{command}\n  torchrun rejects it: {err.getvalue().strip()}")
        assert launch.module and launch.training_script == "alexnet_train", f"{command}\n  not -m alexnet_train"
        argv = list(launch.training_script_args)
        ns = parse_with(module_main.main, argv, command)
        if not argv or argv[0] not in module_main.COMMANDS or argv[0] == "train":
            check_config_args(ns, command)
        return "torchrun"
    if Path(name).name.startswith("python") and len(words) > 1 and words[1].startswith("scripts/"):
        script = REPO / words[1]
        assert script.is_file(), f"{command}\n  {words[1]} does not exist"
        if script.suffix == ".py":
            known = script_options(script)
            shown = {w.split("=", 1)[0] for w in words[2:] if w.startswith("-") and not re.fullmatch(r"-\d.*", w)}
            assert shown <= known, f"{command}\n  {words[1]} has no option {', '.join(sorted(shown - known))}"
        return "script"
    if name.startswith("scripts/"):
        assert (REPO / name).is_file(), f"{command}\n  {name} does not exist"
        return "script"
    return None


COMMANDS = [(doc, c) for doc in DOCS for c in bash_commands(doc)]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_shown_command_parses(doc):
    checked = [kind for d, c in COMMANDS if d == doc and (kind := check_command(c)) is not None]
    if doc.name == "README.md":
        assert {"alexnet-data", "alexnet-prepare", "alexnet-train", "torchrun", "alexnet-eval"} <= set(checked)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_commands_are_shown_in_bash_blocks(doc):
    """A block of commands of this project outside ```bash would escape the check above (output is fine)."""
    ours = set(SCRIPTS) | {"torchrun", "python"}
    for lang, body in code_blocks(doc):
        first = next((line.split()[0] for line in body.splitlines() if line.split()), "")
        assert lang in ("bash", "crontab") or first not in ours, (
            f"{rel(doc)}: a ```{lang} block starts with {first}: make it ```bash")


def crontab_blocks() -> list[tuple[Path, str]]:
    return [(doc, line) for doc in DOCS for lang, body in code_blocks(doc) if lang == "crontab"
            for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_crontab_lines_are_lines_cron_runs_as_shown():
    """Five schedule fields, then a command with no ``%`` (cron turns an unescaped one into a
    newline), and one of ours, parsed above; the README shows one."""
    lines = crontab_blocks()
    assert any(doc.name == "README.md" for doc, _ in lines)
    for doc, line in lines:
        fields = line.split(None, 5)
        assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), f"{rel(doc)}: {line}"
        assert "%" not in fields[5], f"{rel(doc)}: cron cuts a command at %: {line}"
        assert check_command(bash_commands_of(fields[5])[0]) == "alexnet-train", f"{rel(doc)}: {line}"


def bash_commands_of(text: str) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.md"
        page.write_text(f"```bash\n{text}\n```\n")
        return [c for c in bash_commands(page) if not c.startswith("cd ")]


def test_the_checker_rejects_what_the_parsers_reject():
    """The check is not vacuous: an option no parser has, a bad --set, a missing script option all fail."""
    bad = [
        "alexnet-train --config configs/paper.yaml --epochs 3",
        "alexnet-train --config configs/paper.yaml --set optim.lr=fast",
        "alexnet-train --config configs/paper.yaml --set optim.learning_rate=0.1",
        "alexnet-train --config configs/nope.yaml",
        "alexnet-eval runs/paper/best.pth --tencrop",
        "alexnet-data ilsvrc /data/imagenet --val-layout sideways",
        "python -m alexnet_train eval --ten-crop",
        "torchrun --nproc_per_node 8 -m alexnet_train --config configs/paper.yaml --sett dist.mode=ddp",
        "python scripts/gpu_check.py --data d --budgt 300",
        "python scripts/no_such_script.py",
    ]
    for command in bad:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command(command)
    assert check_command("alexnet-train --config configs/paper.yaml --set optim.lr=0.02 data.train_dir=...") \
        == "alexnet-train"
    assert check_command("git clone x") is None


def test_bash_blocks_are_read_as_commands():
    page = REPO / "README.md"
    commands = bash_commands(page)
    assert any(c.startswith("alexnet-data ilsvrc /data/imagenet --train-tar") and "--devkit" in c for c in commands)
    assert not any("#" in c for c in commands if c.startswith("alexnet-")), "a comment was taken as arguments"
