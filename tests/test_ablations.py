"""End to end: the ablation scripts at a tiny size, and their command line."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from fake_cifar import write_fake_cifar
from transformers import ViTForImageClassification

import hatnorm
from ablations import __main__ as cli
from ablations import (
    _cli,
    _runner,
    channelnorm,
    cifar,
    curves,
    depth,
    layernorm,
    norms,
    policy,
    pretrained,
    report,
    sweep,
)
from ablations._protocol import holm, paired_t_pvalue, sign_flip_pvalue
from hatnorm.stats import paired_difference, summarize
from hatnorm.training import TrainConfig

TINY = ["--tasks", "2", "--epochs", "1", "--seeds", "0"]
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def test_default_ablation_at_a_tiny_size(tmp_path, capsys) -> None:
    results = norms.main([*TINY, "--out", str(tmp_path), "--resnet-width", "2", "--alexnet-width", "0.05",
                          "--norms", "shared_bn", "masked_bn", "task_bn"])
    out = capsys.readouterr().out
    assert "Norms under HAT" in out and "resnet18 HAT masked BN" in out and "alexnet SGD" in out
    assert "This is a smoke-size run" in out and "docs/ablations.md" in out
    for name in ("results.json", "results.csv", "contrasts.csv", "forgetting_ratio.png", "accuracy_matrices.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["variants"]) == set(results["variants"]) and len(results["variants"]) == 2 * 4
    for label, r in results["variants"].items():
        run = r["runs"]["0"]
        assert len(run["accuracy"]) == 2 and len(run["rho"]) == 2
        # HAT with a task-aware norm has zero backward transfer, exactly
        if "masked BN" in label or "per-task BN" in label:
            assert run["bwt"] == 0.0
            assert run["accuracy"][1][0] == run["accuracy"][0][0]
        # one seed: the mean is the run's value, and there is no interval
        assert r["summary"]["bwt"]["mean"] == run["bwt"] and math.isnan(r["summary"]["bwt"]["low"])
    # every run also wrote its own files after every task, under its seed's folder
    assert (tmp_path / "seed_0" / "resnet18_hat_masked_bn" / "accuracy.csv").read_text().count("\n") == 3


def test_several_seeds_give_means_intervals_and_paired_contrasts(tmp_path, capsys) -> None:
    results = norms.main(["--tasks", "2", "--epochs", "1", "--seeds", "3", "4", "--archs", "alexnet",
                          "--alexnet-width", "0.05", "--norms", "shared_bn", "masked_bn", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "seeds 3, 4" in out and "mean ± 95% CI half-width over 2 seeds" in out and "Paired contrasts" in out
    variants = results["variants"]
    masked, shared = variants["alexnet HAT masked BN"], variants["alexnet HAT shared BN"]
    for r in (masked, shared):
        values = [r["runs"][seed]["average_accuracy"] for seed in ("3", "4")]
        assert r["summary"]["average_accuracy"] == summarize(values).to_dict()
    # the contrast pairs the seeds: its mean is the mean of the per-seed differences
    contrast = next(c for c in results["contrasts"]
                    if (c["a"], c["b"], c["metric"]) == ("alexnet HAT masked BN", "alexnet HAT shared BN", "bwt"))
    differences = [masked["runs"][s]["bwt"] - shared["runs"][s]["bwt"] for s in ("3", "4")]
    assert contrast["difference"] == paired_difference(
        [masked["runs"][s]["bwt"] for s in ("3", "4")], [shared["runs"][s]["bwt"] for s in ("3", "4")]).to_dict()
    assert contrast["difference"]["mean"] == pytest.approx(sum(differences) / 2)
    # declared primary (masked − shared BN on BWT): its paired-t p-value, Holm-adjusted over the table's primaries
    primaries = [c for c in results["contrasts"] if c["primary"]]
    assert contrast["primary"] and contrast["p_t"] == pytest.approx(paired_t_pvalue(differences))
    assert [c["p_holm"] for c in primaries] == pytest.approx(holm([c["p_t"] for c in primaries]), nan_ok=True)
    assert contrast["finding"] == (contrast["p_holm"] < 0.05)
    assert contrast["p_sign_flip"] == sign_flip_pvalue(differences) >= 0.5  # 2 seeds: 2 of 4 sign patterns at least
    # every other metric of the pair is exploratory: no adjusted p-value, never a finding
    exploratory = next(c for c in results["contrasts"] if (c["a"], c["b"], c["metric"]) == (
        "alexnet HAT masked BN", "alexnet HAT shared BN", "average_accuracy"))
    assert not exploratory["primary"] and exploratory["p_holm"] is None and not exploratory["finding"]
    with (tmp_path / "results.csv").open() as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    assert rows["alexnet HAT masked BN"]["seeds"] == "2"
    low = float(rows["alexnet HAT masked BN"]["bwt_ci_low"])
    assert low == pytest.approx(masked["summary"]["bwt"]["low"], abs=1e-6)
    assert (tmp_path / "contrasts.csv").read_text().count("\n") == 1 + len(results["contrasts"])
    assert (tmp_path / "seed_3" / "results.json").exists() and (tmp_path / "seed_4" / "results.json").exists()
    # the Markdown the docs show, made from the files
    (tmp_path / "forgetting_ratio.png").unlink()
    report.main(["--plot", str(tmp_path)])
    markdown = capsys.readouterr().out
    assert (tmp_path / "forgetting_ratio.png").stat().st_size > 0  # redrawn from the files
    assert "seeds 3, 4; wall time" in markdown and "| alexnet HAT masked BN | " in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| alexnet HAT masked BN − alexnet HAT shared "
                                                                           "BN | BWT |"))
    assert ("**yes**" in row) == contrast["finding"] and "| primary |" in row
    assert "task-incremental: one head per task, the task id given at test" in markdown
    assert "Command: `python -m ablations.norms --tasks 2" in markdown


def test_runs_on_other_seeds_merge_into_one_summary(tmp_path, capsys) -> None:
    tiny = ["--tasks", "2", "--epochs", "1", "--archs", "alexnet", "--alexnet-width", "0.05", "--norms", "masked_bn"]
    first = norms.main([*tiny, "--seeds", "0", "--out", str(tmp_path / "a")])
    second = norms.main([*tiny, "--seeds", "1", "--out", str(tmp_path / "b")])
    report.main(["--merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert "seeds 0, 1; wall time" in capsys.readouterr().out
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["seeds"] == [0, 1] and (tmp_path / "all" / "forgetting_ratio.png").exists()
    label = "alexnet HAT masked BN"
    values = [first["variants"][label]["runs"]["0"]["average_accuracy"],
              second["variants"][label]["runs"]["1"]["average_accuracy"]]
    assert merged["variants"][label]["summary"]["average_accuracy"] == summarize(values).to_dict()
    with pytest.raises(SystemExit) as exit_:
        report.main(["--merge", str(tmp_path / "again"), str(tmp_path / "a"), str(tmp_path / "all")])
    assert exit_.value.code == 2 and "seed 0 is in two of the runs" in capsys.readouterr().err


def test_runs_whose_tasks_follow_the_seed_merge_too(tmp_path, capsys) -> None:
    # Rotated-MNIST draws each seed's angles, so the task names differ between seeds; the sequence is the same
    tiny = ["--tasks", "2", "--epochs", "1", "--archs", "alexnet", "--alexnet-width", "0.05", "--norms", "masked_bn",
            "--data", "rotated_mnist"]
    norms.main([*tiny, "--seeds", "0", "--out", str(tmp_path / "a")])
    norms.main([*tiny, "--seeds", "1", "--out", str(tmp_path / "b")])
    names = [json.loads((tmp_path / run / "results.json").read_text())["tasks"] for run in ("a", "b")]
    assert names[0] != names[1]
    report.main(["--merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b")])
    assert json.loads((tmp_path / "all" / "results.json").read_text())["seeds"] == [0, 1]
    norms.main([*tiny[:-2], "--seeds", "2", "--out", str(tmp_path / "c")])  # Split-MNIST: another sequence
    with pytest.raises(SystemExit):
        report.main(["--merge", str(tmp_path / "mixed"), str(tmp_path / "a"), str(tmp_path / "c")])
    assert "is not the same ablation and sequence" in capsys.readouterr().err


def test_presets_and_optimizers_resolve_to_the_training_settings() -> None:
    cnn = _cli.Budget(smoke=4, converged=100)

    def settings(*argv: str, budget: _cli.Budget = cnn) -> TrainConfig:
        return _cli.config(_cli.parser("p", "", budget=budget, out="runs").parse_args(list(argv)))

    assert settings() == TrainConfig(epochs=4, seed=0)  # the smoke run: the reference schedule, 4 epochs
    assert settings("--preset", "converged") == TrainConfig(epochs=100, patience=3, lr_min=5e-4)
    assert settings("--preset", "converged", "--patience", "5", "--epochs", "50") == TrainConfig(
        epochs=50, patience=5, lr_min=5e-4)
    vit = _cli.Budget(smoke=4, converged=30, optimizer="adamw")
    assert settings(budget=vit) == TrainConfig(epochs=4, optimizer="adamw", schedule="cosine", lr=1e-3,
                                               weight_decay=0.05, warmup_epochs=1)
    assert settings("--epochs", "1", budget=vit).warmup_epochs == 0  # the default warmup fits one epoch
    assert settings("--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "5e-4", budget=vit) == TrainConfig(
        epochs=4, momentum=0.9, weight_decay=5e-4)
    assert settings("--seeds", "7", "8").seed == 7
    tuned = _cli.Budget(smoke=4, converged=20, optimizer="adamw", lr=2e-3)  # the architecture's own lr
    assert settings(budget=tuned).lr == 2e-3 and settings("--lr", "1e-4", budget=tuned).lr == 1e-4
    assert settings("--optimizer", "sgd", budget=tuned).lr == 0.05  # another optimizer: its own default


@pytest.mark.parametrize("module", [layernorm, sweep, policy])
def test_other_ablations_run(module, tmp_path) -> None:
    extra = {layernorm: ["--dim", "8", "--depth", "1", "--norms", "masked_ln", "--stem", "conv", "--source-tasks", "1",
                         "--c", "0.75"],
             sweep: ["--width", "0.05", "--s-max", "100", "--c", "0.5"],
             policy: ["--width", "0.05", "--norms", "masked_bn"]}[module]
    results = module.main([*TINY, "--out", str(tmp_path), *extra])
    assert results["variants"] and (tmp_path / "forgetting_ratio.png").exists()
    for label, r in results["variants"].items():
        A = r["runs"]["0"]["accuracy"]
        assert all(0.0 <= a <= 1.0 for row in A for a in row if a == a)
        # BWT is what the accuracy matrix says, for every variant
        assert r["runs"]["0"]["bwt"] == pytest.approx(A[1][0] - A[0][0], abs=1e-12)
        if _hat_guarantees_no_forgetting(label):
            assert r["runs"]["0"]["bwt"] == 0.0


def test_reference_mode_from_the_command_line(tmp_path) -> None:
    results = sweep.main([*TINY, "--out", str(tmp_path), "--width", "0.05", "--s-max", "100", "--c", "0.5",
                          "--reference"])
    assert json.loads((tmp_path / "results.json").read_text())["reference"] is True
    run = json.loads((tmp_path / "seed_0" / "s_max_100" / "results.json").read_text())
    assert run["options"]["reference"] is True and run["method"] == "hat"
    # soft masks forget a little by design: what is checked is that the run is consistent
    for r in results["variants"].values():
        A = r["runs"]["0"]["accuracy"]
        assert r["runs"]["0"]["bwt"] == pytest.approx(A[1][0] - A[0][0], abs=1e-12)


def test_the_pretrained_ablation_starts_from_a_source_network(tmp_path, capsys) -> None:
    results = pretrained.main([*TINY, "--out", str(tmp_path), "--arch", "alexnet", "--width", "0.05",
                               "--source-tasks", "1"])
    out = capsys.readouterr().out
    assert "pretraining, seed 0: source test accuracy" in out and "Pretrained BN under HAT" in out
    assert "from 1 rotated copies of the digits" in out
    saved = torch.load(tmp_path / "seed_0" / "pretrained.pt", weights_only=True)
    assert "convs.0.weight" in saved and "norms.0.running_mean" in saved
    assert not any(k.startswith(("gates.", "task_heads.")) for k in saved)  # what an ordinary checkpoint holds
    # every start with both norms, and the transfer check's two SGD runs
    assert len(results["variants"]) == 2 * len(pretrained.STARTS) + 2
    for label, r in results["variants"].items():
        if " SGD, " not in label:
            assert r["runs"]["0"]["bwt"] == 0.0  # HAT's hard policy with a task-aware norm, any start
    primaries = {(c["a"], c["b"]) for c in results["contrasts"] if c["primary"]}
    control = "alexnet masked BN, stats re-estimated, γβ copied"
    assert primaries >= {("alexnet SGD, stats re-estimated, γβ copied", "alexnet SGD, random init"),
                         (control, "alexnet masked BN, stats kept, γβ copied"),
                         (control, "alexnet masked BN, stats re-estimated, γβ reset"),
                         (control, "alexnet masked BN, random init")}
    # a second run reuses the seed's source network
    pretrained.main([*TINY, "--out", str(tmp_path), "--arch", "alexnet", "--width", "0.05", "--source-tasks", "1",
                     "--resume"])
    assert "pretraining, seed 0: reusing" in capsys.readouterr().out


def test_every_start_does_what_it_says() -> None:
    def fresh(norm: str = "masked_bn") -> torch.nn.Module:
        return hatnorm.build("alexnet", num_tasks=2, norm=norm, num_classes=2, width=0.05, in_channels=1)

    # an ordinary network's checkpoint: one BatchNorm state per layer
    source = pretrained.trunk_state(fresh("shared_bn"))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.items()}
    state = {k: v.abs() + 0.5 if "running_var" in k else v for k, v in state.items()}
    path = _saved(state)
    for how in pretrained.STARTS[1:]:
        model = fresh()
        pretrained.start(how, lambda seed: path)(model, 0)
        norm = model.norms[0]
        for t in range(2):  # the source's statistics in every task slot
            assert torch.equal(norm.running_var[t], state["norms.0.running_var"]), how
        reset = how.endswith("γβ reset")
        assert torch.equal(norm.weight, torch.ones_like(norm.weight) if reset else state["norms.0.weight"]), how
        assert norm.frozen == (how.startswith("stats kept") or how == "BN frozen"), how
        assert norm.weight.requires_grad == (how != "BN frozen"), how
        hatnorm.open_gates(model)  # every unit selected: a masked BN whose statistics follow the batch moves them all
        model.train()
        before = norm.running_mean.clone()
        out = model(torch.randn(4, 1, 32, 32), task=0, s=400.0)
        # kept statistics never move in training; re-estimated ones follow the batches
        assert torch.equal(norm.running_mean, before) == norm.frozen, how
        out.sum().backward()
        assert (norm.weight.grad is not None) == (how != "BN frozen"), how
    assert pretrained.start("random init", lambda seed: path) is None
    with pytest.raises(ValueError, match=r"how must be one of \['random init', .*\], got 'BN copied'"):
        pretrained.start("BN copied", lambda seed: path)


def test_the_rotated_source_is_the_training_digits_in_other_poses() -> None:
    """The default source: every training digit of the embedded MNIST (never a test image) once per copy, rotated
    away from upright, with its digit as the label."""
    train = [t.train for t in hatnorm.data.split_mnist(num_tasks=5)]
    labels = torch.cat([d.tensors[1] + 2 * k for k, d in enumerate(train)])
    images = torch.cat([d.tensors[0] for d in train])
    source = pretrained.source_task(0, 2, 1, "rotated")
    assert len(source.train) == 2 * len(images) and source.num_classes == 10
    assert torch.equal(source.train.tensors[1], labels.repeat(2))
    copies = source.train.tensors[0].split(len(images))
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[0], images)
    # the same seed, the same angles; another seed, others
    assert torch.equal(pretrained.source_task(0, 2, 1, "rotated").train.tensors[0], source.train.tensors[0])
    assert not torch.equal(pretrained.source_task(1, 2, 1, "rotated").train.tensors[0], source.train.tensors[0])


def _saved(state: dict) -> Path:
    path = Path(tempfile.mkdtemp()) / "weights.pt"
    torch.save(state, path)
    return path


def test_weights_start_every_model_from_a_torchvision_checkpoint(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = hatnorm.build("resnet18", num_tasks=2, norm="masked_bn", num_classes=2, base_width=64, in_channels=3,
                          stem="imagenet")
    left_out = _runner.load_weights(model, _runner.read_weights(path), str(path))
    assert left_out[:2] == ["bn1.num_batches_tracked", "fc.bias"] and "fc.weight" in left_out
    assert torch.equal(model.conv1.weight, net.conv1.weight)
    for t in range(2):  # plain BatchNorm statistics in every task slot
        assert torch.equal(model.layer1[0].bn1.running_mean[t], net.layer1[0].bn1.running_mean)
    write_fake_cifar(tmp_path / "data", train_per_class=6, test_per_class=2)
    norms.main(["--data", "cifar", "--data-root", str(tmp_path / "data"), "--unverified-data", "--tasks", "1",
                "--epochs", "1",
                "--batch-size", "8", "--archs", "resnet18", "--resnet-width", "64", "--resnet-stem", "imagenet",
                "--norms", "masked_bn", "--weights", str(path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert f"--weights: every model starts from {path} (" in out and "fc.bias, fc.weight; 20 BatchNorm step" in out
    saved = json.loads((tmp_path / "out" / "seed_0" / "resnet18_hat_masked_bn" / "results.json").read_text())
    assert saved["weights"].startswith(f"{path} (sha256 ")
    # another width does not fit: refused before training, naming the file
    with pytest.raises(SystemExit) as exit_:
        norms.main(["--data", "cifar", "--data-root", str(tmp_path / "data"), "--unverified-data", "--tasks", "1",
                    "--archs", "resnet18",
                    "--resnet-width", "8", "--resnet-stem", "imagenet", "--weights", str(path), "--out",
                    str(tmp_path / "other")])
    assert exit_.value.code == 2
    assert (f"--weights: {path} does not fit the model (another width, stem or input channels?): conv1.weight is "
            "[64, 3, 7, 7] there and [8, 3, 7, 7] in the model, and ") in capsys.readouterr().err


def test_the_layernorm_ablation_converts_a_transformers_vit_from_a_saved_state_dict(tmp_path, capsys) -> None:
    sizes = {"channels": 1, "size": 32, "patch_size": 8, "dim": 8, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    hf = ViTForImageClassification(layernorm.hf_config(**sizes))
    with torch.no_grad():  # LayerNorm parameters a pretrained model would have, not the initial 1 and 0
        for m in hf.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    path = tmp_path / "vit.pt"
    torch.save(hf.state_dict(), path)
    tiny = [*TINY, "--dim", "8", "--depth", "1", "--num-heads", "2", "--norms", "masked_ln", "--positions", "pre",
            "--c", "0.75"]
    results = layernorm.main([*tiny, "--hf-weights", str(path), "--out", str(tmp_path / "out")])
    label = "transformers ViT HAT masked LN (converted)"
    assert results["variants"][label]["runs"]["0"]["bwt"] == 0.0  # converted with masked LN: nothing forgotten
    assert {(c["a"], c["b"]) for c in results["contrasts"]} >= {(label, "vit_micro HAT masked LN")}
    assert not (tmp_path / "out" / "seed_0" / "vit_hf.pt").exists()  # the given weights, no pretraining
    assert "pretraining" not in capsys.readouterr().out
    # the variant's model is the saved one, converted: open gates (and the original classifier as the head)
    # reproduce it
    model = layernorm.converted(layernorm.hf_config(**sizes), lambda seed: path)(2, "masked_ln", [10, 10], 0).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        hatnorm.open_gates(model)
        model.task_heads.heads[1].load_state_dict(hf.classifier.state_dict())
        expected = hf.eval()(pixel_values=x).logits
        assert torch.allclose(model(x, task=1, s=400.0), expected, atol=1e-5)
    # a state dict of other sizes is refused before training, naming the option
    torch.save(ViTForImageClassification(layernorm.hf_config(**(sizes | {"dim": 12}))).state_dict(), path)
    with pytest.raises(SystemExit) as exit_:
        layernorm.main([*tiny, "--hf-weights", str(path), "--out", str(tmp_path / "other")])
    assert exit_.value.code == 2
    assert f"--hf-weights: {path} does not fit a ViTForImageClassification of the ablation's sizes" in \
        capsys.readouterr().err


def test_the_layernorm_ablation_puts_the_norm_before_and_after_each_block(tmp_path) -> None:
    results = layernorm.main([*TINY, "--dim", "8", "--depth", "1", "--num-heads", "2", "--norms", "shared_ln",
                              "masked_ln", "--no-converted", "--out", str(tmp_path)])
    variants = results["variants"]
    assert list(variants) == [
        "vit_micro HAT shared LN c=0.1", "vit_micro HAT masked LN c=0.1", "vit_micro HAT shared LN c=0.75",
        "vit_micro HAT masked LN c=0.75", "vit_micro SGD", "vit_micro post-norm HAT shared LN c=0.1",
        "vit_micro post-norm HAT masked LN c=0.1", "vit_micro post-norm HAT shared LN c=0.75",
        "vit_micro post-norm HAT masked LN c=0.75", "vit_micro post-norm SGD"]
    for label, r in variants.items():
        if "masked LN" in label or ("SGD" not in label and "post-norm" not in label):
            assert r["runs"]["0"]["bwt"] == 0.0, label  # masked LN anywhere, and every pre-norm LN, by construction
    saved = json.loads((tmp_path / "seed_0" / "vit_micro_post_norm_hat_masked_ln_c_0_1" / "results.json").read_text())
    assert saved["options"]["norm_position"] == "post"
    primaries = {(c["a"], c["b"], c["metric"]) for c in results["contrasts"] if c["primary"]}
    assert primaries == {(f"vit_micro post-norm HAT masked LN c={c}", f"vit_micro post-norm HAT shared LN c={c}", "bwt")
                         for c in ("0.1", "0.75")}


def test_the_channel_norm_ablation_contrasts_masked_and_every_channel_forms(tmp_path) -> None:
    results = channelnorm.main([*TINY, "--archs", "alexnet", "--alexnet-width", "0.05", "--norms", "masked_cln",
                                "shared_cln", "task_gn", "masked_gn", "--out", str(tmp_path)])
    variants = results["variants"]
    assert list(variants) == ["alexnet HAT masked CLN", "alexnet HAT shared CLN", "alexnet HAT per-task GN",
                              "alexnet HAT masked GN", "alexnet SGD"]
    assert variants["alexnet SGD"]["norm"] == "shared_cln"
    for label in ("alexnet HAT masked CLN", "alexnet HAT masked GN"):
        assert variants[label]["runs"]["0"]["bwt"] == 0.0
    primaries = {(c["a"], c["b"], c["metric"]) for c in results["contrasts"] if c["primary"]}
    assert primaries == {("alexnet HAT masked CLN", "alexnet HAT shared CLN", "bwt"),
                         ("alexnet HAT masked GN", "alexnet HAT per-task GN", "bwt")}


def test_the_depth_ablation_measures_the_newest_task_gap(tmp_path, capsys) -> None:
    results = depth.main([*TINY, "--depths", "10", "34", "--c", "0.75", "--width", "2", "--no-joint", "--out",
                          str(tmp_path)])
    assert list(results["variants"]) == ["resnet10 HAT c=0.75", "resnet10 SGD", "resnet34 HAT c=0.75", "resnet34 SGD"]
    for r in results["variants"].values():
        A = r["runs"]["0"]["accuracy"]
        assert r["summary"]["newest_accuracy"]["mean"] == pytest.approx((A[0][0] + A[1][1]) / 2)
    gaps = [(c["a"], c["b"], c["metric"]) for c in results["contrasts"] if c["primary"]]
    assert gaps == [("resnet10 SGD", "resnet10 HAT c=0.75", "newest_accuracy"),
                    ("resnet34 SGD", "resnet34 HAT c=0.75", "newest_accuracy")]
    assert results["variants"]["resnet34 SGD"]["parameters"] > results["variants"]["resnet10 SGD"]["parameters"]
    assert "newest acc" in capsys.readouterr().out
    assert "newest_accuracy_mean" in (tmp_path / "results.csv").read_text().splitlines()[0]
    report.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| variant | parameters | avg acc | BWT | ρ^{≤T} | newest acc | BWT < 0 on | epochs/task | min A_J |" \
        in printed
    rows = [line for line in printed.splitlines() if line.startswith("| resnet") and " − " not in line]
    assert len(rows) == 4
    for row in rows:  # no joint training: neither ρ nor A_J
        cells = row.split(" | ")
        assert cells[4] == "n/a" and row.endswith("| n/a |")


def test_the_cifar_program_runs_every_part_end_to_end(tmp_path, capsys) -> None:
    """The natural-image program on the small fake CIFAR folder: every BN variant, SGD, EWC and joint training
    from random initialisation, and from an ImageNet-style ResNet-18 checkpoint (here one of base width 8)."""
    source = hatnorm.build("resnet18", num_tasks=1, norm="shared_bn", num_classes=10, base_width=8, stem="imagenet")
    weights = _saved(pretrained.trunk_state(source))
    write_fake_cifar(tmp_path / "data", train_per_class=6, test_per_class=2)
    argv = ["--data-root", str(tmp_path / "data"), "--unverified-data", "--tasks", "2", "--epochs", "1",
            "--batch-size", "8", "--seeds", "0", "--resnet-width", "8", "--alexnet-width", "0.05", "--out",
            str(tmp_path / "out")]
    cifar.main([*argv, "--dry-run"])
    assert "the ImageNet parts (norms_imagenet, pretrained) are skipped" in capsys.readouterr().out
    done = cifar.main([*argv, "--weights", str(weights)])
    out = capsys.readouterr().out
    assert list(done) == ["norms", "norms_imagenet", "pretrained"]
    assert f"[norms] python -m ablations.norms --data cifar --data-root {tmp_path / 'data'}" in out
    for arch in ("resnet18", "alexnet"):
        assert {f"{arch} HAT {n}" for n in norms.LABELS.values()} | {f"{arch} SGD", f"{arch} EWC"} == {
            label for label in done["norms"]["variants"] if label.startswith(arch)}
    assert set(done["norms_imagenet"]["variants"]) == {label for label in done["norms"]["variants"]
                                                      if label.startswith("resnet18")}
    assert f"--weights: every model starts from {weights}" in out
    for name in done:
        saved = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert saved["tasks"][0].startswith("cifar10") and saved["seeds"] == [0]
    # an interrupted program continues: every finished run is read back
    cifar.main([*argv, "--weights", str(weights), "--resume"])
    assert "source test accuracy" not in capsys.readouterr().out


def _hat_guarantees_no_forgetting(label: str) -> bool:
    """Whether the variant is HAT's hard policy with binarised masks and a task-aware norm.

    Only those forget nothing by construction (invariant 5). AdaHAT's soft protection lets later tasks
    move what earlier tasks use, at the rate r/(n + r) (tested by hand in test_hat.py), so its BWT is a
    training outcome that differs between floating-point paths, not a guarantee.
    """
    if label.endswith("adahat"):
        return False
    return label.startswith(("masked_bn hat", "task_bn hat", "s_max=", "c=")) or "masked LN" in label


@pytest.mark.parametrize(("tasks", "expected"), [([], 10), (["--tasks", "20"], 20)])
def test_permuted_mnist_sequences_of_10_and_20_tasks(tasks: list[str], expected: int, tmp_path) -> None:
    p = _cli.parser("p", "", budget=_cli.Budget(smoke=1, converged=1), out=str(tmp_path))
    args = p.parse_args(["--data", "permuted_mnist", "--seeds", "0", "1", *tasks])
    tasks_of, channels, size = _cli.load_tasks(args, p)
    first, second = tasks_of(0), tasks_of(1)
    assert len(first) == expected and (channels, size) == (1, 32)
    assert all(len(t.train) == 4000 and t.num_classes == 10 for t in first)
    # every seed draws its own permutations; the same seed, the same tasks
    assert not torch.equal(first[0].train.tensors[0], second[0].train.tensors[0])
    assert tasks_of(0) is first


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "0"], "--epochs: must be an int ≥ 1, got 0"),
    (["--lr", "-0.1"], "--lr: must be a finite number > 0, got -0.1"),
    (["--tasks", "6"], "--tasks must be ≤ 5 for split_mnist, got 6"),
    (["--seeds", "1", "1"], "--seeds must not repeat a seed, got 1 1"),
    (["--preset", "long"], "invalid choice: 'long'"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--optimizer", "adamw", "--momentum", "0.9"], "momentum applies to optimizer='sgd' only"),
    (["--schedule", "plateau", "--warmup-epochs", "1"], "warmup_epochs applies to schedule='cosine' only"),
    (["--batch-size", "1"], "--batch-size must be ≥ 2"),
    (["--data", "cifar"], "--data cifar needs --data-root"),
    (["--norms", "batchnorm"], "invalid choice: 'batchnorm'"),
    (["--alexnet-width", "50"], "--alexnet-width must be ≤ 16, got 50.0"),
])
def test_cli_rejects_bad_options(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        norms.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cifar_without_the_data_names_the_folder(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        norms.main(["--data", "cifar", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "cifar-10-batches-py" in err


def test_help_documents_every_option() -> None:
    done = subprocess.run([sys.executable, "-m", "ablations.norms", "--help"], capture_output=True, text=True,
                          check=True)
    for option in ("--data", "--data-root", "--tasks", "--epochs", "--lr", "--batch-size", "--patience", "--seeds",
                   "--preset", "--optimizer", "--schedule", "--momentum", "--weight-decay", "--warmup-epochs",
                   "--out", "--archs", "--norms", "--resnet-width", "--alexnet-width", "--c", "--full"):
        assert option in done.stdout


def test_cli_lists_commands_and_refuses_unknown_ones(capsys) -> None:
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    with pytest.raises(SystemExit, match="unknown command 'nroms'"):
        cli.main(["nroms"])


def test_learning_curves_of_the_vit_configurations(tmp_path, capsys) -> None:
    results = curves.main(["--epochs", "2", "--seeds", "0", "1", "--dim", "8", "--depth", "1", "--num-heads", "2",
                           "--stems", "patch", "conv", "--patch-sizes", "8", "--out", str(tmp_path)])
    assert list(results) == ["patch stem, patch 8", "conv stem, patch 8"]
    for r in results.values():
        runs = r["runs"].values()
        assert all(len(run["curve"]) == 2 and 0 <= run["test"] <= 1 for run in runs)
        assert r["test"] == summarize([run["test"] for run in runs]).to_dict()
    assert results["conv stem, patch 8"]["options"]["stem"] == "conv"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["configurations"] == json.loads(json.dumps(results))
    assert (tmp_path / "curves.png").exists() and "test accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        curves.main(["--patch-sizes", "3", "--out", str(tmp_path)])
    assert "--patch-sizes must divide the image side 32, got 3" in capsys.readouterr().err


def test_every_documented_table_regenerates_from_its_committed_results(capsys) -> None:
    """docs/ablations.md holds, between ``<!-- results:<table> -->`` and ``<!-- /results -->``, exactly what
    ``python -m ablations.report docs/results/<table>`` prints; every variant or contrast table of the page is
    such a block, and every folder of docs/results is on the page."""
    doc = (ROOT / "docs" / "ablations.md").read_text()
    blocks = dict(re.findall(r"<!-- results:(\S+) -->\n(.*?)<!-- /results -->", doc, re.S))
    folders = sorted(path.parent for path in RESULTS.glob("*/results.json"))
    assert folders and set(blocks) == {folder.name for folder in folders}
    for folder in folders:
        report.main([str(folder)])
        assert capsys.readouterr().out.strip() == blocks[folder.name].strip(), f"{folder.name} drifted from its files"
    outside = re.sub(r"<!-- results:\S+ -->\n.*?<!-- /results -->", "", doc, flags=re.S)
    assert not re.search(r"^\| (variant|a − b) \|", outside, re.M), "a results table no committed run regenerates"


def test_the_cifar_program_passes_its_device_to_every_part(tmp_path, capsys) -> None:
    """``--device`` reaches every part's command (a GPU machine trains on the GPU), and none is added without it."""
    argv = ["--data-root", str(tmp_path / "data"), "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path),
            "--dry-run"]
    cifar.main([*argv, "--device", "cuda:1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and all(line.endswith(f"--out {tmp_path / line[1:line.index(']')]}") and
                                   " --device cuda:1 " in line for line in lines)
    cifar.main(argv)
    assert "--device" not in capsys.readouterr().out
