"""Multi-process training: under torchrun with DDP and synchronised norms, two ranks that each see half of
every batch end where one process on the whole batches ends."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_worker import NORMS, run, run_trainer
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torchrun import launch

import hatnorm
from hatnorm.distributed import average_gradients, is_distributed, is_main_process, shard, unwrap, wrap

WORKER = Path(__file__).with_name("distributed_worker.py")
# the norms whose earlier tasks' outputs must not change (the shared and post-gate baselines may forget)
TASK_AWARE = tuple(n for n in NORMS if hatnorm.get_norm(n).isolates_tasks)

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What each rank of a 2-process gloo run under torchrun ended with, one file per norm and rank."""
    return launch(WORKER, tmp_path_factory.mktemp("ddp"))


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, as torchrun gives each rank: these tiny models run faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, Tensor]]:
    with one_thread():
        return {norm: run(norm) for norm in NORMS}


def batch_norms(model: torch.nn.Module) -> list[hatnorm.MaskedNorm]:
    return [m for m in model.modules() if isinstance(m, hatnorm.MaskedNorm) and m.batch_statistics]


def load(folder: Path, norm: str, rank: int) -> dict[str, Tensor]:
    return torch.load(folder / f"{norm}.rank{rank}.pt")


@needs_gloo
@pytest.mark.parametrize("norm", NORMS)
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(
    two_ranks: Path, one_process: dict[str, dict[str, Tensor]], norm: str
) -> None:
    ranks = [load(two_ranks, norm, r) for r in range(2)]
    single = one_process[norm]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single:
        # the ranks stay in step: same parameters, statistics and masks without any buffer broadcast
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith((".cumulative", ".summative")):
            assert torch.equal(ranks[0][key], single[key]), key
        else:
            torch.testing.assert_close(ranks[0][key], single[key], atol=1e-5, rtol=0, msg=key)
    # the run really moved statistics and learned masks
    assert any(single[k].abs().sum() > 0 for k in single if k.endswith("running_mean"))
    masks = [single[k] for k in single if k.endswith(".cumulative")]
    assert 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)


@needs_gloo
def test_fg_adahat_ranks_agree_on_activation_importance_and_stay_in_step(two_ranks: Path) -> None:
    # each rank reads the activations of its own half of the batch; at task end the ranks average their
    # importances, so the rates of task 1, and every weight after it, are the same on both (FG-AdaHAT is soft:
    # task 0's outputs may move)
    ranks = [load(two_ranks, "fg_adahat", r) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("summed.") for k in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@needs_gloo
@pytest.mark.parametrize("norm", TASK_AWARE)
def test_no_forgetting_under_ddp(two_ranks: Path, one_process: dict[str, dict[str, Tensor]], norm: str) -> None:
    for result in (load(two_ranks, norm, 0), one_process[norm]):
        assert torch.equal(result["task0_after_task0"], result["task0_after_task1"])


@needs_gloo
def test_train_sequence_under_torchrun_matches_one_process(two_ranks: Path, tmp_path: Path) -> None:
    ranks = [torch.load(two_ranks / f"trainer.rank{r}.pt") for r in range(2)]
    with one_thread():
        single = run_trainer(tmp_path)
    assert ranks[0]["result"] == ranks[1]["result"]
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=0, msg=key)
    result, expected = ranks[0]["result"], single["result"]
    assert result["accuracy"] == expected["accuracy"] and result["epochs"] == expected["epochs"]
    torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(expected["loss"]), atol=1e-6, rtol=0)
    # rank 0 wrote the results; HAT kept task 0 through task 1
    assert json.loads((two_ranks / "trainer" / "results.json").read_text())["accuracy"] == expected["accuracy"]
    assert expected["accuracy"][1][0] == expected["accuracy"][0][0] > 0.8  # learnt: the toy classes have a gap


def test_convert_sync_is_a_no_op_in_one_process() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    model = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=3, base_width=4)
    twin = copy.deepcopy(model)
    assert hatnorm.convert_sync(model) is model
    assert all(m.process_group is None for m in batch_norms(model))
    assert wrap(model) is model
    assert not is_distributed()
    x = torch.randn(4, 3, 16, 16)
    assert shard(x) is x
    model.train()
    twin.train()
    assert torch.equal(model(x, task=1, s=3.0), twin(x, task=1, s=3.0))
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_convert_sync_validates_its_arguments() -> None:
    model = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=3, base_width=4)
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got str"):
        hatnorm.convert_sync("resnet18")
    with pytest.raises(TypeError, match=r"process_group must be None .* got 3 of type int"):
        hatnorm.convert_sync(model, process_group=3)
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got dict"):
        unwrap({})
    with pytest.raises(TypeError, match=r"batch must be a tensor whose dim 0 is the batch, got a 0-D tensor"):
        shard(torch.tensor(1.0))


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A gloo process group of world size 1 in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_convert_sync_is_a_no_op_with_one_rank(one_rank: None) -> None:
    model = hatnorm.build("resnet18", num_tasks=2, norm="task_bn", num_classes=3, base_width=4)
    assert hatnorm.convert_sync(model) is model
    assert all(m.process_group is None for m in batch_norms(model))
    assert wrap(model) is model
    assert is_main_process() and not is_distributed()
    model.train()
    model(torch.randn(4, 3, 16, 16), task=0, s=2.0).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    average_gradients(model)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    with pytest.raises(TypeError, match="process_group must be None"):
        hatnorm.convert_sync(model, process_group="world")


@needs_gloo
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3, 3)])
def test_sync_batch_norm_over_one_rank_is_selective_batch_norm(one_rank: None, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    weight, bias = torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)
    selected = torch.tensor([True, False, True, True, False])
    stats = [torch.randn(5), torch.rand(5) + 0.5]
    ours = [s.clone() for s in stats]
    reference = [s.clone() for s in stats]
    out = hatnorm.functional.sync_batch_norm(x, selected, weight, bias, *ours, momentum=0.3, eps=1e-5,
                                  process_group=dist.group.WORLD)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    expected = hatnorm.functional.selective_batch_norm(x, selected, weight, bias, *reference, training=True,
                                                       momentum=0.3, eps=1e-5)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, weight, bias))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
    for s, r, before in zip(ours, reference, stats, strict=True):
        torch.testing.assert_close(s, r, atol=1e-6, rtol=1e-6)
        assert torch.equal(s[~selected], before[~selected])


@needs_gloo
def test_hat_unwraps_ddp(one_rank: None) -> None:
    model = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=3, base_width=4)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    hat = hatnorm.HAT(ddp)
    assert hat.model is model and unwrap(ddp) is model
    hat.begin_task(1)
    assert "task_heads.heads.0.weight" in hat.gradient_multipliers()
    model.train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss = hat.loss(F.cross_entropy(ddp(x, task=1, s=2.0), y), 2.0)
    loss.backward()
    hat.protect(2.0)
    frozen_head = model.task_heads.heads[0].weight.grad
    assert frozen_head is None or not frozen_head.any()
    assert model.task_heads.heads[1].weight.grad.abs().sum() > 0
