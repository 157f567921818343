"""The ablation commands refuse options out of range and write nothing."""

from __future__ import annotations

import pytest

from ablations import policy, sweep


@pytest.mark.parametrize(("module", "argv", "message"), [
    (sweep, ["--width", "50"], "--width must be ≤ 16 for alexnet (a width multiplier), got 50.0"),
    (policy, ["--width", "17"], "--width must be ≤ 16 for alexnet (a width multiplier), got 17.0"),
    (sweep, ["--s-max", "0"], "--s-max: must be a finite number > 0, got 0"),
    (sweep, ["--c", "nan"], "--c: must be a finite number ≥ 0, got nan"),
    (policy, ["--alpha", "-1"], "--alpha: must be a finite number > 0, got -1"),
    (policy, ["--patience", "0"], "--patience: must be an int ≥ 1, got 0"),
])
def test_ablation_cli_refuses_options_out_of_range(module, argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a refused command wrote files"

