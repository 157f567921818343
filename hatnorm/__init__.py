"""hatnorm: task-aware normalization for Hard Attention to the Task (HAT) continual learning.

The top level holds what a HAT experiment uses every day: :class:`HAT` and the model parts it trains
(:class:`HATModule`, :class:`HATGate`, :class:`TaskHeads`), the three registries (architectures, norms,
gradient policies: ``register_*``, ``get_*`` for the spec, ``list_*``, and ``build`` / ``create_policy`` to
instantiate), conversion and export, and the protocols a new part implements (:class:`MaskedNorm`,
:class:`GradientPolicy`, :class:`Protected`). The rest lives in namespaces:

- :mod:`hatnorm.functional`: the gate and the norms as functions;
- :mod:`hatnorm.norms`: the norm classes;
- :mod:`hatnorm.policies`: the gradient policy classes and their options;
- :mod:`hatnorm.blocks`: the blocks a HAT model is wired from (``Layer``, ``Residual``, ...);
- :mod:`hatnorm.exported`: the modules of an exported model.

``import hatnorm`` loads the core (torch and einops). The trainer, data, statistics and checkpoint
modules, which need more (some of them extras), load when imported or first used as attributes
(``hatnorm.training``).
"""

from importlib import import_module as _import_module
from types import ModuleType as _ModuleType

from hatnorm import blocks, exported, functional, norms, policies
from hatnorm._arch_registry import (
    ArchitectureSpec,
    build,
    get_architecture,
    list_architectures,
    register_architecture,
)
from hatnorm._convert import ConversionError, ConvertedModel, convert, open_gates, register_conversion_rule
from hatnorm._export import TaskModel, export
from hatnorm._gate import HATGate
from hatnorm._hat import HAT, HATModule
from hatnorm._heads import TaskHeads
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._norm_registry import NormSpec, get_norm, list_norms, register_norm
from hatnorm._policies import (
    GradientPolicy,
    PolicySpec,
    create_policy,
    get_policy,
    list_policies,
    register_policy,
)
from hatnorm._protected import Protected
from hatnorm._recalibration import recalibrate_norms
from hatnorm.distributed import convert_sync

__version__ = "0.1.0"

#: the public submodules that ``import hatnorm`` does not load: each loads on first use as an attribute
_SUBMODULES = ("checkpoint", "checks", "data", "distributed", "fused", "integrations", "metrics", "stats",
               "text_tasks", "training")


def __getattr__(name: str) -> _ModuleType:
    """``hatnorm.training`` and the other public submodules without importing them first."""
    if name in _SUBMODULES:
        return _import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})


#: the top-level names; each is documented (docs/concepts.md, "The public API") and pinned by tests/test_api.py
__all__ = [
    "HAT",
    "ArchitectureSpec",
    "ConversionError",
    "ConvertedModel",
    "GradientPolicy",
    "HATGate",
    "HATModule",
    "MaskedNorm",
    "NormSpec",
    "PolicySpec",
    "Protected",
    "TaskHeads",
    "TaskModel",
    "blocks",
    "build",
    "convert",
    "convert_sync",
    "create_policy",
    "export",
    "exported",
    "functional",
    "get_architecture",
    "get_norm",
    "get_policy",
    "list_architectures",
    "list_norms",
    "list_policies",
    "norms",
    "open_gates",
    "policies",
    "recalibrate_norms",
    "register_architecture",
    "register_conversion_rule",
    "register_norm",
    "register_policy",
]
