"""``python -m ablations language``: converted LLaMA- and BERT-style models on the shipped text benchmark."""

from __future__ import annotations

import json

import pytest

from ablations import language, report

TINY = ["--seeds", "0", "--epochs", "1", "--train-size", "24", "--test-size", "12", "--dim", "16", "--depth", "1",
        "--num-heads", "2", "--batch-size", "8", "--no-joint"]


def test_both_tables_run_on_the_text_tasks_and_hat_with_a_masked_norm_forgets_nothing(tmp_path) -> None:
    summaries = language.main([*TINY, "--generation", "copy", "count", "--classification", "parity", "contains",
                               "--out", str(tmp_path)])
    assert list(summaries) == ["causal", "classifier"]
    for part, summary in summaries.items():
        saved = json.loads((tmp_path / part / "results.json").read_text())
        assert saved["variants"].keys() == summary["variants"].keys()
        labels = list(summary["variants"])
        assert len(labels) == 4 and labels[-1].endswith("SGD")
        primary = [c for c in saved["contrasts"] if c["primary"]]
        assert [c["metric"] for c in primary] == [language.PRIMARY[part]] * 2
        assert all(c["a"] == labels[0] for c in primary)
        for label, r in summary["variants"].items():
            run = r["runs"]["0"]
            A = run["accuracy"]
            assert len(A) == 2 and all(0.0 <= a <= 1.0 for row in A for a in row if a == a)
            # A_R of a generated answer: whole answers guessed at their training frequencies (copy: none repeats)
            assert len(run["random"]) == 2 and all(0 <= x < 1 for x in run["random"])
            # masked norms isolate tasks, and in the pre-norm LM no norm reads another task's units: exact zero
            if "HAT" in label and (part == "causal" or "masked" in label):
                assert run["bwt"] == 0.0, label


@pytest.mark.parametrize(("argv", "message"), [
    (["--dim", "10", "--num-heads", "4"], "--dim must be a multiple of --num-heads, got 10 and 4"),
    (["--generation", "copy", "copy"], "--generation must not repeat a value"),
    (["--weights", "w.pt"], "--weights does not apply"),
])
def test_the_language_ablation_refuses_bad_options_and_writes_nothing(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        language.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_seeds_run_apart_merge_into_one_table_that_names_the_shared_head(tmp_path, capsys) -> None:
    # the language titles end in "; seed 0)": report --merge joins seeds run as separate processes
    part = [*TINY[2:], "--parts", "causal", "--generation", "copy", "count"]
    for seed in (0, 1):
        language.main(["--seeds", str(seed), *part, "--out", str(tmp_path / f"s{seed}")])
    report.main(["--merge", str(tmp_path / "all"), str(tmp_path / "s0" / "causal"), str(tmp_path / "s1" / "causal")])
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert merged["seeds"] == [0, 1] and merged["title"].endswith("; seeds 0, 1)")
    capsys.readouterr()
    report.main([str(tmp_path / "all")])
    first = capsys.readouterr().out.splitlines()[0]
    assert "one language-model head over the shared vocabulary" in first and "one head per task" not in first
