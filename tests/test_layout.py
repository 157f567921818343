"""The package's layering: reference architectures on the public API, no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> list[tuple[str, int, bool]]:
    """``(module, line, at top level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "architectures").glob("*.py")), ids=lambda p: p.name)
def test_reference_architectures_use_only_the_public_api(path: Path) -> None:
    private = [(m, line) for m, line, _ in imported_modules(path) if m.startswith("hatnorm._")]
    assert not private, f"{path.name} imports private hatnorm modules: {private}"


def test_every_hatnorm_module_imports_at_the_top_and_without_cycles() -> None:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "hatnorm").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imports = imported_modules(path)
        late = [(m, line) for m, line, top in imports if m.startswith("hatnorm") and not top]
        assert not late, f"{name} imports inside a function (a hidden cycle): {late}"
        graph[name] = {m for m, _, _ in imports if m in modules and m != name}
    visiting, done = [], set()

    def visit(name: str) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(name):], name])}"
        if name in done:
            return
        visiting.append(name)
        for other in graph[name]:
            visit(other)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)
