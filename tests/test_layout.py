"""The package's layout rules, read from its source.

- no import cycle between sandboxer's modules, counting imports made inside
  functions (only imports under ``if TYPE_CHECKING:`` are left out: they never
  run);
- no module over 800 lines;
- no module importing another module's underscore-private names (a private
  helper module such as ``_json`` may be imported; ``from x import _name`` may
  not, nor ``x._name`` on an imported module).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sandboxer"
MAX_LINES = 800


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _bare(module: str, name: str) -> str:
    """An absolute import's module; the launcher's modules import their siblings by bare name
    (``import _syscalls``), so a name that is a sibling of the importer means that sibling."""
    sibling = f"{module.rsplit('.', 1)[0]}.{name}"
    return sibling if name not in MODULES and sibling in MODULES else name


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:``."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name in ("TYPE_CHECKING", "_TYPE_CHECKING"):
                for inner in node.body:
                    skip.update(id(n) for n in ast.walk(inner))
    return skip


class _Imports:
    """What one module imports from the package: modules and names."""

    def __init__(self, module: str) -> None:
        self.module = module
        tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
        skip = _type_checking_only(tree)
        self.edges: set[str] = set()
        self.private: list[str] = []
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = _bare(module, alias.name)
                    if name in MODULES:
                        self.edges.add(name)
                        aliases[alias.asname or alias.name] = name
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node) if node.level else _bare(module, node.module or "")
                if source not in MODULES:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in MODULES:
                        self.edges.add(sub)
                        aliases[alias.asname or alias.name] = sub
                        continue
                    self.edges.add(source)
                    if _private(alias.name):
                        self.private.append(f"from {source} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and f"{aliases[node.value.id]}.{node.attr}" not in MODULES
            ):
                self.private.append(f"{aliases[node.value.id]}.{node.attr}")
        self.edges.discard(module)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


IMPORTS = {name: _Imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(IMPORTS[node].edges):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(MODULES):
        if name not in index:
            visit(name)
    return found


def test_the_checker_sees_the_package():
    assert "sandboxer.manager" in MODULES
    assert "sandboxer.manager" in IMPORTS["sandboxer._cli_commands"].edges
    # inside a function, and by bare name from the launcher's directory
    assert "sandboxer.discovery" in IMPORTS["sandboxer._cli_commands"].edges
    assert "sandboxer.sandbox._syscalls" in IMPORTS["sandboxer.sandbox.launcher"].edges


def test_no_import_cycle():
    assert _cycles() == []


def test_no_module_over_800_lines():
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_module_imports_another_modules_private_names():
    found = {name: imp.private for name, imp in IMPORTS.items() if imp.private}
    assert found == {}
