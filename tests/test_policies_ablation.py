"""``python -m ablations policy`` runs the per-step policies, with the norms' γ/β adjusted and free."""

from __future__ import annotations

import json
import math

from ablations import policy

TINY = ["--tasks", "2", "--epochs", "1", "--seeds", "0"]


def test_the_policy_ablation_runs_fg_adahat_and_adahat_reference(tmp_path) -> None:
    results = policy.main([*TINY, "--out", str(tmp_path), "--width", "0.05", "--norms", "masked_bn",
                           "--policies", "hat", "adahat_reference", "fg_icu", "--gamma-beta", "both"])
    assert set(results["variants"]) == {"masked_bn hat", "masked_bn adahat_reference",
                                        "masked_bn adahat_reference γβ free", "masked_bn fg_icu",
                                        "masked_bn fg_icu γβ free"}
    for label, r in results["variants"].items():
        A = r["runs"]["0"]["accuracy"]
        assert all(0.0 <= a <= 1.0 for row in A for a in row)
        assert r["runs"]["0"]["bwt"] == (0.0 if label == "masked_bn hat" else A[1][0] - A[0][0])


def test_the_policy_ablation_runs_the_fg_adahat_papers_mlp(tmp_path) -> None:
    results = policy.main([*TINY, "--out", str(tmp_path), "--arch", "mlp", "--hidden", "16", "12", "--norms", "none",
                           "--data", "permuted_mnist", "--policies", "hat", "fg_afi"])
    assert set(results["variants"]) == {"none hat", "none fg_afi"}
    assert results["variants"]["none hat"]["runs"]["0"]["bwt"] == 0.0


def test_without_the_joint_baseline_rho_is_not_measured_and_the_rest_is(tmp_path) -> None:
    argv = [*TINY, "--arch", "mlp", "--hidden", "16", "12", "--norms", "none", "--data", "permuted_mnist",
            "--policies", "hat", "fg_icu", "--optimizer", "adamw", "--schedule", "constant"]
    results = policy.main([*argv, "--out", str(tmp_path / "no_joint"), "--no-joint"])
    measured = policy.main([*argv, "--out", str(tmp_path / "joint")])
    assert not (tmp_path / "no_joint" / "seed_0" / "checkpoints" / "joint_mlp").exists()
    for label, r in results["variants"].items():
        run, twin = r["runs"]["0"], measured["variants"][label]["runs"]["0"]
        assert run["joint"] is None and math.isnan(run["rho_final"])
        assert run["accuracy"] == twin["accuracy"]  # the variants train exactly as with the baseline
    metrics = {c["metric"] for c in results["contrasts"]}
    assert "rho_final" not in metrics and {"average_accuracy", "bwt"} <= metrics
    assert json.loads((tmp_path / "no_joint" / "results.json").read_text())["options"]["joint"] is False
