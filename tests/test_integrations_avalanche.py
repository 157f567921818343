"""hatnorm.integrations.avalanche: two experiences of a task-incremental stream trained by Avalanche's Naive
strategy with HATPlugin keep task 0 bit-identical and give the hand loop's weights."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import task_incremental_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from test_integrations import (
    assert_kept_task_zero,
    assert_same_weights,
    hand_loop,
    sgd,
    task_zero,
    tiny_model,
    tiny_tasks,
)
from torch.utils.data import TensorDataset

import hatnorm
from hatnorm.integrations.avalanche import HATMultiTaskModule, HATPlugin


class Labelled(TensorDataset):
    """A TensorDataset with the ``targets`` Avalanche reads."""

    @property
    def targets(self) -> list[int]:
        return self.tensors[1].tolist()


def stream(tasks: list[TensorDataset]):
    """The tasks as a task-incremental Avalanche stream: experience ``k`` has task label ``k``."""
    data = [as_classification_dataset(Labelled(*t.tensors)) for t in tasks]
    return with_classes_timeline(task_incremental_benchmark(benchmark_from_datasets(train=data))).train_stream


@pytest.mark.parametrize("reset", [False, True], ids=["kept-optimizer-state", "reset-optimizer-state"])
def test_two_experiences_keep_task_zero_and_match_the_hand_loop(reset: bool) -> None:
    module = HATMultiTaskModule(tiny_model())
    hat = hatnorm.HAT(module.model)
    strategy = Naive(model=module, optimizer=sgd(module), criterion=torch.nn.CrossEntropyLoss(), train_mb_size=8,
                     train_epochs=2, device="cpu", plugins=[HATPlugin(hat)], evaluator=EvaluationPlugin(loggers=[]))
    outputs = []
    for experience in stream(tiny_tasks()):
        strategy.train(experience, shuffle=False, eval_streams=[], reset_optimizer_state=reset)
        outputs.append(task_zero(module.model))
    assert hat.learned_tasks == [0, 1]
    assert_kept_task_zero(outputs)
    reference = tiny_model()
    hand_loop(reference, tiny_tasks(), keep_optimizer=not reset)
    assert_same_weights(module.model, reference)


def test_the_adapter_routes_each_samples_task_label() -> None:
    module = HATMultiTaskModule(tiny_model()).eval()
    module.max_class_label = 2
    x = torch.randn(5, 8)
    labels = torch.tensor([0, 1, 1, 0, 1])
    out = module(x, labels)
    for t in (0, 1):
        assert torch.equal(out[labels == t], module.model(x[labels == t], task=t))
