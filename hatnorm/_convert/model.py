"""The model :func:`hatnorm.convert` returns: the rewritten graph, its wiring, and the checks of its input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hatnorm._checks import check_batch_statistics, check_dtype, check_task, check_training_scale
from hatnorm._convert.train_graph import EvaluationForward
from hatnorm._hat import HATModule, Layer
from hatnorm._heads import TaskHeads
from hatnorm._masks import MaskSource
from hatnorm._norm_protocol import MaskedNorm


class ConvertedModel(HATModule):
    """A converted model: ``model(x, task=t, s=s)``; its wiring comes from the traced graph.

    The original model's input shape is not declared anywhere, so the first time an input of a new shape
    (after the batch dim), dtype or device arrives, one sample of it runs through the model in evaluation
    mode without gradients, which moves no statistic: an input the model cannot take is refused before
    the real forward, and the fewest values per channel any batch-statistics norm sees is remembered, so
    a training batch too small for batch statistics is refused up front too.

    A model whose forward runs more in training than in evaluation (auxiliary classifiers) keeps it: in training
    the converted model returns what the original returns there (GoogLeNet's ``GoogLeNetOutputs``, every logits
    tensor from heads of the task), in evaluation the logits alone, computing nothing else.

    Attributes:
        body: the traced and rewritten graph module.
        num_tasks: number of tasks.
    """

    def __init__(self, body: nn.Module, layers: Sequence[Layer], head_units: MaskSource | None = None,
                 evaluation: EvaluationForward | None = None) -> None:
        super().__init__()
        self.body = body
        self._layers = list(layers)
        self._head_units = head_units
        self._evaluation = evaluation
        self.num_tasks = next(m.num_tasks for m in body.modules() if isinstance(m, TaskHeads))
        # per-sample shape, dtype and device of every input the model took → positions per channel (see _probe)
        self._accepted: dict[tuple[tuple[int, ...], torch.dtype, torch.device], int | None] = {}

    def forward(self, x: Tensor, task: int, s: float | Tensor | None = None) -> Any:
        """The logits of task ``task`` for ``x``, a batch ``[N, ...]`` (N ≥ 1) the original model takes (in
        training, for a model with auxiliary classifiers, what the original returns: its logits and theirs).

        Args:
            x: the input batch.
            task: the task id, in ``[0, num_tasks)``.
            s: the gates' scale; required while training.

        Raises:
            TypeError: ``x`` is not a tensor or ``task`` not an int.
            ValueError: ``x`` is empty, of a dtype or device other than the model's, of a shape the model
                cannot take, or a training batch too small for batch statistics; ``task`` out of range; ``s``
                missing or not > 0 while training.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor [N, ...], got {type(x).__name__}")
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"x must be a non-empty batch [N, ...] with N ≥ 1 and every size ≥ 1, "
                             f"got shape {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        check_dtype(x, next(self.parameters()), name="x", mixed=False)
        task = check_task(task, self.num_tasks)
        s = check_training_scale(s, self.training)
        if not torch.compiler.is_compiling():
            check_batch_statistics(x, self._probe(x, task), training=self.training)
        return self._run(x, task, s)

    def _run(self, x: Tensor, task: int, s: float | Tensor | None) -> Any:
        if self.training or self._evaluation is None:
            return self.body(x, task, s)
        return self._evaluation(self.body, x, task, s)

    def only_in_training(self) -> list[str]:
        """The paths of the modules only the training forward runs: auxiliary classifiers, their norms and gates."""
        if self._evaluation is None:
            return []
        used = {n.target for n in self._evaluation.graph.nodes if n.op == "call_module"}
        called = {n.target for n in self.body.graph.nodes if n.op == "call_module"}
        return [f"body.{path}" for path in sorted(called - used)]

    def _probe(self, x: Tensor, task: int) -> int | None:
        """The fewest values per sample and channel any batch-statistics norm sees for inputs shaped like ``x``
        (``None``: no such norm), from one evaluation-mode pass of ``x[:1]`` the first time the shape comes."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key in self._accepted:
            return self._accepted[key]
        seen: list[int] = []

        def record(norm: nn.Module, args: tuple[Tensor, ...]) -> None:
            seen.append(args[0].numel() // norm.num_features)

        norms = [m for m in self.body.modules() if isinstance(m, MaskedNorm) and m.batch_statistics]
        handles = [norm.register_forward_pre_hook(record) for norm in norms]
        modes = {m: m.training for m in self.modules()}
        buffers = {name: value.clone() for name, value in self.named_buffers()}  # a forward may count its calls
        self.eval()
        try:
            with torch.no_grad():
                self._run(x[:1].clone(), task, None)  # a copy: the forward may write into its input
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:  # a layer, norm or head that cannot take the shape
            raise ValueError(f"x must have a shape the converted model takes, got {list(x.shape)}: {error}") from None
        finally:
            for handle in handles:
                handle.remove()
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for name, value in self.named_buffers():
                    value.copy_(buffers[name])
        self._accepted[key] = min(seen, default=None)
        return self._accepted[key]

    def hat_layers(self) -> list[Layer]:
        return list(self._layers)

    def head_units(self) -> MaskSource | None:
        return self._head_units
