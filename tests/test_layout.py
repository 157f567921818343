"""The package's layering: hatnorm's layers import only downwards, code outside hatnorm uses its public API,
no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: hatnorm's layers, lowest first; a module may import modules of its own layer and of the layers below it.
#: Each names the modules (with the packages under them) it holds; the core is every other module of
#: hatnorm/: the package itself, the private modules, the conversion package ``hatnorm._convert`` (its op table,
#: walk, handlers and runtime modules), ``checks``, ``fused`` and ``distributed`` (the
#: norms' multi-process synchronisation, which the core's recalibration and ``convert_sync`` use).
#: ``import hatnorm`` loads the core alone (tests/test_light_import.py).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ()),
    ("experiment support", ("hatnorm.checkpoint", "hatnorm.data", "hatnorm.metrics", "hatnorm.stats",
                            "hatnorm.text_tasks")),
    ("trainer", ("hatnorm.training",)),
    ("integrations", ("hatnorm.integrations",)),
)

#: code outside hatnorm/ that may use only its public API (tests may reach inside)
OUTSIDE = ("ablations", "architectures", "benchmarks")


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of a hatnorm module."""
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(f"{m}.") for m in members):
            return index
    return 0


def hatnorm_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / "hatnorm").rglob("*.py")}


def imported_modules(path: Path, known: frozenset[str] = frozenset()) -> list[tuple[str, int, bool]]:
    """``(module, line, at top level)`` for every import in ``path``; ``from a import b`` also gives ``a.b`` where
    that is one of the ``known`` modules."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno, id(node) in top))
            found += [(f"{node.module}.{alias.name}", node.lineno, id(node) in top) for alias in node.names
                      if f"{node.module}.{alias.name}" in known]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
    return found


def private_uses(path: Path, known: frozenset[str]) -> list[tuple[str, int]]:
    """``(what, line)`` for every private part of hatnorm that ``path`` reaches: ``import hatnorm._x``,
    ``from hatnorm import _x``, ``from hatnorm.training._x import ...`` or an attribute ``_x`` of a name bound
    to one of the ``known`` hatnorm modules (``hatnorm._x``, ``training._x``)."""

    def private(dotted: str) -> bool:
        return any(part.startswith("_") and not part.startswith("__") for part in dotted.split(".")[1:])

    tree = ast.parse(path.read_text())
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hatnorm":
                    found += [(alias.name, node.lineno)] if private(alias.name) else []
                    aliases.add(alias.asname or "hatnorm")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hatnorm":
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(name, node.lineno) for name in [node.module, *names] if private(name)][:1]
            aliases.update(alias.asname or alias.name for alias, name in zip(node.names, names, strict=True)
                           if name in known)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and private(f"hatnorm.{node.attr}")):
            found.append((f"{node.value.id}.{node.attr}", node.lineno))
    return sorted(found, key=lambda use: use[1])


@pytest.mark.parametrize("path", sorted(p for folder in OUTSIDE for p in (ROOT / folder).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_code_outside_hatnorm_uses_only_its_public_api(path: Path) -> None:
    private = private_uses(path, frozenset(hatnorm_modules()))
    assert not private, f"{path.relative_to(ROOT)} uses private parts of hatnorm (export what it needs): {private}"


def test_private_uses_are_found_in_every_form(tmp_path: Path) -> None:
    source = tmp_path / "user.py"
    source.write_text("import hatnorm\nimport hatnorm as hn\nimport hatnorm._fused\nfrom hatnorm import _gate, HAT\n"
                      "from hatnorm._norm_layer import X\nfrom hatnorm.training._config import TrainConfig\n"
                      "from hatnorm import training\nfrom hatnorm.training import train_sequence\n"
                      "hn._checks.check_task\nhatnorm.__version__\ntraining._fit\nHAT._filled\n")
    assert private_uses(source, frozenset(hatnorm_modules())) == [
        ("hatnorm._fused", 3), ("hatnorm._gate", 4), ("hatnorm._norm_layer", 5), ("hatnorm.training._config", 6),
        ("hn._checks", 9), ("training._fit", 11)]


def test_each_layer_of_hatnorm_imports_only_its_own_and_lower_layers() -> None:
    modules = hatnorm_modules()
    upward = []
    for name, path in sorted(modules.items()):
        for imported, line, _ in imported_modules(path, frozenset(modules)):
            if imported in modules and layer_of(imported) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]}) at line {line}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_every_hatnorm_module_imports_at_the_top_and_without_cycles() -> None:
    modules = hatnorm_modules()
    graph = {}
    for name, path in modules.items():
        imports = imported_modules(path, frozenset(modules))
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
