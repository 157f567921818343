"""hatnorm.convert on transformers' vision models as a user configures them: every activation of ``ACT2FN`` judged by
what it does, and the models' own drop-path modules kept at their default rates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm

transformers = pytest.importorskip("transformers")
activations = pytest.importorskip("transformers.activations")


def small_vit(hidden_act: str) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5, hidden_act=hidden_act)
    return transformers.ViTForImageClassification(config).eval()


def keeps_zero(name: str) -> bool:
    """Whether activation ``name`` maps 0 to exactly 0 and has no parameters (which every unit would share)."""
    activation = activations.ACT2FN[name]
    with torch.no_grad():
        return bool((activation(torch.zeros(2, 3)) == 0).all()) and not list(activation.parameters())


@pytest.mark.parametrize("name", sorted(activations.ACT2FN))
def test_every_transformers_activation_is_judged_by_what_it_does(name: str) -> None:
    """A ViT converts with every activation of ACT2FN that keeps 0 at 0 (tanh included) and reproduces the original
    with open gates; any other is refused naming the setting."""
    original = small_vit(name)
    x = torch.randn(3, 3, 16, 16)
    if not keeps_zero(name):
        with pytest.raises(hatnorm.ConversionError, match=rf"config\.hidden_act='{name}' .*(maps 0 to|parameter)"):
            hatnorm.convert(original, num_tasks=2, norm="masked_ln")
        return
    converted = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    hatnorm.open_gates(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=1), original(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "converts"), [("relu2", True), ("tanh", True), ("laplace", False)])
def test_a_traced_transformers_model_judges_its_activation_too(name: str, converts: bool) -> None:
    """DeiT converts through the graph walk, where transformers' activations are kept as calls and probed: relu²
    (a power, which the walk has no rule for) converts, laplace (f(0) ≠ 0) is refused naming its module."""
    torch.manual_seed(0)
    config = transformers.DeiTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, num_labels=5, hidden_act=name)
    original = transformers.DeiTForImageClassification(config).eval()
    x = torch.randn(3, 3, 16, 16)
    if not converts:
        with pytest.raises(hatnorm.ConversionError, match=r"f\(0\) ≠ 0: module 'deit\.layers\.0\.mlp\.activation_fn' "
                                                          r"\(LaplaceActivation\) maps 0 to 0\.006"):
            hatnorm.convert(original, num_tasks=2, norm="masked_ln", example_input=x)
        return
    converted = hatnorm.convert(original, num_tasks=2, norm="masked_ln", example_input=x)
    hatnorm.HAT(converted)
    hatnorm.open_gates(converted)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=0), original(x).logits, atol=1e-5, rtol=0)


#: transformers vision models with their own drop-path module, each at its config's default rate or at 0.1 where the
#: default is 0 (ConvNeXt, DINOv2); image size 32
DROP_PATH_MODELS = {
    "Swin": ({"embed_dim": 16, "depths": [2, 2], "num_heads": [2, 2], "window_size": 4, "patch_size": 4},
             "SwinDropPath"),
    "ConvNext": ({"hidden_sizes": [16, 32], "num_stages": 2, "depths": [2, 2], "drop_path_rate": 0.1},
                 "ConvNextDropPath"),
    "Dinov2": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "patch_size": 8, "drop_path_rate": 0.1}, "Dinov2DropPath"),
    "Beit": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "patch_size": 8}, "BeitDropPath"),
    "Data2VecVision": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                        "patch_size": 8}, "Data2VecVisionDropPath"),
    "Segformer": ({"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                   "num_attention_heads": [1, 2], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2]},
                  "SegformerDropPath"),
}


def drop_path_model(family: str) -> nn.Module:
    """A fresh model as ``Family...ForImageClassification(FamilyConfig(...))`` gives it: in training mode."""
    torch.manual_seed(0)
    options, _ = DROP_PATH_MODELS[family]
    config = getattr(transformers, f"{family}Config")(num_labels=5, image_size=32, **options)
    assert config.drop_path_rate > 0
    return getattr(transformers, f"{family}ForImageClassification")(config)


@pytest.mark.parametrize("family", sorted(DROP_PATH_MODELS))
def test_transformers_drop_paths_are_kept_and_drop_paths_in_training(family: str) -> None:
    original = drop_path_model(family)
    kind = DROP_PATH_MODELS[family][1]
    x = torch.randn(4, 3, 32, 32)
    model = hatnorm.convert(original, num_tasks=2, norm={"layer": "masked_ln", "batch": "masked_bn"},
                            example_input=x)
    assert [type(m).__name__ for m in model.modules() if "DropPath" in type(m).__name__] == \
        [type(m).__name__ for m in original.modules() if type(m).__name__ == kind]
    hatnorm.HAT(model)
    hatnorm.open_gates(model)
    original.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, task=1), original(x).logits, atol=1e-5, rtol=0)
    model.train()
    batch = torch.randn(32, 3, 32, 32)  # rates from 0.03: some sample's path is dropped with near certainty
    with torch.no_grad():
        assert not torch.equal(model(batch, task=0, s=400.0), model(batch, task=0, s=400.0))  # dropped at random


@pytest.mark.parametrize("family", ["Swin", "Beit"])
def test_transformers_models_with_drop_paths_forget_nothing_under_adamw(family: str) -> None:
    """Invariant 5 with drop-path active in training: task 0's outputs bit-identical after AdamW on task 1."""
    probe = torch.randn(4, 3, 32, 32)
    model = hatnorm.convert(drop_path_model(family), num_tasks=2, norm="masked_ln", num_classes=[3, 4],
                            example_input=probe)
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, 3, 32, 32) + task, torch.randint(0, classes, (8,))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])

