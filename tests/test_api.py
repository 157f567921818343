"""The public surface a researcher relies on: the top-level names, each namespace's names, each documented in
docs/api.md, each in one home, and no private module among them."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import hatnorm

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"

#: the top-level names, pinned: a change of the surface is a change of this list and of docs/api.md
TOP_LEVEL = [
    "HAT", "ArchitectureSpec", "ConversionError", "ConvertedModel", "GradientPolicy", "HATGate", "HATModule",
    "MaskedNorm", "NormSpec", "PolicySpec", "Protected", "TaskHeads", "TaskModel", "blocks", "build", "convert",
    "convert_sync", "create_policy", "export", "exported", "functional", "get_architecture", "get_norm",
    "get_policy", "list_architectures", "list_norms", "list_policies", "norms", "open_gates", "policies",
    "recalibrate_norms", "register_architecture", "register_conversion_rule", "register_norm", "register_policy",
]
NAMESPACES = ("blocks", "exported", "functional", "norms", "policies")
#: the public submodules that load on first use (``hatnorm._SUBMODULES``)
LAZY = ("checkpoint", "checks", "data", "distributed", "fused", "integrations", "metrics", "stats", "text_tasks",
        "training")


def section(title: str) -> str:
    """The text of docs/api.md's section ``## title``."""
    text = API_DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([\w.]+)`", text))


def own_docstring(obj: object) -> bool:
    """Whether a class or function has a docstring of its own (not its base's); other objects pass."""
    if inspect.isclass(obj):
        return bool(obj.__dict__.get("__doc__"))
    return bool(obj.__doc__) if inspect.isfunction(obj) else True


def test_the_top_level_holds_the_pinned_names_and_between_30_and_40_of_them() -> None:
    assert sorted(hatnorm.__all__) == sorted(TOP_LEVEL)
    assert 30 <= len(hatnorm.__all__) <= 40
    assert all(hasattr(hatnorm, name) for name in hatnorm.__all__)
    assert tuple(hatnorm._SUBMODULES) == LAZY


def test_after_import_hatnorm_nothing_else_is_public_at_the_top_level() -> None:
    # in a fresh process: the tests' own imports would add the lazy submodules and private modules
    done = subprocess.run([sys.executable, "-c", "import json, hatnorm; print(json.dumps(dir(hatnorm)))"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    public = {name for name in json.loads(done.stdout) if not name.startswith("_")}
    assert public == set(TOP_LEVEL) | set(LAZY)


def test_every_public_module_of_the_package_is_a_namespace_or_a_lazy_submodule() -> None:
    modules = {p.stem if p.suffix == ".py" else p.name for p in (ROOT / "hatnorm").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists()) and not p.name.startswith("_")}
    assert modules == set(NAMESPACES) | set(LAZY)


@pytest.mark.parametrize("name", NAMESPACES)
def test_a_namespace_is_a_public_module_whose_public_names_are_its_all(name: str) -> None:
    namespace = getattr(hatnorm, name)
    assert isinstance(namespace, ModuleType) and namespace.__name__ == f"hatnorm.{name}"
    assert namespace.__doc__
    public = {n for n in vars(namespace) if not n.startswith("_")}
    assert public == set(namespace.__all__)


def test_no_name_has_two_homes_and_none_is_a_private_module() -> None:
    homes: dict[str, list[str]] = {}
    for name in hatnorm.__all__:
        if name not in NAMESPACES:
            homes.setdefault(name, []).append("hatnorm")
    for space in NAMESPACES:
        for name in getattr(hatnorm, space).__all__:
            homes.setdefault(name, []).append(f"hatnorm.{space}")
    assert {name: where for name, where in homes.items() if len(where) > 1} == {}
    objects = [getattr(hatnorm, n) for n in hatnorm.__all__]
    objects += [getattr(getattr(hatnorm, s), n) for s in NAMESPACES for n in getattr(hatnorm, s).__all__]
    assert [o.__name__ for o in objects if isinstance(o, ModuleType) and "._" in o.__name__] == []


def test_every_public_name_is_documented_in_docs_api_and_every_class_and_function_has_a_docstring() -> None:
    top = backticked(section("The top level"))
    assert [n for n in hatnorm.__all__ if n not in NAMESPACES and n not in top] == []
    rows = {row.split("|")[1].strip().strip("`"): backticked(row.split("|")[2])
            for row in section("The namespaces").splitlines() if row.startswith("| `hatnorm.")}
    assert sorted(rows) == [f"hatnorm.{s}" for s in NAMESPACES]
    for space in NAMESPACES:
        assert sorted(set(getattr(hatnorm, space).__all__) ^ rows[f"hatnorm.{space}"]) == [], space
    lazy = backticked(section("Submodules loaded on first use"))
    assert {f"hatnorm.{n}" for n in LAZY} <= lazy
    undocumented = [f"{where}.{n}" for where, names in [("hatnorm", hatnorm.__all__),
                                                          *[(f"hatnorm.{s}", getattr(hatnorm, s).__all__)
                                                            for s in NAMESPACES]]
                    for n in names if not own_docstring(getattr(sys.modules[where], n))]
    assert undocumented == []


def test_every_built_in_norm_and_policy_class_is_public_in_its_namespace() -> None:
    norms = {hatnorm.get_norm(n).norm_class for n in hatnorm.list_norms()}
    policies = {hatnorm.get_policy(n).factory for n in hatnorm.list_policies()}
    built_in = [c for c in norms | policies if c.__module__.startswith("hatnorm.") and inspect.isclass(c)]
    public = [getattr(space, n) for space in (hatnorm.norms, hatnorm.policies) for n in space.__all__]
    assert sorted(c.__name__ for c in built_in if not any(c is p for p in public)) == []
