"""What a norm class declares, checked on a probe the first time the registry builds it.

A norm that declares :attr:`~hatnorm.MaskedNorm.isolates_tasks` promises what HAT's no-forgetting guarantee
rests on: its output is gate ⊙ norm(x), exactly 0 where the gate is 0, and training a task under HAT's
hard protection leaves an earlier task's outputs bit-identical (the property the built-in norms are tested
for). A norm that ignores the gate registers, builds and trains, and forgets; the probe refuses it when the
first model is built with it, before any training. Every norm's output must have its input's shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hatnorm._masks import MaskState
from hatnorm._norm_protocol import MaskedNorm
from hatnorm._policies import HATPolicy

#: the norm classes whose declarations a probe has confirmed (once per class and process)
_confirmed: set[type[MaskedNorm]] = set()


def probe_input(norm: MaskedNorm, generator: torch.Generator) -> Tensor:
    """A batch of 4 for ``norm``: its smallest rank, its units in its channel dim, other sizes 3."""
    rank = min(norm.input_ranks)
    shape = [4] + [3] * (rank - 1)
    shape[norm.channel_dim] = norm.num_features
    return _randn(shape, generator)


def _randn(shape: list[int] | torch.Size, generator: torch.Generator) -> Tensor:
    """Standard normal values from ``generator`` (a CPU one), on torch's default device, as the norm is."""
    return torch.randn(shape, generator=generator, device="cpu").to(torch.empty(0).device)


def check_declarations(name: str, cls: type[MaskedNorm], make: Callable[[], MaskedNorm]) -> None:
    """Refuse a norm class that breaks what it declares (see the module's text), the first time it is built
    through the registry as ``name``; ``make`` builds the probe, a fresh instance with the model's options and
    at least 2 units and 2 tasks. The probe
    draws no random number from torch's generator (a model built after it is initialised as without it).

    Raises:
        TypeError: the norm returns the wrong shape, or declares ``isolates_tasks`` and gives an output
            where the gate is 0, or changes an earlier task's outputs when a later task trains.
    """
    if cls in _confirmed:
        return
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        norm = make()
        generator = torch.Generator().manual_seed(0)
        x = probe_input(norm, generator)
        units = norm.num_features
        first = (torch.arange(units) < units // 2).float()  # task 0 selects the first half, binarized
        norm.eval()
        before = norm(x, first, 0)  # the forward refuses an output of the wrong shape
        if cls.isolates_tasks:
            _check_isolation(name, norm, x, first, before, generator)
    _confirmed.add(cls)


def _check_isolation(name: str, norm: MaskedNorm, x: Tensor, first: Tensor, before: Tensor,
                     generator: torch.Generator) -> None:
    cls = type(norm).__name__
    closed = (first == 0).view([-1 if d == norm.channel_dim % x.dim() else 1 for d in range(x.dim())])
    if bool((before * closed).ne(0).any()):
        raise TypeError(f"norm {name!r} ({cls}) declares isolates_tasks=True, but its output is not 0 where the "
                        "gate is 0: normalize must return gate ⊙ norm(x) (e.g. multiply γ and β by the gate), or "
                        "the class must declare isolates_tasks = False")
    # task 1 trains every unit (gate 0.9) for one step under HAT's hard protection of task 0's units
    norm.train()
    out = norm(x, torch.full_like(first, 0.9), 1)
    params = {n: p for n, p in norm.named_parameters(recurse=False) if p.requires_grad}
    loss = (out * _randn(out.shape, generator)).sum()
    grads = (torch.autograd.grad(loss, list(params.values()), allow_unused=True) if params and loss.requires_grad
             else [None] * len(params))
    multipliers = norm.gradient_multipliers(MaskState(cumulative=first, summative=first), 1, HATPolicy())
    with torch.no_grad():
        for (n, p), g in zip(params.items(), grads, strict=True):
            if g is not None:
                p.sub_(g * multipliers.get(n, 1.0))
    norm.eval()
    after = norm(x, first, 0)
    if not torch.equal(after, before):
        moved = [n for n in params if n not in multipliers] or list(multipliers)
        raise TypeError(f"norm {name!r} ({cls}) declares isolates_tasks=True, but one step of task 1 under HAT's "
                        f"protection changed task 0's output by up to {float((after - before).abs().max()):.3g}: its "
                        f"statistics or parameters ({', '.join(moved) or 'none'}) follow later tasks, or it ignores "
                        "the gate; fix the norm or declare isolates_tasks = False")
