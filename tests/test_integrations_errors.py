"""The integrations refuse what they cannot train, naming the argument, what was given and what is allowed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from test_integrations import tiny_model, tiny_tasks
from torch.utils.data import DataLoader

import hatnorm
from hatnorm.integrations.avalanche import HATMultiTaskModule, HATPlugin
from hatnorm.integrations.lightning import HATCallback, HATLightningModule
from hatnorm.integrations.transformers import HATTrainer, HATTrainerCallback


def test_lightning_module_refuses_a_hat_over_another_model() -> None:
    with pytest.raises(ValueError, match="hat must be the HAT over model, got a HAT over another GatedMLP"):
        HATLightningModule(tiny_model(), hatnorm.HAT(tiny_model()))
    with pytest.raises(TypeError, match=r"hat must be a hatnorm\.HAT or None, got str"):
        HATLightningModule(tiny_model(), "hat")


def test_lightning_module_outside_a_fit_needs_a_task_and_has_no_scale() -> None:
    module = HATLightningModule(tiny_model())
    with pytest.raises(RuntimeError, match="task must be given outside a HATCallback's fit"):
        module(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match=r"hat_loss needs the batch's scale.*HATCallback\(task\)"):
        module.hat_loss(torch.tensor(1.0))
    module.eval()
    assert module(torch.randn(2, 8), task=1).shape == (2, 2)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"task": -1}, ValueError, "task must be an integer >= 0, got -1"),
    ({"task": True}, ValueError, "task must be an integer >= 0, got True"),
    ({"task": 0, "batch_size": 0}, ValueError, "batch_size must be an integer > 0, got 0"),
    ({"task": 0, "recalibrate": "yes"}, TypeError, "recalibrate must be a bool, got 'yes'"),
])
def test_lightning_callback_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        HATCallback(**options)


def test_lightning_callback_refuses_a_module_without_hat(tmp_path) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, callbacks=[HATCallback(0)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=r"HATCallback trains a hatnorm\.integrations\.lightning\."
                                        r"HATLightningModule, got a Plain"):
        trainer.fit(Plain(), DataLoader(tiny_tasks()[0], batch_size=8))


def test_lightning_callback_refuses_a_checkpoint_of_another_task() -> None:
    callback = HATCallback(1)
    callback.hat = hatnorm.HAT(tiny_model())
    with pytest.raises(ValueError, match="the checkpoint must be of this callback's task 1, got one of task 0"):
        callback.load_state_dict({"task": 0, "hat": {"learned_tasks": [], "task": 0}})
    assert callback.hat.task is None and callback.hat.learned_tasks == []


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"hat": "hat", "task": 0}, TypeError, "hat must be a hatnorm.HAT, got str"),
    ({"task": -2}, ValueError, "task must be an integer >= 0, got -2"),
    ({"task": 0, "max_grad_norm": -1.0}, ValueError, r"max_grad_norm must be a number >= 0 \(0: no clip\), got -1.0"),
    ({"task": 0, "batch_size": 0}, ValueError, "batch_size must be an integer > 0, got 0"),
])
def test_transformers_callback_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        HATTrainerCallback(**{"hat": hatnorm.HAT(tiny_model())} | options)


def test_hat_trainer_computes_its_own_loss() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="compute_loss_func must be None for a HATTrainer.*pass the task loss as "
                                         r"loss_fn\(logits, labels\)"):
        HATTrainer(model=model, hat=hatnorm.HAT(model), task=0, compute_loss_func=lambda *a, **k: 0)


def test_avalanche_parts_refuse_what_they_cannot_drive() -> None:
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        HATMultiTaskModule("model")
    with pytest.raises(TypeError, match=r"hat must be a hatnorm\.HAT, got str"):
        HATPlugin("hat")
    with pytest.raises(ValueError, match="batch_size must be an integer > 0, got -1"):
        HATPlugin(hatnorm.HAT(tiny_model()), batch_size=-1)
