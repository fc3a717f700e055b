"""The package's import graph: layers import downward only, and no module cycle exists.

Read with `ast` from the source (imports inside functions count too), so the layering holds
whether or not an import runs at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pixsigma

ROOT = Path(pixsigma.__file__).parent

# From the bottom up. Modules on one level do not import each other, except inside one package.
LAYERS: list[set[str]] = [
    {"errors"},
    {"io"},
    {"pngmeta"},
    {"model", "diffusion", "text", "vae", "resolution"},
    {"data"},
    {"pipeline"},
    {"train"},
    {"toy"},
    {"eval"},
    {"serve"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py") if "assets" not in p.relative_to(ROOT).parts}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pixsigma modules one file imports (a `from pkg import sub` names the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pixsigma")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixsigma"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def top_part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_top_level_module_has_a_layer():
    tops = {top_part(m) for m in package_modules()} - {""}
    assert tops <= set(LEVEL), f"modules with no layer in LAYERS: {sorted(tops - set(LEVEL))}"


def test_imports_go_downward_only():
    upward = []
    for module, targets in graph().items():
        src = top_part(module)
        if src == "":  # pixsigma/__init__.py re-exports the public API from every layer
            continue
        for target in targets:
            dst = top_part(target)
            if dst == src:
                continue
            if dst == "" and src == "cli":  # the version number lives in the root package
                continue
            if dst == "" or LEVEL[dst] >= LEVEL[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not go downward:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, has_cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"a"}}, True),
])
def test_cycle_finder_itself(edges, has_cycle):
    assert (find_cycle(edges) is not None) == has_cycle


def test_reader_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from pixsigma.toy import render\n    import pixsigma.model.transformer\n")
    modules = package_modules()
    assert imports_of(src, modules) == {"pixsigma.toy.render", "pixsigma.model.transformer"}
