"""Nothing silent in the ablation commands, round 2: resume and merge compare every option that changes a
number, saved source networks are reused only for the same source, a merge never overwrites its inputs, and
``--weights`` is checked against every model it starts and never runs code."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import ViTForImageClassification

import hatnorm
from ablations import layernorm, norms, policy, pretrained, report
from hatnorm.training import TrainConfig

TINY = ["--tasks", "2", "--epochs", "1", "--seeds", "0"]
ALEXNET = [*TINY[:4], "--archs", "alexnet", "--norms", "masked_bn"]
LAYERNORM = [*TINY, "--dim", "8", "--depth", "1", "--num-heads", "2", "--norms", "masked_ln"]


def quiet() -> Console:
    return Console(file=io.StringIO())


def alexnet_trunk(seed: int, norm: str = "shared_bn") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = hatnorm.build("alexnet", num_tasks=2, norm=norm, num_classes=2, width=0.05, in_channels=1)
    return pretrained.trunk_state(model)


def saved(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_pretrained_resumed_with_other_weights_is_refused_and_records_them(tmp_path, capsys) -> None:
    first, other = saved(alexnet_trunk(1), tmp_path / "a.pt"), saved(alexnet_trunk(2), tmp_path / "b.pt")
    argv = [*TINY, "--arch", "alexnet", "--width", "0.05", "--out", str(tmp_path / "out")]
    pretrained.main([*argv, "--weights", str(first)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["weights"] == str(first) and results["options"]["weights"]["sha256"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"--resume: .*initial_sha256: '[0-9a-f]{64}' in the checkpoint"):
        pretrained.main([*argv, "--weights", str(other), "--resume"])


def test_layernorm_resumed_with_other_hf_weights_is_refused(tmp_path) -> None:
    sizes = {"channels": 1, "size": 32, "patch_size": 8, "dim": 8, "depth": 1, "num_heads": 2}
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(saved(ViTForImageClassification(layernorm.hf_config(**sizes)).state_dict(),
                           tmp_path / f"vit{seed}.pt"))
    argv = [*LAYERNORM, "--out", str(tmp_path / "out")]
    layernorm.main([*argv, "--hf-weights", str(paths[0])])
    with pytest.raises(SystemExit, match=r"--resume: .*initial_sha256: "):
        layernorm.main([*argv, "--hf-weights", str(paths[1]), "--resume"])


def test_policy_resumed_with_another_alpha_is_refused(tmp_path) -> None:
    argv = [*TINY, "--norms", "masked_bn", "--width", "0.05", "--out", str(tmp_path)]
    policy.main([*argv, "--alpha", "0.1"])
    with pytest.raises(SystemExit, match=r"method\.policy\.alpha: 0\.1 in the checkpoint, 50\.0 in this run"):
        policy.main([*argv, "--alpha", "50", "--resume"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny AlexNet runs of the norms ablation: seed 0 and 1 alike, seed 1 with another width, another ``--c``."""
    folder = tmp_path_factory.mktemp("runs")
    for name, extra in {"a": ["--seeds", "0", "--alexnet-width", "0.05"],
                        "b": ["--seeds", "1", "--alexnet-width", "0.05"],
                        "wide": ["--seeds", "1", "--alexnet-width", "0.1"],
                        "c": ["--seeds", "1", "--alexnet-width", "0.05", "--c", "0.5"]}.items():
        norms.main([*ALEXNET, *extra, "--out", str(folder / name)])
    return folder


def test_results_store_every_option_that_changes_a_number(runs: Path) -> None:
    options = json.loads((runs / "wide" / "results.json").read_text())["options"]
    assert options["alexnet_width"] == 0.1 and options["c"] == 0.75 and options["resnet_width"] == 4
    assert "out" not in options and "seeds" not in options and "resume" not in options


@pytest.mark.parametrize(("other", "message"), [
    ("wide", "--alexnet-width 0.1 differs from"),
    ("c", "--c 0.5 differs from"),
])
def test_runs_that_differ_in_an_option_are_not_merged(runs: Path, other: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        report.main(["--merge", str(runs / f"merged_{other}"), str(runs / "a"), str(runs / other)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (runs / f"merged_{other}").exists()


def test_a_merge_into_one_of_its_inputs_is_refused(runs: Path, capsys) -> None:
    before = (runs / "a" / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        report.main(["--merge", str(runs / "a"), str(runs / "a"), str(runs / "b")])
    assert exit_.value.code == 2
    assert f"--merge: {runs / 'a'} is one of the runs to merge" in capsys.readouterr().err
    assert (runs / "a" / "results.json").read_bytes() == before


def test_a_saved_source_network_is_reused_only_for_the_same_source(tmp_path) -> None:
    options = {"width": 0.05, "in_channels": 1, "size": 32}
    config = TrainConfig(epochs=1, batch_size=64)
    log = io.StringIO()
    path = pretrained.pretrain("alexnet", options, 0, config, tmp_path, Console(file=log), source_tasks=1,
                               channels=1)
    one_task = path.read_bytes()
    pretrained.pretrain("alexnet", options, 0, config, tmp_path, Console(file=log), source_tasks=1, channels=1)
    assert "reusing" in log.getvalue()
    log = io.StringIO()
    pretrained.pretrain("alexnet", options, 0, config, tmp_path, Console(file=log), source_tasks=2, channels=1)
    assert "reusing" not in log.getvalue()
    assert "was pretrained on 1 source task" in log.getvalue()
    assert path.read_bytes() != one_task


def test_a_saved_transformers_network_is_reused_only_for_the_same_source(tmp_path) -> None:
    config = layernorm.hf_config(channels=1, size=32, patch_size=8, dim=8, depth=1, num_heads=2)
    train = TrainConfig(epochs=1, batch_size=64)
    path, log = tmp_path / "vit_hf.pt", io.StringIO()
    layernorm.pretrain_hf(config, 0, train, path, Console(file=log), source_tasks=1)
    one_task = path.read_bytes()
    layernorm.pretrain_hf(config, 0, train, path, Console(file=log), source_tasks=2)
    assert "reusing" not in log.getvalue() and path.read_bytes() != one_task


def test_weights_are_checked_against_every_variant(tmp_path, capsys) -> None:
    # per-task BN's γ is [tasks, C]: it fits the per-task BN variant, not the masked BN one after it
    path = saved(alexnet_trunk(0, "task_bn"), tmp_path / "task_bn.pt")
    with pytest.raises(SystemExit) as exit_:
        norms.main([*TINY, "--archs", "alexnet", "--alexnet-width", "0.05", "--norms", "task_bn", "masked_bn",
                    "--weights", str(path), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert f"--weights: {path} does not fit the model" in captured.err and "alexnet HAT masked BN" in captured.err
    assert "train loss" not in captured.out


class _Touch:
    """Unpickled, it would create a file: what a malicious checkpoint does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_pickle_that_runs_code_is_refused_with_the_cli_message(tmp_path, capsys) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"convs.0.weight": _Touch(marker)}, protocol=2))
    with pytest.raises(SystemExit) as exit_:
        norms.main([*ALEXNET, "--seeds", "0", "--alexnet-width", "0.05", "--weights", str(path),
                    "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--weights: {path} is not a plain state dict" in err and "refused without running it" in err
    assert "weights_only` set to `False`" not in err  # no advice to load it unsafely
    assert not marker.exists()
