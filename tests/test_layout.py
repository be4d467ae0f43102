"""The package's import graph: no cycles, no arrow from a lower layer up into a higher one, and no
torch.distributed in library code (docs/design.md §2).

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency. ``python tests/test_layout.py`` prints the graph (module -> the sdfm modules it imports)
and the problems, and exits 1 if there are any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    ("sdfm.errors", "sdfm.config", "sdfm.monitor", "sdfm.plots", "sdfm.solvers", "sdfm.amp", "sdfm.pot", "sdfm.memory", "sdfm.signals"),
    ("sdfm.kernels", "sdfm.data", "sdfm.models", "sdfm.metrics", "sdfm.checkpoint", "sdfm.rundir"),
    ("sdfm.ot",),
    ("sdfm.couplings", "sdfm.semidiscrete"),
    ("sdfm.methods",),
    ("sdfm.distributed",),
    ("sdfm.pairing",),
    ("sdfm.trainer", "sdfm.worker", "sdfm.evaluate", "sdfm.potential_sources"),
    ("sdfm.bench", "sdfm.cli", "sdfm.train", "sdfm.__main__"),
    ("sdfm",),  # the package top: the public API, re-exported from every layer
]
"""From the bottom up; a module may import its own layer or lower ones (longest prefix decides)."""

LIBRARY = (
    "sdfm.ot", "sdfm.couplings", "sdfm.semidiscrete", "sdfm.methods", "sdfm.data", "sdfm.models", "sdfm.metrics",
)  # fmt: skip
"""Single-device code: never imports torch.distributed."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``sdfm.kernels`` lives in the top-level kernels/)."""
    found = {}
    for base, prefix in ((ROOT / "sdfm", "sdfm"), (ROOT / "kernels", "sdfm.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The names a module imports (sdfm modules resolved to the longest known module name)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("sdfm"):
                out.add(target)
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> int:
    """The layer of a module: that of the longest entry of LAYERS it is or lies under ('sdfm' itself
    only names the package's own __init__)."""
    best, rank = "", -1
    for i, members in enumerate(LAYERS):
        for m in members:
            inside = name == m or (m != "sdfm" and name.startswith(m + "."))
            if inside and len(m) > len(best):
                best, rank = m, i
    return rank


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def problems(edges: dict[str, set[str]]) -> list[str]:
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for src, targets in sorted(edges.items()):
        for dst in sorted(t for t in targets if t in edges):
            if layer(src) < layer(dst):
                found.append(f"upward arrow: {src} (layer {layer(src)}) -> {dst} (layer {layer(dst)})")
        if src.startswith(LIBRARY) and any(t.startswith("torch.distributed") for t in targets):
            found.append(f"library code imports torch.distributed: {src}")
    return found


def test_every_module_has_a_layer():
    unplaced = [name for name in graph() if layer(name) < 0]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_cycles_no_upward_arrows_no_distributed_in_the_library():
    assert problems(graph()) == []


def test_the_trainer_does_not_import_the_cli():
    edges = graph()
    assert "sdfm.cli" not in edges["sdfm.trainer"]
    assert not any(t.startswith("sdfm.distributed") for t in edges["sdfm.couplings"])


def test_pyproject_lists_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert listed == packages, f"pyproject.toml [tool.setuptools] packages must be {sorted(packages)}"


if __name__ == "__main__":
    edges = graph()
    for src in sorted(edges, key=lambda m: (layer(m), m)):
        inner = sorted(t for t in edges[src] if t in edges)
        print(f"[{layer(src)}] {src} -> {', '.join(inner) if inner else '-'}")
    found = problems(edges)
    print("\n".join(found) if found else "no cycles, no upward arrows, no torch.distributed in library code")
    sys.exit(1 if found else 0)
