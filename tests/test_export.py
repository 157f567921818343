"""Per-task export: for every architecture × norm, the exported task gives the HAT model's outputs with fewer
parameters, and holds no gate, no task-aware norm and no other task's head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hatnorm

OPTIONS = {
    "mlp": ({"in_features": 3 * 32 * 32, "hidden": (64, 32)}, 32),
    "alexnet": ({"width": 0.25, "in_channels": 3}, 32),
    "resnet18": ({"base_width": 8, "in_channels": 3}, 32),
    "resnet10": ({"base_width": 4, "in_channels": 3}, 32),
    "resnet34": ({"base_width": 4, "in_channels": 3}, 32),
    "vit": ({"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "num_heads": 2}, 16),
    "vit_micro": ({"depth": 2}, 32),
    "vit_post": ({"depth": 2, "image_size": 16}, 16),
    "vit_tiny": ({"depth": 1, "image_size": 16}, 16),
    "vit-conv-stem": ({"image_size": 16, "patch_size": 4, "dim": 32, "depth": 2, "num_heads": 2, "stem": "conv"}, 16),
}
CASES = [(arch, norm) for arch in hatnorm.list_architectures()
         for norm in hatnorm.list_norms(hatnorm.get_architecture(arch).family) if norm != "post_gate_bn"]
# the ViT's convolutional stem, with every layer norm
CASES += [("vit-conv-stem", norm) for norm in hatnorm.list_norms("layer")]


def trained(model: nn.Module, x: torch.Tensor, tasks: int = 2, steps: int = 3) -> hatnorm.HAT:
    """A few HAT steps on each of ``tasks`` tasks, so masks, statistics and weights differ between tasks."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for task in range(tasks):
        hat.begin_task(task)
        model.train()
        for b in range(steps):
            s = hat.scale(b, steps)
            loss = hat.loss(model(x, task=task, s=s).logsumexp(1).mean(), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
    return hat


@pytest.mark.parametrize(("arch", "norm"), CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_export_gives_the_same_outputs_with_fewer_parameters(arch: str, norm: str, record_property) -> None:
    assert set(OPTIONS) - {"vit-conv-stem"} == set(hatnorm.list_architectures()), "add export settings for it"
    options, size = OPTIONS[arch]
    torch.manual_seed(0)
    model = hatnorm.build(arch.removesuffix("-conv-stem"), num_tasks=3, norm=norm, num_classes=[2, 3, 4], **options)
    x = torch.randn(6, 3, size, size)
    trained(model, x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for task in range(3):  # two learned tasks and one never trained
        exported = hatnorm.export(model, task)
        with torch.no_grad():
            expected, got = model(x, task=task), exported(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not exported.training
        kinds = {type(m) for m in exported.modules()}
        assert not kinds & {hatnorm.HATGate, hatnorm.TaskHeads}, kinds
        assert not any(isinstance(m, hatnorm.MaskedNorm) for m in exported.modules())
        size_after = sum(p.numel() for p in exported.parameters())
        size_before = sum(p.numel() for p in model.parameters())
        assert exported.parameters_saved == size_before - size_after > 0
        record_property(f"parameters_saved_task{task}", exported.parameters_saved)
        print(f"{arch} {norm} task {task}: {size_before} → {size_after} parameters "
              f"({exported.parameters_saved} saved)")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the model"


def test_export_removes_the_units_a_task_does_not_use() -> None:
    torch.manual_seed(0)
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=12, hidden=(8, 6))
    with torch.no_grad():
        model.gates[0].embedding[1] = torch.tensor([1.0, -1, 1, -1, -1, -1, -1, 1])   # 3 of 8 units
        model.gates[1].embedding[1] = torch.tensor([-1.0, 1, -1, -1, -1, 1])          # 2 of 6 units
    model.eval()
    exported = hatnorm.export(model, 1)
    fc0, fc1 = exported.body.fcs
    assert (fc0.in_features, fc0.out_features) == (12, 3)
    assert (fc1.in_features, fc1.out_features) == (3, 2)
    assert exported.body.task_heads.linear.in_features == 2
    torch.testing.assert_close(fc0.weight, model.fcs[0].weight[[0, 2, 7]])
    x = torch.randn(5, 12)
    torch.testing.assert_close(exported(x), model(x, task=1))


def test_export_keeps_residual_streams_whole_across_their_paths() -> None:
    """ResNet units joined by a residual add are kept when any summed path's gate selects them."""
    torch.manual_seed(1)
    model = hatnorm.build("resnet18", num_tasks=2, norm="task_bn", num_classes=3, base_width=4)
    model.eval()
    exported = hatnorm.export(model, 0)
    block = model.layer1[0]
    used = model.gate1.selection(0) | block.gate2.selection(0) | model.layer1[1].gate2.selection(0)
    assert exported.body.conv1.out_channels == int(used.sum())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported(x), model(x, task=0), rtol=1e-5, atol=1e-6)


def test_export_of_converted_torchvision_and_transformers_models() -> None:
    torchvision = pytest.importorskip("torchvision")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    resnet = hatnorm.convert(torchvision.models.resnet18(num_classes=5), num_tasks=2, norm="masked_bn")
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    vit = hatnorm.convert(transformers.ViTForImageClassification(config), num_tasks=2, norm="masked_ln")
    # a convolutional classifier: the exported head is the task's convolution, pruned to the used channels
    squeezenet = hatnorm.convert(torchvision.models.squeezenet1_1(num_classes=4), num_tasks=2, num_classes=[4, 6])
    for model, x in ((resnet, torch.randn(2, 3, 64, 64)), (vit, torch.randn(2, 3, 16, 16)),
                     (squeezenet, torch.randn(2, 3, 64, 64))):
        trained(model, x, tasks=1, steps=2)
        model.eval()
        exported = hatnorm.export(model, 0)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x, task=0), rtol=1e-4, atol=1e-5)
        assert exported.parameters_saved > 0
    head = squeezenet.body.get_submodule("classifier.1")  # Dropout, the convolution, ReLU, pool
    assert isinstance(head.task_heads.heads[1], nn.Conv2d) and head.task_heads.heads[1].out_channels == 6


def test_export_refuses_bad_input() -> None:
    model = hatnorm.build("mlp", num_tasks=2, norm="masked_bn", num_classes=2, in_features=8, hidden=(4,))
    with pytest.raises(ValueError, match=r"task must be in \[0, 2\), got 2"):
        hatnorm.export(model, 2)
    with pytest.raises(TypeError, match="task must be an int"):
        hatnorm.export(model, 0.5)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got str"):
        hatnorm.export("model", 0)
    with pytest.raises(ValueError, match="model must contain at least one HATGate"):
        hatnorm.export(nn.Linear(2, 2), 0)
    post_gate = hatnorm.build("mlp", num_tasks=2, norm="post_gate_bn", num_classes=2, in_features=8, hidden=(4,))
    with pytest.raises(TypeError, match="cannot export PostGateBatchNorm: the norm after the gate"):
        hatnorm.export(post_gate, 0)
