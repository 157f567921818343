"""The MaskedNorm protocol: what training, export, statistics re-estimation, multi-process training and
conversion need from a task-aware norm, and the pure gate (:class:`NoNorm`), its smallest implementation.

A task-aware norm receives its layer's gate a^t and returns a ⊙ norm_t(x): norm and gate are one call,
placed as ``weighted op → norm(x, gate, t) → activation``. The selection m = 1[a^t > 0.5] decides which
units' statistics are used and moved. Every norm reports the gradient multipliers of its own
parameters, so :class:`hatnorm.HAT` protects norms by the same mechanism as weights.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, final

import torch
from torch import Tensor, nn

from hatnorm._checks import check_gate, check_input, check_num_tasks, check_positive_int, check_task
from hatnorm._exported import ExportedGate
from hatnorm._masks import MaskState
from hatnorm._norm_functional import per_channel
from hatnorm._policies import GradientPolicy
from hatnorm._protected import Protected

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

#: where a norm's units are: dim 1 (``[N, C, *]``, CNNs), the last dim (``[N, *, C]``, transformers), or either
Layout = Literal["channels_first", "channels_last", "any"]
#: which models a norm fits, by its layout: the word the registries and architectures use
Family = Literal["batch", "layer", "any"]
FAMILY_OF: dict[Layout, Family] = {"channels_first": "batch", "channels_last": "layer", "any": "any"}

#: every rank a norm may take (``[N, C]`` up to ``[N, C, D, H, W]``)
ANY_RANK = (2, 3, 4, 5)
#: what each ``dims`` means, for messages
_DIMS_TEXT: dict[int | None, str] = {1: "1 ([N, C] or [N, C, L])", 2: "2 ([N, C, H, W])"}


def unit_values(t: Tensor, task: int, keep: Tensor) -> Tensor:
    """``t``'s values for ``task`` (its row, for per-task tensors ``[T, C]``) over the units ``keep``."""
    return (t[task] if t.dim() == 2 else t).detach()[keep]


class MaskedNorm(nn.Module, Protected):
    """The protocol of every task-aware norm, so that a norm registered by another package
    (:func:`hatnorm.register_norm`, entry point ``hatnorm.norms``) works everywhere.

    A subclass declares its :attr:`layout` and :attr:`ranks` (the constructor resolves ``dims`` and the
    units' dim from them), implements :meth:`normalize`, and overrides the hooks that concern it:
    :meth:`export`; for running statistics :meth:`running_statistics`, :meth:`statistics_slot` and a
    ``momentum`` attribute; :meth:`sync` for batch statistics over several processes; :attr:`replaces` and
    :meth:`options_from` for :func:`hatnorm.convert`. The gradient multipliers follow from the parameters'
    shapes (see :meth:`gradient_multipliers`).

    Args:
        num_features: number of units C (channels for channels-first norms, last-dim features otherwise).
        num_tasks: number of tasks T.
        dims: the input layout, one of :attr:`ranks`: 1 (``[N, C]``, ``[N, C, L]``), 2 (``[N, C, H, W]``),
            or ``None`` (any rank of a channels-first norm; features in the last dim otherwise).
    """

    #: where the norm's units are (the registry's family follows from it)
    layout: ClassVar[Layout] = "any"
    #: the input ranks per ``dims`` the norm accepts, its one declaration of the layouts it takes
    ranks: ClassVar[Mapping[int | None, tuple[int, ...]]] = {2: ANY_RANK, 1: ANY_RANK, None: ANY_RANK}
    #: whether training normalises with batch statistics, which need more than 1 value per channel
    batch_statistics: ClassVar[bool] = False
    #: the torch modules :func:`hatnorm.convert` may replace with this norm
    replaces: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether :func:`hatnorm.export` may remove the units a task does not use (not when the statistics
    #: read every unit, the removed ones too)
    prunable: ClassVar[bool] = True
    #: whether, under HAT's hard protection, training a task leaves every earlier task's outputs
    #: bit-identical (checked on a probe when the registry first builds the norm, and by the property
    #: tests); False for the baselines, whose shared statistics or affine follow the newest task
    isolates_tasks: ClassVar[bool] = False

    #: the dim holding the ``num_features`` units, from the layout (an instance of an ``"any"`` layout: from
    #: its ``dims``)
    channel_dim: int = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides forward: a MaskedNorm implements normalize(x, gate, task), "
                            "which the protocol's forward calls after its checks")
        cls.channel_dim = -1 if cls.layout == "channels_last" else 1

    def __init__(self, num_features: int, *, num_tasks: int, dims: int | None = None) -> None:
        super().__init__()
        self.num_features = check_positive_int(num_features, "num_features")
        self.num_tasks = check_num_tasks(num_tasks)
        #: the input ranks this norm takes (``ranks[dims]``)
        self.input_ranks = self._ranks_of(dims)
        self.channel_dim = 1 if self.layout == "channels_first" or (self.layout == "any" and dims is not None) else -1

    def _ranks_of(self, dims: object) -> tuple[int, ...]:
        if isinstance(dims, bool) or not (dims is None or isinstance(dims, int)) or dims not in self.ranks:
            last = "None (any [N, C, *])" if self.layout == "channels_first" else "None (features in the last dim)"
            allowed = [_DIMS_TEXT[d] if d is not None else last for d in self.ranks]
            text = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise ValueError(f"{type(self).__name__}: dims must be {text}, got {dims!r}")
        return self.ranks[dims]

    @final
    def forward(self, x: Tensor, gate: Tensor, task: int, *, trusted: bool = False) -> Tensor:
        """Normalise ``x`` for task ``task`` and apply ``gate``, the layer's gate values ``[num_features]``:
        returns gate ⊙ norm_task(x), of ``x``'s shape.

        Args:
            x: the input, of a rank in :attr:`input_ranks` with ``num_features`` units in :attr:`channel_dim`.
            gate: the layer's gate values, in [0, 1].
            task: the task id, in ``[0, num_tasks)``.
            trusted: the caller has checked ``x``, ``gate`` and ``task`` (a model that validated its task and
                scale at the top, with its own gates), so :meth:`validate` is skipped.
        """
        if not trusted:
            task = self.validate(x, gate, task)
        out = self.normalize(x, gate, task)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            given = f"shape {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"{type(self).__name__}.normalize must return a tensor of x's shape {list(x.shape)} "
                            f"(gate ⊙ norm(x)), got {given}")
        return out

    @abstractmethod
    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        """gate ⊙ norm_task(x) for arguments already checked (``task`` an int in range), of ``x``'s shape."""

    def gradient_multipliers(self, previous: MaskState, task: int, policy: GradientPolicy) -> dict[str, Tensor]:
        """Derived from each own parameter's shape: one value per unit ``[C]`` is shared by every task and
        protected like a bias (``policy``'s unit rate); one row per task ``[T, C]`` trains task ``task``'s row
        only. A parameter of another shape is left out (the coverage check then refuses the model unless
        it is frozen): a norm with one overrides this."""
        multipliers, rate, own = {}, None, None
        for name, p in self._parameters.items():
            if p is None:
                continue
            if p.shape == (self.num_features,):
                rate = policy.unit_rate(previous) if rate is None else rate
                multipliers[name] = rate
            elif p.shape == (self.num_tasks, self.num_features):
                if own is None:
                    own = torch.zeros_like(p)
                    own[task] = 1
                multipliers[name] = own
        return multipliers

    def end_task(self, task: int) -> None:
        """Consolidate after ``task`` ends. Norms whose state is complete at the end of training do nothing."""

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        """The constructor options that make this norm stand for ``module`` (one of :attr:`replaces`),
        ``dims`` included; ``module``'s state is then loaded into every task slot.

        Raises:
            ValueError: ``module`` has a configuration this norm cannot reproduce.
        """
        raise ValueError(f"{cls.__name__} replaces no torch module")

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        """The plain inference module for ``task`` over the units ``keep`` (indices), with the gate values
        ``gate`` over those units folded in: it must equal this norm's evaluation output there, and be
        callable as the norm is, ``trusted`` keyword included (see :mod:`hatnorm._exported`).

        Raises:
            TypeError: this norm cannot be exported.
        """
        raise TypeError(f"model: cannot export a {type(self).__name__}; it declares no export")

    def running_statistics(self) -> list[Tensor]:
        """The buffers :func:`hatnorm.recalibrate_norms` re-estimates (and precise validation restores):
        statistics a training forward moves by ``momentum``. Norms without running statistics: none."""
        return []

    def statistics_slot(self, task: int) -> int | None:
        """Which slot of the running statistics a training forward for ``task`` moves: the task for
        per-task statistics, ``None`` for statistics shared by every task."""
        return None

    def sync(self, process_group: ProcessGroup | None) -> None:
        """Compute training statistics over the batches of every rank of ``process_group`` (``None``:
        each process alone); called by :func:`hatnorm.convert_sync`. Norms without batch statistics
        need no communication."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Accept a plain nn.BatchNorm/nn.LayerNorm state (pretrained weights): a per-unit tensor [C]
        # goes into every task slot of a per-task tensor [T, C]; BatchNorm's step counter has no use here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        own = dict(self.named_parameters(recurse=False)) | dict(self.named_buffers(recurse=False))
        for name, tensor in own.items():
            incoming = state_dict.get(prefix + name)
            if incoming is not None and tensor.dim() == 2 and incoming.shape == tensor.shape[1:]:
                state_dict[prefix + name] = incoming.expand_as(tensor).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def validate(self, x: Tensor, gate: Tensor, task: int) -> int:
        """Check a call's input (rank in :attr:`input_ranks`, ``num_features`` units in :attr:`channel_dim`, dtype and
        device of the norm's parameters), its gate and its task; returns the task as an int. Every untrusted
        :meth:`forward` starts with it, so bad calls fail with the same messages in every norm."""
        # any own parameter fixes the dtype and device x must meet; read from the dict, since a
        # parameters() generator would cost more than all the checks together
        like = next(iter(self._parameters.values()), None)
        check_input(x, self.num_features, ranks=self.input_ranks, channel_dim=self.channel_dim, like=like)
        check_gate(gate, self.num_features, like=like, device=x.device)
        return check_task(task, self.num_tasks)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_tasks={self.num_tasks}"


@final
class NoNorm(MaskedNorm):
    """No normalization, the pure gate: gate ⊙ x.

    Args:
        num_features: number of gated units.
        num_tasks: number of tasks.
        dims: the layout: 1 or 2 gate dim 1 (``[N, C, *spatial]``, CNNs), ``None`` the last dim
            (transformers) [2].
        channel_dim: where the units are, 1 or -1, in place of ``dims`` (what :func:`hatnorm.convert`
            knows of a module); ``None``: from ``dims``.
    """

    replaces = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    isolates_tasks = True

    def __init__(self, num_features: int, *, num_tasks: int, dims: int | None = 2,
                 channel_dim: int | None = None) -> None:
        if channel_dim is not None:
            if channel_dim not in (1, -1) or isinstance(channel_dim, bool):
                raise ValueError(f"channel_dim must be 1 (channels first) or -1 (features last), got {channel_dim!r}")
            dims = None if channel_dim == -1 else 2
        super().__init__(num_features, num_tasks=num_tasks, dims=dims)

    @classmethod
    def options_from(cls, module: nn.Module) -> dict[str, Any]:
        if not isinstance(module, cls.replaces):
            raise ValueError(f"no norm replaces BatchNorm1d/2d and LayerNorm, got {module}")
        return {"dims": None if isinstance(module, nn.LayerNorm) else 1 if isinstance(module, nn.BatchNorm1d) else 2}

    def normalize(self, x: Tensor, gate: Tensor, task: int) -> Tensor:
        return x * (per_channel(gate, x) if self.channel_dim == 1 else gate)

    def export(self, task: int, gate: Tensor, keep: Tensor) -> nn.Module:
        return ExportedGate(None if bool((gate == 1).all()) else gate, self.channel_dim)
