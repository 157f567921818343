"""ResNet-18 under HAT: a task-aware norm and a gate after every convolution, the downsample included.

Parameter names follow torchvision's ``resnet18`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``/``.1``), and the task-aware norms accept plain BatchNorm state, so a
torchvision state dict loads with ``model.load_state_dict(state, strict=False)``: every task slot of
the norms starts from the pretrained γ, β and statistics; only ``fc`` (replaced by per-task heads) and
the gates are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from hatnorm import HATGate, HATModule, MaskedNorm, NormSpec, TaskHeads, register_architecture
from hatnorm.blocks import Layer, MaskSource, Residual
from hatnorm.checks import check_batch, check_batch_statistics, check_positive_int, check_task_and_scale


class BasicBlock(nn.Module):
    """conv3×3 → norm → gate → ReLU → conv3×3 → norm → gate, plus the (gated) shortcut, then ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int, *, num_tasks: int,
                 norm_layer: Callable[[int], MaskedNorm], s_max: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.gate1 = HATGate(planes, num_tasks=num_tasks, s_max=s_max)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.gate2 = HATGate(planes, num_tasks=num_tasks, s_max=s_max)
        self.downsample: nn.ModuleList | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.ModuleList([nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm_layer(planes)])
            self.gate_down = HATGate(planes, num_tasks=num_tasks, s_max=s_max)

    def forward(self, x: Tensor, task: int, s: float | Tensor | None, *, trusted: bool = False) -> Tensor:
        """The block's output for ``x``; ``trusted``: ``task`` and ``s`` were checked by the model."""
        out = F.relu(self.bn1(self.conv1(x), self.gate1(task, s, trusted=trusted), task, trusted=trusted))
        out = self.bn2(self.conv2(out), self.gate2(task, s, trusted=trusted), task, trusted=trusted)
        identity = x
        if self.downsample is not None:
            conv, norm = self.downsample
            identity = norm(conv(x), self.gate_down(task, s, trusted=trusted), task, trusted=trusted)
        return F.relu(out + identity)

    def wiring(self, inp: MaskSource) -> tuple[list[Layer], MaskSource]:
        """This block's layers given the units of its input, and the units of its output."""
        layers = [Layer(self.conv1, out=self.gate1, inp=inp), Layer(self.bn1, out=self.gate1),
                  Layer(self.conv2, out=self.gate2, inp=self.gate1), Layer(self.bn2, out=self.gate2)]
        shortcut = inp
        if self.downsample is not None:
            conv, norm = self.downsample
            layers += [Layer(conv, out=self.gate_down, inp=inp), Layer(norm, out=self.gate_down)]
            shortcut = self.gate_down
        # the residual add: a unit is used if either summed path uses it
        return layers, Residual(self.gate2, shortcut)


class ResNet(HATModule):
    """ResNet with BasicBlocks under HAT.

    Args:
        blocks: BasicBlocks per stage ([2, 2, 2, 2] for ResNet-18).
        num_classes: one class count per task.
        num_tasks: number of tasks.
        norm_layer: norm factory over ``[N, C, H, W]``.
        stem: ``"cifar"`` (3×3 conv, stride 1, no max-pool, for 32×32) or ``"imagenet"`` (7×7 conv,
            stride 2, max-pool).
        base_width: the width of the first stage; stages are 1, 2, 4, 8 × it (64 in torchvision,
            20 in the "reduced ResNet-18" of the continual-learning literature).
        in_channels: input channels.
        s_max: the gates' largest scale.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_classes: Sequence[int],
        *,
        num_tasks: int,
        norm_layer: Callable[[int], MaskedNorm],
        stem: Literal["cifar", "imagenet"] = "cifar",
        base_width: int = 64,
        in_channels: int = 3,
        s_max: float = 400.0,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be an int ≥ 1, got {base_width!r}")
        if not isinstance(blocks, Sequence) or not blocks:
            raise ValueError(f"blocks must be a non-empty sequence of block counts, got {blocks!r}")
        blocks = [check_positive_int(n, f"blocks[{i}]") for i, n in enumerate(blocks)]
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, base_width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(base_width)
        self.gate1 = HATGate(base_width, num_tasks=num_tasks, s_max=s_max)
        inplanes = base_width
        for i, n in enumerate(blocks):
            planes = base_width * 2**i
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(inplanes, planes, stride, num_tasks=num_tasks, norm_layer=norm_layer,
                                        s_max=s_max))
                inplanes = planes
            self.add_module(f"layer{i + 1}", nn.ModuleList(stage))
        self.num_stages = len(blocks)
        self.task_heads = TaskHeads(inplanes, num_classes, num_tasks=num_tasks)
        self.num_tasks = self.task_heads.num_tasks
        self._batch_statistics = self.bn1.batch_statistics  # every norm comes from the one norm_layer

    def stages(self) -> list[nn.ModuleList]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def _last_positions(self, height: int, width: int) -> int:
        """The positions of the last stage's maps for an input ``height``×``width``: the fewest any norm sees."""
        halvings = (self.num_stages - 1) + (2 if self.stem == "imagenet" else 0)
        for _ in range(halvings):  # a stride-2 convolution or max-pool with padding: ⌈side / 2⌉
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        return height * width

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Tensor:
        """The logits of task ``task`` for images ``x`` ``[N, in_channels, H, W]`` (N, H, W ≥ 1)."""
        check_batch(x, (self.in_channels, "H", "W"), like=self.conv1.weight)
        if self._batch_statistics:
            check_batch_statistics(x, self._last_positions(x.shape[2], x.shape[3]), training=self.training)
        task, s = check_task_and_scale(task, s, num_tasks=self.num_tasks, training=self.training)
        # checked once here: the gates, norms and heads below take the trusted path
        h = F.relu(self.bn1(self.conv1(x), self.gate1(task, s, trusted=True), task, trusted=True))
        if self.stem == "imagenet":
            h = F.max_pool2d(h, 3, 2, 1)
        for stage in self.stages():
            for block in stage:
                h = block(h, task, s, trusted=True)
        return self.task_heads(F.adaptive_avg_pool2d(h, 1).flatten(1), task, trusted=True)

    def _wiring(self) -> tuple[list[Layer], MaskSource]:
        layers = [Layer(self.conv1, out=self.gate1), Layer(self.bn1, out=self.gate1)]
        units: MaskSource = self.gate1
        for stage in self.stages():
            for block in stage:
                block_layers, units = block.wiring(units)
                layers += block_layers
        return layers, units

    def hat_layers(self) -> list[Layer]:
        return self._wiring()[0]

    def head_units(self) -> MaskSource:
        """The units of the last block's output, which the pooled features keep."""
        return self._wiring()[1]


@register_architecture("resnet18", family="batch")
def resnet18(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ResNet:
    """ResNet-18 (BasicBlock × [2, 2, 2, 2]); options: ``stem``, ``base_width``, ``in_channels``, ``s_max``."""
    return ResNet([2, 2, 2, 2], num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks, dims=2),
                  **options)


@register_architecture("resnet10", family="batch")
def resnet10(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ResNet:
    """ResNet-10 (BasicBlock × [1, 1, 1, 1]), ResNet-18's stages with one block each; options as ``resnet18``."""
    return ResNet([1, 1, 1, 1], num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks, dims=2),
                  **options)


@register_architecture("resnet34", family="batch")
def resnet34(*, num_tasks: int, norm: NormSpec, num_classes: list[int], **options: Any) -> ResNet:
    """ResNet-34 (BasicBlock × [3, 4, 6, 3], torchvision's ``resnet34`` names); options as ``resnet18``."""
    return ResNet([3, 4, 6, 3], num_classes, num_tasks=num_tasks, norm_layer=norm.layer(num_tasks=num_tasks, dims=2),
                  **options)
