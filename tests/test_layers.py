"""The package's import graph, read with ast (nothing is imported): no circle, no import of the top-level
``callbacks`` package (the callbacks import the library, not the other way round), and every import of a module
points to its own layer or a lower one. Lazy imports inside functions count too: they run sooner or later."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "caq_lightning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first; a module belongs to the layer of its longest listed prefix ("" is the package's own __init__).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "env", "outputs", "progress", "data_sources")),  # progress of long waits; public data sets
    ("models", ("models",)),  # the layout of each family, as data
    ("quant", ("quant",)),  # quantizers, transforms, Hadamards, the attention hook, Mode
    ("runtime", ("runtime",)),  # what stays online after folding: packing, integer Linear and KV cache, attach
    ("eval", ("eval",)),  # metrics and the refusal judge: functions of a model's outputs, used by the zoo too
    ("sources", ("gguf", "zoo", "loading")),  # where models come from; loading asks the zoo for builtin: names
    ("calibrate", ("config", "losses", "targets", "student", "fold", "module", "data", "checkpoint", "distributed")),
    ("export", ("export",)),
    ("cli", ("cli", "evaluate", "fit_progress", "")),
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name (``caq_lightning.quant.mode``; a package by its own name) -> file, for every module."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The names ``name`` imports anywhere in its file: modules of ``known``, and any other top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {base})
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it runs on import, parent packages included (importing ``a.b.c`` runs
    ``a.b``'s __init__ unless the importer lives in ``a.b`` itself)."""
    files = module_files(root)
    known = set(files)
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for target in imported(name, path, known) & known:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                parent = ".".join(parts[:i])
                if not name.startswith(parent + ".") or parent == target:
                    targets.add(parent)
        edges[name] = targets - {name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def layer_of(name: str) -> int:
    """The index in LAYERS of a module's layer (its longest listed prefix)."""
    relative = name.partition(".")[2]
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = relative == prefix or relative.startswith(prefix + ".") or (prefix == "" and relative == "")
            if matches and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for name, targets in edges.items()
        for target in targets
        if layer_of(target) > layer_of(name)
    )


def callbacks_imports(root: Path = ROOT) -> list[str]:
    files = module_files(root)
    return sorted(
        f"{name} -> {target}"
        for name, path in files.items()
        for target in imported(name, path, set(files))
        if target.split(".")[0] == "callbacks"
    )


def test_the_package_has_no_import_circle():
    assert circles(graph()) == []


def test_the_library_never_imports_the_callbacks_package():
    assert callbacks_imports() == []


def test_every_import_points_down_the_layers():
    edges = graph()
    for name in edges:
        layer_of(name)  # every module has a layer
    assert upward(edges) == []


@pytest.mark.parametrize(
    "source,expected",
    [
        ("from caq_lightning.quant import hadamard\nfrom . import mode\n", {"caq_lightning.quant.hadamard", "x.y.mode"}),
        ("def f():\n    import callbacks.progress\n", {"callbacks.progress"}),
    ],
)
def test_imports_are_read_from_every_form(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    known = {"caq_lightning.quant.hadamard", "x.y.mode"}
    assert imported("x.y.m", path, known) == expected


def test_a_circle_and_an_upward_import_are_found():
    edges = {"caq_lightning.quant.a": {"caq_lightning.module"}, "caq_lightning.module": {"caq_lightning.quant.a"}}
    assert circles(edges) == [["caq_lightning.module", "caq_lightning.quant.a"]]
    assert upward(edges) == ["caq_lightning.quant.a (quant) -> caq_lightning.module (calibrate)"]
