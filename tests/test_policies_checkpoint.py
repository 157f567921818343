"""A run under a per-step policy, interrupted mid-task, resumes to the same bits: the policy's summed importance,
per-task importances and this task's accumulation travel in the checkpoint."""

from __future__ import annotations

import pytest
from test_checkpoint import Interrupted, console, mlp
from toys import toy_tasks

from hatnorm.checkpoint import load_checkpoint
from hatnorm.policies import AdaHATReferencePolicy
from hatnorm.training import HATMethod, TrainConfig, train_sequence


@pytest.mark.parametrize("policy", ["fg_adahat", "adahat_reference"])
def test_a_per_step_policy_run_interrupted_mid_task_resumes_exactly(tmp_path, policy: str) -> None:
    config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, optimizer="adamw", schedule="cosine")
    tasks = toy_tasks(3)  # task 2 trains under the importance accumulated across the interruption

    def method() -> HATMethod:
        if policy == "fg_adahat":
            return HATMethod(policy="fg_adahat")
        return HATMethod(policy=AdaHATReferencePolicy())

    expected = train_sequence(mlp(n=3), tasks, method(), config, console=console())
    with pytest.raises(Interrupted):
        train_sequence(mlp(n=3), tasks, method(), config, console=console(stop=5), checkpoint_dir=tmp_path,
                       checkpoint_every=1)
    saved = load_checkpoint(tmp_path).state["method"]
    assert "policy" in saved
    resumed = train_sequence(mlp(n=3), tasks, method(), config, console=console(), checkpoint_dir=tmp_path,
                             checkpoint_every=1, resume=True)
    assert resumed.accuracy == expected.accuracy and resumed.loss == expected.loss
