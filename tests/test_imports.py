"""The package's imports: no import circle, and no arrow from a lower layer back up to a higher
one (the layers: LAYERS below; the house rules: docs/development.md, "What holds it together").

Every module under alexnet_train/ is parsed (not imported) and each of its imports of the package
is an arrow: ``import alexnet_train.x``, ``from .x import y`` and ``from . import x`` at any depth,
also those inside functions, which a lazy import does not exempt.  A package's ``__init__`` counts
where it is named (``from alexnet_train.data import ...``), not as the parent every submodule
import runs first.
"""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = "alexnet_train"

# Top to bottom: a module may import its own layer and those below it, never one above.
# Modules not named here are the components the Trainer and the programs put together.
LAYERS = {
    "entry points": ["__main__", "cli"],            # the only reader of argv; nothing below imports cli
    "programs": ["lifecycle", "evalrun"],           # between cli and train; alexnet-eval's program beside lifecycle
    "the loop": ["train"],                          # the step and epoch loops: the Trainer orchestrates
    "components": [],                               # evaluate, data/, model, checkpoint, tracking, ...: the rest
    "config": ["config", "configload"],             # the sections, and reading them (configload -> config only)
    "ground": ["errors", ""],                       # every error a user can see; the package's face (__version__)
}
DEFAULT_LAYER = "components"


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_arrows(root: Path, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {module of the package it imports: line of the first such import}}."""
    modules = package_modules(root, package)

    def known(name: str) -> str:
        # the module a dotted name lands in: itself, or the package or module that holds the name
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        assert name in modules, f"an import of {name!r}, which is no module of {package}"
        return name

    arrows: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        found: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    assert node.level - 1 < len(base), f"{path}:{node.lineno}: a relative import above {package}"
                    base = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # from PKG import sub: the submodule itself; from MOD import name: the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    found.setdefault(known(target), node.lineno)
        arrows[name] = found
    return arrows


def circles(arrows: dict[str, dict[str, int]]) -> list[list[str]]:
    """One loop through each group of modules that import each other (Tarjan's strongly connected
    components), as [a, b, ..., a]; a module that imports itself is a loop of one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(arrows.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in arrows.get(v, {}):
                groups.append(sorted(group))

    for v in sorted(arrows):
        if v not in index:
            visit(v)
    return [loop_through(group, arrows) for group in groups]


def loop_through(group: list[str], arrows: dict[str, dict[str, int]]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start, inside = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(arrows[v]):
                if w == start:
                    return paths[v] + [start]
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop through {group}")


def described(loop: list[str], arrows: dict[str, dict[str, int]], modules: dict[str, Path], root: Path) -> str:
    steps = [f"{modules[a].relative_to(root)}:{arrows[a][b]} imports {b}" for a, b in zip(loop, loop[1:])]
    return " -> ".join(loop) + "  (" + "; ".join(steps) + ")"


def layer_of(module: str) -> str:
    short = module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else ""
    for layer, names in LAYERS.items():
        if short in names:
            return layer
    return DEFAULT_LAYER


def arrows_back_up(arrows: dict[str, dict[str, int]], modules: dict[str, Path], root: Path) -> list[str]:
    order = list(LAYERS)
    return [f"{modules[a].relative_to(root)}:{line} ({layer_of(a)}) imports {b} ({layer_of(b)})"
            for a, targets in sorted(arrows.items()) for b, line in sorted(targets.items())
            if order.index(layer_of(b)) < order.index(layer_of(a))]


def test_the_package_has_no_import_circle():
    arrows, modules = import_arrows(REPO), package_modules(REPO)
    found = [described(loop, arrows, modules, REPO) for loop in circles(arrows)]
    assert not found, "import circles:\n" + "\n".join(found)


def test_no_import_runs_from_a_lower_layer_back_up():
    found = arrows_back_up(import_arrows(REPO), package_modules(REPO), REPO)
    assert not found, "imports of a higher layer by a lower one:\n" + "\n".join(found)


def test_only_main_imports_cli_and_only_the_programs_import_lifecycle_and_evalrun():
    importers = {}
    for module, targets in import_arrows(REPO).items():
        for target in targets:
            importers.setdefault(target, set()).add(module.removeprefix(PACKAGE + "."))
    assert importers[f"{PACKAGE}.cli"] == {"__main__"}
    assert importers[f"{PACKAGE}.evalrun"] == {"cli"}
    assert importers[f"{PACKAGE}.lifecycle"] <= {"cli", "evalrun"}
    assert importers[f"{PACKAGE}.train"] <= {"lifecycle"}


def test_evaluate_and_data_import_no_program_and_not_the_loop():
    # evaluate.py is the library that the Trainer and alexnet-eval's program both call;
    # data/ builders take the sub-config they need and know nothing of who calls them.
    above = {f"{PACKAGE}.{name}" for layer in ("entry points", "programs", "the loop") for name in LAYERS[layer]}
    arrows = import_arrows(REPO)
    for module, targets in arrows.items():
        if module == f"{PACKAGE}.evaluate" or module.startswith(f"{PACKAGE}.data"):
            assert not above & set(targets), f"{module} imports {sorted(above & set(targets))}"
    assert {f"{PACKAGE}.evaluate", f"{PACKAGE}.data.loaders"} <= set(arrows[f"{PACKAGE}.train"])


def test_only_tracking_writes_tensorboard_and_only_checkpoint_calls_torch_save_and_load():
    for module, path in package_modules(REPO).items():
        tree = ast.parse(path.read_text())
        named = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        named += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        if any("tensorboard" in name for name in named):
            assert module == f"{PACKAGE}.tracking", f"{path.relative_to(REPO)} imports TensorBoard"
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("save", "load")
                 and isinstance(n.value, ast.Name) and n.value.id == "torch"]
        if calls:
            where = f"{path.relative_to(REPO)}:{calls[0].lineno}"
            assert module == f"{PACKAGE}.checkpoint", f"{where} calls torch.{calls[0].attr}"


def test_every_module_the_layers_name_exists():
    modules = package_modules(REPO)
    for layer, names in LAYERS.items():
        for name in names:
            assert (f"{PACKAGE}.{name}" if name else PACKAGE) in modules, f"LAYERS[{layer!r}] names {name!r}"


def test_the_walk_sees_relative_and_function_level_imports_and_names_the_circle(tmp_path):
    """The walker itself, on a real package written here: the one loop runs through an import
    inside a function and a ``from .. import`` of a submodule."""
    pkg = tmp_path / "house"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\nfrom .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def late():\n    from ..c import thing\n    return thing\n")
    (pkg / "c.py").write_text("import house.a as a\nthing = 1\n")
    (pkg / "d.py").write_text("from .c import thing\nfrom house import c\n")
    arrows = import_arrows(tmp_path, "house")
    assert arrows == {"house": {}, "house.a": {"house.sub.b": 3}, "house.sub": {}, "house.sub.b": {"house.c": 2},
                      "house.c": {"house.a": 1}, "house.d": {"house.c": 1}}
    loops = circles(arrows)
    assert loops == [["house.a", "house.sub.b", "house.c", "house.a"]]
    text = described(loops[0], arrows, package_modules(tmp_path, "house"), tmp_path)
    assert "house/sub/b.py:2 imports house.c" in text and "house/c.py:1 imports house.a" in text
    (pkg / "c.py").write_text("thing = 1\n")
    assert circles(import_arrows(tmp_path, "house")) == []

