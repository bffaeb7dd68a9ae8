"""walrus's import graph keeps to the layer order that docs/DESIGN.md states: no cycle between
packages, no import up the layers (type-only imports count: a type from above is a dependency too)."""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "walrus"


def layer_order() -> list[list[str]]:
    """DESIGN.md's "Layer order" block: one line per layer, lowest first, units separated by spaces."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    block = re.search(r"<!-- layer order, lowest first -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/DESIGN.md lost its layer order block"
    return [line.split("#")[0].split() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def unit_of(module: str) -> str:
    """The unit a module belongs to: walrus.X for walrus/X/... and walrus/X.py alike."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else "walrus"


def imports() -> dict[str, set[str]]:
    """module -> the walrus modules it imports, anywhere in its body."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                # a compiled module (walrus._uring._liburing) is no .py file: it counts as its package
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name and target != "walrus":
                    graph[name].add(target)
    return graph


def unit_edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, an example module edge) between different units."""
    edges = {}
    for module, targets in imports().items():
        for target in targets:
            a, b = unit_of(module), unit_of(target)
            if a != b and a != "walrus" and b != "walrus":
                edges.setdefault((a, b), f"{module} -> {target}")
    return {(a, b, example) for (a, b), example in edges.items()}


def test_every_unit_has_a_layer():
    placed = {unit for layer in layer_order() for unit in layer}
    found = {unit_of(m) for m in imports()} | {p.stem if p.suffix else p.name for p in PACKAGE.iterdir()
                                               if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())}
    found -= {"__init__", "__main__", "walrus"}
    assert found - placed == set(), "add these to the layer order in docs/DESIGN.md"
    assert placed - found == set(), "the layer order names units that do not exist"


def test_imports_only_point_down():
    level = {unit: i for i, layer in enumerate(layer_order()) for unit in layer}
    upward = sorted(f"{example} ({a} is in layer {level[a]}, {b} in layer {level[b]})"
                    for a, b, example in unit_edges() if level.get(b, -1) >= level.get(a, -1))
    assert upward == []


def test_the_checker_sees_an_upward_import():
    # the check itself, on a known edge: an engine importing storage is down, the reverse would be up
    level = {unit: i for i, layer in enumerate(layer_order()) for unit in layer}
    assert ("backup", "storage") in {(a, b) for a, b, _ in unit_edges()}
    assert level["storage"] < level["backup"]
