"""HAT under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo ranks on the CPU, each holding half of
every parameter, forget nothing of task 0, end where one process on the whole batches ends, and a run resumed
from a ``torch.distributed.checkpoint`` ends exactly where the uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp_worker import RUNS, run, run_trainer
from torch import Tensor
from torchrun import launch
from toys import toy_tasks

import hatnorm
from hatnorm._shards import fsdp_modules, is_sharded
from hatnorm.distributed import fully_shard, load_sharded, save_sharded
from hatnorm.training import EWC, TrainConfig, train_sequence

WORKER = Path(__file__).with_name("fsdp_worker.py")

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not built into this torch")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What each rank of a 2-process gloo run of tests/fsdp_worker.py under torchrun ended with."""
    return launch(WORKER, tmp_path_factory.mktemp("fsdp"), threads=1)


@pytest.fixture(scope="module")
def one_process() -> dict[tuple[str, str, str], dict[str, Tensor]]:
    """The same runs in this process, on the whole batches, with one intra-op thread as each rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {spec: run(*spec) for spec in RUNS}
    finally:
        torch.set_num_threads(threads)


def load(folder: Path, spec: tuple[str, ...], rank: int) -> dict[str, Tensor]:
    return torch.load(folder / f"{'-'.join(spec)}.rank{rank}.pt")


@needs_gloo
@pytest.mark.parametrize("spec", RUNS, ids=["-".join(spec) for spec in RUNS])
def test_two_sharded_ranks_match_one_process(two_ranks: Path, one_process: dict, spec: tuple[str, str, str]) -> None:
    ranks = [load(two_ranks, spec, r) for r in range(2)]
    single = one_process[spec]
    # each rank held its own half of the parameters (dim 0 cut by torch.chunk: the halves differ by a few rows)
    held = [int(r["held"]) for r in ranks]
    assert sum(held) == int(single["held"]) and max(held) < int(single["held"])
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single.keys() - {"held"}:
        # the whole state, gathered: the ranks agree exactly
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith((".cumulative", ".summative")):
            assert torch.equal(ranks[0][key], single[key]), key
        else:
            # float64: FSDP2 averages the ranks' gradients in another order than one process sums the batch, a
            # rounding of ~1e-16 that HAT's compensation (up to ~1e4) and 8 steps leave below 1e-9
            torch.testing.assert_close(ranks[0][key], single[key], atol=1e-8, rtol=0, msg=key)
    masks = [single[k] for k in single if k.endswith(".cumulative")]
    assert 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)


@needs_gloo
@pytest.mark.parametrize("spec", [s for s in RUNS if s[2] == "hat"], ids=lambda s: "-".join(s))
def test_no_forgetting_under_fsdp(two_ranks: Path, spec: tuple[str, str, str]) -> None:
    """AdamW and SGD with momentum and weight decay move frozen entries of the local shards unless HAT.step
    restores them: task 0's outputs are bit-identical after task 1 on every rank."""
    for rank in range(2):
        result = load(two_ranks, spec, rank)
        assert torch.equal(result["task0_after_task0"], result["task0_after_task1"])
    moved = load(two_ranks, spec, 0)
    head = moved["state.task_heads.heads.1.weight"]
    assert not torch.equal(head, torch.zeros_like(head))


@needs_gloo
def test_resume_from_a_distributed_checkpoint_equals_the_uninterrupted_run(two_ranks: Path) -> None:
    assert (two_ranks / "checkpoint" / ".metadata").is_file()
    for rank in range(2):
        resumed = torch.load(two_ranks / f"resumed.rank{rank}.pt")
        uninterrupted = load(two_ranks, ("adamw", "model", "hat"), rank)
        for key, value in resumed.items():
            assert torch.equal(value, uninterrupted[key]), key


@needs_gloo
def test_train_sequence_with_fsdp_matches_one_process_and_resumes_exactly(two_ranks: Path, tmp_path: Path) -> None:
    ranks = [torch.load(two_ranks / f"trainer.rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_trainer(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0]["result"] == ranks[1]["result"]
    result, expected = ranks[0]["result"], single["result"]
    assert result["accuracy"] == expected["accuracy"] and result["epochs"] == expected["epochs"]
    torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(expected["loss"]), atol=1e-6, rtol=0)
    for key, value in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=0, msg=key)
    assert expected["accuracy"][1][0] == expected["accuracy"][0][0] > 0.8  # learnt, and HAT kept task 0
    # the trainer's checkpoints hold the whole state, gathered from the shards: a run interrupted in the middle
    # of task 1 and resumed from its last one (model, optimizer moments and best weights cut to the shards
    # again) ends bit-identical to the uninterrupted run
    for rank in range(2):
        resumed = torch.load(two_ranks / f"trainer-resumed.rank{rank}.pt")
        assert resumed["result"] == ranks[rank]["result"]
        assert all(torch.equal(v, ranks[rank]["state"][k]) for k, v in resumed["state"].items())


def test_train_config_validates_sharding() -> None:
    assert TrainConfig().sharding == "ddp"
    with pytest.raises(ValueError, match=r"sharding must be one of 'ddp', 'fsdp', got 'zero3'"):
        TrainConfig(sharding="zero3")


def test_fsdp_trains_hat_and_fine_tuning_only(tmp_path: Path) -> None:
    def build() -> torch.nn.Module:
        return hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=16, hidden=(8,))

    with pytest.raises(ValueError, match=r"config.sharding='fsdp' trains HAT and fine-tuning .* got method 'ewc'"):
        train_sequence(build, toy_tasks(2), EWC(), TrainConfig(epochs=1, sharding="fsdp"), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_fully_shard_is_a_no_op_in_one_process() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=8, hidden=(8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fully_shard(model, units=[model.task_heads]) is model
    assert fsdp_modules(model) == [] and not any(is_sharded(p) for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fully_shard_validates_its_arguments() -> None:
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=8, hidden=(8,))
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got str"):
        fully_shard("mlp")
    with pytest.raises(TypeError, match=r"units must be a sequence of submodules of model, got 3"):
        fully_shard(model, units=3)
    with pytest.raises(TypeError, match=r"units must be a sequence of submodules of model \(model itself excluded\)"):
        fully_shard(model, units=[torch.nn.Linear(2, 2)])


def train_steps(model: torch.nn.Module, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, task: int,
                steps: range, total: int = 4) -> None:
    g = torch.Generator().manual_seed(10 + task)
    data = [(torch.randn(8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(total)]
    model.train()
    for b in steps:
        x, y = data[b]
        s = hat.scale(b, total)
        loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
        optimizer.zero_grad()
        loss.backward()
        hat.protect(s)
        hat.step(optimizer)


def make(policy: str) -> tuple[torch.nn.Module, hatnorm.HAT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=8, hidden=(16, 16))
    hat = hatnorm.HAT(model, policy=policy)
    return model, hat, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


@pytest.mark.parametrize("policy", ["hat", "fg_adahat"])
def test_save_and_load_sharded_in_one_process_resume_exactly(tmp_path: Path, policy: str) -> None:
    """Without a process group torch.distributed.checkpoint writes and reads in this process alone. The checkpoint
    holds the model, the optimizer and HAT's state, a step policy's per-unit state included."""
    model, hat, optimizer = make(policy)
    hat.begin_task(0)
    train_steps(model, hat, optimizer, 0, range(4))
    hat.end_task()
    hat.begin_task(1)
    train_steps(model, hat, optimizer, 1, range(2))
    save_sharded(tmp_path / "checkpoint", model, optimizer, hat)
    train_steps(model, hat, optimizer, 1, range(2, 4))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, hat, optimizer = make(policy)
    load_sharded(tmp_path / "checkpoint", model, optimizer, hat)
    assert hat.task == 1 and hat.learned_tasks == [0]
    train_steps(model, hat, optimizer, 1, range(2, 4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_load_sharded_refuses_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    model, hat, optimizer = make("hat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"directory must be a folder save_sharded wrote, got .*no .metadata"):
        load_sharded(tmp_path, model, optimizer, hat)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
