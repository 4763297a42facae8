"""Layers import only downward, and no module imports itself back through others.

The layer order is data here and in the README's layout section (the same list). Every import
statement counts, also those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# folder -> import name (pyproject's package-dir mapping)
FOLDERS = {
    "storefed": "storefed", "models": "storefed.models", "privacy": "storefed.privacy", "client": "storefed.client",
    "server": "storefed.server", "simulations": "storefed.simulations", "conf": "storefed.conf",
}

# Lowest first. Modules of one layer may import each other (without circles); a module may import
# any lower layer. Layers that share a rank (client, server) may not import each other.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "base", ("storefed", "storefed.atomic_files", "storefed.console", "storefed.update_codec",
                     "storefed.cache_dir")),
    (1, "config", ("storefed.config", "storefed.conf")),
    (2, "data", ("storefed.data",)),
    (3, "models", ("storefed.models",)),
    (4, "privacy", ("storefed.privacy",)),
    (5, "wire", ("storefed.wire", "storefed.flower_env", "storefed.flower_app")),
    (6, "client", ("storefed.client",)),
    (6, "server", ("storefed.server",)),
    (7, "simulations", ("storefed.simulations",)),
    (8, "cli", ("storefed.cli", "storefed.__main__")),
]


def module_files() -> dict[str, Path]:
    """Every installed module's import name -> its source file."""
    modules = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "storefed" and parts and parts[0] in FOLDERS.values():
                continue
            modules[".".join([name, *parts])] = path
    return modules


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for rank, name, prefixes in LAYERS:
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank, name)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and the README)"
    return best[1], best[2]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The storefed modules ``module`` imports (resolved to the longest known module name)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from X import y`: module X.y if it is one, else X itself
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {module: imports_of(module, path, known) for module, path in files.items()}


def test_every_module_belongs_to_a_layer():
    for module in module_files():
        layer_of(module)
    assert "storefed.server.server_app" in module_files() and "storefed.data.schema" in module_files()


def upward_imports(deps: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(deps.items()):
        rank, layer = layer_of(module)
        for target in sorted(imported):
            target_rank, target_layer = layer_of(target)
            if target_rank > rank or (target_rank == rank and target_layer != layer):
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
    return problems


def import_circles(deps: dict[str, set[str]]) -> list[list[str]]:
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_layer_imports_a_higher_layer():
    assert upward_imports(graph()) == []


def test_no_import_circles():
    assert import_circles(graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    deps = {"storefed.models.task": {"storefed.client.client_app"}, "storefed.client.client_app": set(),
            "storefed.server.a": {"storefed.server.b"}, "storefed.server.b": {"storefed.server.a"}}
    assert upward_imports(deps) == [
        "storefed.models.task (models) imports storefed.client.client_app (client)"
    ]
    assert import_circles(deps) == [["storefed.server.a", "storefed.server.b", "storefed.server.a"]]
    assert upward_imports({"storefed.client.x": {"storefed.server.y"}, "storefed.server.y": set()}) != []


@pytest.mark.parametrize("name", ["privacy"])
def test_privacy_is_a_library_without_cli_or_upper_layers(name):
    deps = graph()
    for module, imported in deps.items():
        if module.startswith(f"storefed.{name}"):
            assert not any(t.startswith(("storefed.client", "storefed.server", "storefed.simulations", "storefed.cli"))
                           for t in imported), (module, imported)


def test_the_readme_lists_the_same_layers():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for _, name, prefixes in LAYERS[1:]:
        for prefix in prefixes:
            assert f"`{prefix}`" in section, f"README layout section does not name {prefix}"
