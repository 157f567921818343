"""hatnorm.convert on models people already have: torchvision ResNets and transformers' ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
swin = pytest.importorskip("torchvision.models.swin_transformer")


def pretrained_resnet(builder, tmp_path) -> nn.Module:
    """A torchvision CNN loaded from a saved state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    source = builder(num_classes=7)
    source.train()
    with torch.no_grad():
        for _ in range(2):
            source(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    model = builder(num_classes=7)
    model.load_state_dict(torch.load(tmp_path / "weights.pt"))
    return model.eval()


def pretrained_vit(tmp_path) -> nn.Module:
    """A transformers ViT classifier saved and reloaded with ``from_pretrained`` from a local folder."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=7)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return transformers.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()


def pretrained_transformers(family: str, tmp_path, **config) -> nn.Module:
    """A transformers image classifier saved and reloaded with ``from_pretrained`` from a local folder."""
    torch.manual_seed(0)
    classifier = getattr(transformers, f"{family}ForImageClassification")
    model = classifier(getattr(transformers, f"{family}Config")(num_labels=7, image_size=32, **config))
    model.save_pretrained(tmp_path / family)
    return classifier.from_pretrained(tmp_path / family).eval()


def small_convnext(num_classes: int) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig
    return torchvision.models.ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)],
                                       stochastic_depth_prob=0.2, num_classes=num_classes)


def small_torchvision_vit(num_classes: int) -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts it at 0, which would compare nothing
    return model


def timm_model(name: str, **options) -> nn.Module:
    return pytest.importorskip("timm").create_model(name, pretrained=False, **options)


def task_aware(replaced: type[nn.Module]) -> list[str]:
    """The registered norms that declare they forget nothing and replace ``replaced`` with its normalization
    (plug-in norms included; ``none`` drops the normalization, so open gates cannot reproduce the original)."""
    return [n for n in hatnorm.list_norms() if n != "none" and hatnorm.get_norm(n).isolates_tasks
            and replaced in hatnorm.get_norm(n).replaces]


MODELS = {
    "resnet18": (lambda tmp: pretrained_resnet(torchvision.models.resnet18, tmp), 32, task_aware(nn.BatchNorm2d)),
    "resnet50": (lambda tmp: pretrained_resnet(torchvision.models.resnet50, tmp), 32, task_aware(nn.BatchNorm2d)),
    # squeeze-excitation (Hardsigmoid) and a dropout after the flatten
    "mobilenet_v3_small": (lambda tmp: pretrained_resnet(torchvision.models.mobilenet_v3_small, tmp), 32,
                           ["masked_bn"]),
    # squeeze-excitation (Sigmoid) and stochastic depth
    "efficientnet_b0": (lambda tmp: pretrained_resnet(torchvision.models.efficientnet_b0, tmp), 32, ["masked_bn"]),
    # the mean over the spatial dims as the pooling
    "mnasnet0_5": (lambda tmp: pretrained_resnet(torchvision.models.mnasnet0_5, tmp), 32, ["task_bn"]),
    "vit": (pretrained_vit, 32, task_aware(nn.LayerNorm)),
    # a convolutional classifier (a 1×1 convolution, ReLU and global pool give the logits): one per task
    "squeezenet1_1": (lambda tmp: pretrained_resnet(torchvision.models.squeezenet1_1, tmp), 32, ["masked_bn"]),
    # models converted through the graph with an example input: a channel split and shuffle (view, transpose)
    "shufflenet_v2_x0_5": (lambda tmp: pretrained_resnet(torchvision.models.shufflenet_v2_x0_5, tmp), 32,
                           ["masked_bn"]),
    # permutes to channels-last, LayerNorm2d (F.layer_norm on its own parameters), a layer scale, drop-path
    "convnext": (lambda tmp: pretrained_resnet(small_convnext, tmp), 32, ["masked_ln"]),
    # nn.MultiheadAttention, a class token and a position embedding added to the gated stream
    "torchvision_vit": (lambda tmp: pretrained_resnet(small_torchvision_vit, tmp), 32, ["masked_ln"]),
    # torchvision's Swin: its window attention (one call) gated, its relative position bias one copy per task
    "torchvision_swin": (lambda tmp: pretrained_resnet(lambda num_classes: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        stochastic_depth_prob=0.1, num_classes=num_classes), tmp), 32, ["masked_ln"]),
    # Swin v2: cosine attention with a logit scale, a position bias computed by an MLP (both one copy per task),
    # post-norm blocks
    "torchvision_swin_v2": (lambda tmp: pretrained_resnet(lambda num_classes: torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        stochastic_depth_prob=0.1, num_classes=num_classes, block=swin.SwinTransformerBlockV2,
        downsample_layer=swin.PatchMergingV2), tmp), 32, ["masked_ln"]),
    # MaxViT: attention as einsums with a relative position bias (one copy per task), squeeze-excitation,
    # window and grid partitions, BatchNorm and LayerNorm (one norm per kind), a classifier without a bias
    "torchvision_maxvit": (lambda tmp: pretrained_resnet(lambda num_classes: torchvision.models.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32], block_layers=[1, 1],
        head_dim=8, stochastic_depth_prob=0.1, num_classes=num_classes), tmp), 32,
        [{"batch": "masked_bn", "layer": "masked_ln"}]),
    # timm: F.scaled_dot_product_attention on a split qkv projection; BatchNormAct2d, timm's Linear, hard-swish
    "timm_vit": (lambda tmp: pretrained_resnet(lambda num_classes: timm_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=2, embed_dim=32,
        num_heads=2), tmp), 32, ["masked_ln"]),
    # transformers models that torch.fx cannot trace symbolically: traced alongside the example input
    "transformers_resnet": (lambda tmp: pretrained_transformers("ResNet", tmp, hidden_sizes=[16, 32], depths=[1, 1],
                                                                embedding_size=16), 32, ["masked_bn"]),
    "transformers_convnext": (lambda tmp: pretrained_transformers("ConvNext", tmp, hidden_sizes=[16, 32], num_stages=2,
                                                                  depths=[1, 1]), 32, ["masked_ln"]),
    "transformers_deit": (lambda tmp: pretrained_transformers("DeiT", tmp, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, intermediate_size=64,
                                                              patch_size=8), 32, ["masked_ln"]),
    # windows (pad, roll, partition) and a relative position bias table, which becomes one copy per task
    "transformers_swin": (lambda tmp: pretrained_transformers("Swin", tmp, embed_dim=16, depths=[1, 1],
                                                              num_heads=[2, 2], window_size=4, patch_size=4), 32,
                          ["masked_ln"]),
    "timm_mobilenetv3": (lambda tmp: pretrained_resnet(lambda num_classes: timm_model(
        "mobilenetv3_small_050", num_classes=num_classes), tmp), 32, ["masked_bn"]),
}
CASES = [(name, norm) for name, (_, _, norms) in MODELS.items() for norm in norms]


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_open_gates_reproduce_the_original(name: str, norm: str, tmp_path) -> None:
    """Invariant 7: all gates open and statistics copied give the original outputs (≤ 1e-5), for every task."""
    make, size, _ = MODELS[name]
    original = make(tmp_path)
    x = torch.randn(4, 3, size, size)
    converted = hatnorm.convert(original, num_tasks=3, norm=norm, example_input=x)
    hatnorm.HAT(converted)  # the coverage check passes
    hatnorm.open_gates(converted)
    converted.eval()
    with torch.no_grad():
        expected = logits(original(x))
        for task in range(3):
            torch.testing.assert_close(converted(x, task=task), expected, atol=1e-5, rtol=0)
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
    assert not any(isinstance(m, plain) for m in converted.modules())


def test_convert_leaves_the_original_untouched(tmp_path) -> None:
    original = pretrained_resnet(torchvision.models.resnet18, tmp_path)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    hatnorm.convert(original, num_tasks=2)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in original.modules())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(("name", "norm"), [c for c in CASES if c[0] != "resnet50"])
def test_converted_models_forget_nothing(name: str, norm: str, optimizer: str, tmp_path) -> None:
    """Invariant 5 on converted models: training task 1 leaves task 0's outputs bit-identical."""
    make, size, _ = MODELS[name]
    probe = torch.randn(4, 3, size, size)
    model = hatnorm.convert(make(tmp_path), num_tasks=2, norm=norm, num_classes=[3, 4], example_input=probe)
    hat = hatnorm.HAT(model)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05))
    outputs = []
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, 3, size, size) + task, torch.randint(0, classes, (8,))
            loss = hat.loss(F.cross_entropy(model(x, task=task, s=s), y), s)
            opt.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(opt)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])


def test_num_classes_gives_fresh_heads(tmp_path) -> None:
    model = hatnorm.convert(pretrained_resnet(torchvision.models.resnet18, tmp_path), num_tasks=2,
                            num_classes=[2, 5])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x, task=0).shape == (2, 2)
    assert model(x, task=1).shape == (2, 5)


class Unconvertible(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.middle = middle
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(self.bn(self.conv(x))).mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class RunningSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class Outer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,ndhw->nhw", x, x)[:, None].expand_as(x)


class ChannelMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(1, keepdim=True)


@pytest.mark.parametrize(("model", "match"), [
    (Unconvertible(nn.Sigmoid()), r"the output of a sigmoid-like activation \(f\(0\) ≠ 0\) can only scale a gated "
                                  r"tensor \(squeeze-excitation: x \* scale\)"),
    (Unconvertible(nn.Softplus()), "Softplus is not supported"),
    (Unconvertible(Square()), r"module 'middle' \(Square\), test_convert\.py:\d+ `return x \* x`: operation mul: a "
                              r"product of tensors is supported as a gated tensor times a squeeze-excitation scale"),
    (Unconvertible(ChannelMean()), r"operation mean: only a mean over dims the units do not vary in \(spatial dims, "
                                   r"tokens\) keeps the units, got dim=\[1\] \(it would mix units\)"),
    (Unconvertible(nn.LocalResponseNorm(2)), "LocalResponseNorm is not supported"),
    (Unconvertible(Outer()), r"operation einsum: an einsum is supported as attention \('\.\.\.id,\.\.\.jd->"
                             r"\.\.\.ij' on q and k, then '\.\.\.ij,\.\.\.jd->\.\.\.id' on the scores and v\), "
                             r"got 'nchw,ndhw->nhw'"),
    (Branchy(), "cannot trace Branchy"),
])
def test_what_cannot_be_converted_is_named(model: nn.Module, match: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=match):
        hatnorm.convert(model, num_tasks=2)


def test_an_unsupported_operation_is_named_by_module_and_source_line() -> None:
    # a running sum mixes units along the channels: the error points at the module and its line of code
    with pytest.raises(hatnorm.ConversionError, match=r"^module 'middle' \(RunningSum\), test_convert\.py:\d+ "
                                                      r"`return x\.cumsum\(1\)`: operation cumsum: this operation is "
                                                      r"not supported"):
        hatnorm.convert(Unconvertible(RunningSum()), num_tasks=2)


def test_convert_rejects_bad_arguments(tmp_path) -> None:
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="num_tasks must be an int ≥ 1, got 0"):
        hatnorm.convert(model, num_tasks=0)
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        hatnorm.convert(model, num_tasks=2, norm="batchnorm")
    with pytest.raises(hatnorm.ConversionError, match=r"masked_ln.*BatchNorm2d"):
        hatnorm.convert(model, num_tasks=2, norm="masked_ln")
    with pytest.raises(ValueError, match="num_classes must have one count per task"):
        hatnorm.convert(model, num_tasks=2, num_classes=[2, 3, 4])


class Gated(nn.Module):
    """A gated network whose second layer the user forgot to wire."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 8)
        self.gate1, self.gate2 = hatnorm.HATGate(8, num_tasks=2), hatnorm.HATGate(8, num_tasks=2)
        self.task_heads = hatnorm.TaskHeads(8, 2, num_tasks=2)


def test_coverage_check_names_the_unprotected_layer() -> None:
    """Invariant 8: a trainable parameter neither masked nor owned by a task is refused, by name."""
    model = Gated()
    with pytest.raises(ValueError, match=r"\['fc2.weight', 'fc2.bias'\]"):
        hatnorm.HAT(model, [hatnorm.blocks.Layer(model.fc1, out=model.gate1)])
    model.fc2.requires_grad_(False)  # frozen parameters need no protection
    hatnorm.HAT(model, [hatnorm.blocks.Layer(model.fc1, out=model.gate1)])


@pytest.mark.parametrize(("norm", "make"), [
    ("masked_gn", lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))),
    ("masked_rms", lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.RMSNorm(16, eps=1e-6), nn.GELU(),
                                         nn.Linear(16, 5))),
], ids=["group_norm", "rms_norm"])
def test_group_norm_and_rms_norm_convert_with_their_masked_norms(norm: str, make, tmp_path) -> None:
    torch.manual_seed(0)
    original = make().eval()
    with torch.no_grad():  # affine values a trained model would have
        for m in original.modules():
            if isinstance(m, nn.GroupNorm | nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.2)
    converted = hatnorm.convert(original, num_tasks=2, norm=norm)
    replaced = [m for m in converted.modules() if isinstance(m, hatnorm.get_norm(norm).norm_class)]
    assert len(replaced) == 1 and not any(isinstance(m, nn.GroupNorm | nn.RMSNorm) for m in converted.modules())
    hatnorm.HAT(converted)
    hatnorm.open_gates(converted)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for task in range(2):
            torch.testing.assert_close(converted.eval()(x, task=task), original(x), atol=1e-5, rtol=0)
    kind = "GroupNorm" if norm == "masked_gn" else "RMSNorm"
    with pytest.raises(hatnorm.ConversionError, match=rf"norm 'masked_bn' cannot replace module .* \({kind}\): .*; "
                                                      rf"norms that replace {kind}: \[[^\]]*'{norm}'"):
        hatnorm.convert(make(), num_tasks=2, norm="masked_bn")


def mixed_norm_model() -> nn.Module:
    """A CNN body with BatchNorm and an MLP head with LayerNorm, as hybrid models have."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[6].weight.uniform_(0.5, 1.5)
        model[6].bias.normal_(0, 0.2)
    return model.eval()


def test_a_model_mixing_batch_and_layer_norms_converts_with_a_norm_per_kind() -> None:
    original = mixed_norm_model()
    converted = hatnorm.convert(original, num_tasks=2, norm={"batch": "masked_bn", "layer": "masked_ln"})
    kinds = [type(m) for m in converted.modules() if isinstance(m, hatnorm.MaskedNorm)]
    assert kinds == [hatnorm.norms.MaskedBatchNorm, hatnorm.norms.MaskedLayerNorm]
    hatnorm.HAT(converted)  # every parameter is covered
    hatnorm.open_gates(converted)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x, task=1), original(x), atol=1e-5, rtol=0)
    # and it forgets nothing: task 1's training leaves task 0's outputs bit-identical
    converted = hatnorm.convert(original, num_tasks=2, norm={"batch": "masked_bn", "layer": "masked_ln"})
    hat = hatnorm.HAT(converted)
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-2, weight_decay=0.1)
    probe = torch.randn(6, 3, 8, 8)
    before = None
    for task in range(2):
        hat.begin_task(task)
        converted.train()
        for b in range(5):
            s = hat.scale(b, 5)
            loss = hat.loss(F.cross_entropy(converted(torch.randn(8, 3, 8, 8), task=task, s=s),
                                            torch.randint(5, (8,))), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        with torch.no_grad():
            outputs = converted.eval()(probe, task=0)
        if before is None:
            before = outputs
    assert torch.equal(outputs, before)


@pytest.mark.parametrize(("norm", "message"), [
    ("masked_bn", r"norm 'masked_bn' cannot replace module '6' \(LayerNorm\): it replaces BatchNorm1d, BatchNorm2d; "
                  r"norms that replace LayerNorm: \[.*'masked_ln'.*\]; a model with several kinds of norm takes one "
                  r"per kind, e\.g\. norm=\{'batch': 'masked_bn', 'layer': 'masked_ln'\}"),
    ({"batch": "masked_bn"}, r"norm: no norm for module '6' \(LayerNorm\); the mapping gives \['batch'\], add 'layer'"),
    ({"batch": "masked_bn", "conv": "masked_ln"}, r"norm: the keys of a per-kind mapping must be among "
                                                  r"\['batch', 'layer', 'group', 'rms'\], got 'conv'"),
    ({"batch": "masked_ln", "layer": "masked_ln"}, r"norm 'masked_ln' cannot replace module '1' \(BatchNorm2d\)"),
], ids=["one_norm", "kind_missing", "unknown_kind", "wrong_norm_for_kind"])
def test_a_norm_that_cannot_replace_a_module_is_refused_naming_it(norm, message) -> None:
    with pytest.raises((hatnorm.ConversionError, ValueError), match=message):
        hatnorm.convert(mixed_norm_model(), num_tasks=2, norm=norm)


def test_drop_path_is_kept_as_a_module() -> None:
    timm = pytest.importorskip("timm")
    # timm's drop-path is kept as a module, so it still drops paths in training
    original = timm.create_model("resnet18", drop_path_rate=0.1).eval()
    converted = hatnorm.convert(original, num_tasks=2)
    kept = [type(m).__name__ for m in converted.modules() if type(m).__name__ == "DropPath"]
    assert len(kept) == sum(type(m).__name__ == "DropPath" for m in original.modules()) == 7


def googlenet(num_classes: int) -> nn.Module:
    return torchvision.models.googlenet(num_classes=num_classes, aux_logits=True, init_weights=True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_auxiliary_classifiers_are_kept_and_learn_in_training(mode: str, tmp_path) -> None:
    original = pretrained_resnet(googlenet, tmp_path)
    probe = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = original(probe)
    model = hatnorm.convert(getattr(original, mode)(), num_tasks=2, example_input=probe)
    assert model.training == (mode == "train")
    # evaluation gives the logits alone, as the original does, and runs no auxiliary classifier
    hatnorm.open_gates(model)
    model.eval()
    calls = []
    hooks = [model.body.get_submodule(p).register_forward_hook(lambda *_: calls.append(1)) for p in ("aux1", "aux2")]
    with torch.no_grad():
        torch.testing.assert_close(model(probe, task=1), expected, atol=1e-5, rtol=0)
    assert not calls
    for hook in hooks:
        hook.remove()
    assert "body.aux1.fc2" in model.only_in_training() and "body.fc" not in model.only_in_training()
    # training returns what the original returns there, every logits tensor from heads of the task
    model = hatnorm.convert(original.eval(), num_tasks=2, num_classes=[3, 4])
    assert sum(isinstance(m, hatnorm.TaskHeads) for m in model.modules()) == 3
    hat = hatnorm.HAT(model)  # the auxiliary classifiers are protected too
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    aux_heads = model.body.aux1.fc2.task_heads.heads
    outputs, aux = [], [[h.weight.detach().clone() for h in aux_heads]]
    for task, classes in enumerate([3, 4]):
        hat.begin_task(task)
        for b in range(3):
            model.train()
            s = hat.scale(b, 3)
            x, y = torch.randn(8, 3, 32, 32) + task, torch.randint(0, classes, (8,))
            out = model(x, task=task, s=s)
            assert type(out).__name__ == "GoogLeNetOutputs" and all(o.shape == (8, classes) for o in out)
            loss = hat.loss(F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y) +
                                                                    F.cross_entropy(out.aux_logits2, y)), s)
            opt.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(opt)
        hat.end_task()
        aux.append([h.weight.detach().clone() for h in aux_heads])
        model.eval()
        with torch.no_grad():
            outputs.append(model(probe, task=0))
    assert torch.equal(outputs[0], outputs[1])  # no forgetting
    # each task's auxiliary head learns during its task only
    assert not torch.equal(aux[0][0], aux[1][0]) and torch.equal(aux[1][0], aux[2][0])
    assert torch.equal(aux[0][1], aux[1][1]) and not torch.equal(aux[1][1], aux[2][1])
    # export is for inference: the auxiliary classifiers are removed
    exported = hatnorm.export(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(exported(probe), model(probe, task=0), atol=1e-5, rtol=1e-5)
    assert type(exported.body.body.aux1.fc2).__name__ == "RemovedByExport"
    aux_parameters = sum(p.numel() for name in ("aux1", "aux2") for p in original.get_submodule(name).parameters())
    assert exported.parameters_saved > aux_parameters


class TrainingPathDiffers(nn.Module):
    """An auxiliary head in training, and a main path that differs in training too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.aux = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        x = self.bn(self.conv(x)).mean((2, 3))
        if self.training:
            return self.fc(x * 0.5), self.aux(x)
        return self.fc(x)


class FunctionalDropout(nn.Module):
    """A dropout written as a function of the mode, as timm's heads with ``drop_rate`` write it, and an
    auxiliary head behind it."""

    def __init__(self, aux: bool) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.fc, self.aux = nn.Linear(8, 3), nn.Linear(8, 3) if aux else None

    def forward(self, x: torch.Tensor):
        x = F.dropout(self.bn(self.conv(x)).mean((2, 3)), 0.5, training=self.training)
        if self.training and self.aux is not None:
            return self.fc(x), self.aux(x)
        return self.fc(x)


@pytest.mark.parametrize("aux", [False, True])
def test_a_functional_dropout_still_drops_in_training(aux: bool) -> None:
    torch.manual_seed(0)
    original = FunctionalDropout(aux).eval()
    model = hatnorm.convert(original, num_tasks=2)
    assert sum(type(m).__name__ == "ModeValue" for m in model.modules()) == 1
    hatnorm.open_gates(model)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, task=0), original(x), atol=1e-6, rtol=0)
        # in training it drops what the original drops (the same random draws)
        torch.manual_seed(1)
        expected = original.train()(x)
        torch.manual_seed(1)
        got = model.train()(x, task=0, s=400.0)
    for e, g in zip(expected if aux else [expected], got if aux else [got], strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_a_training_branch_that_cannot_be_kept_is_refused_naming_its_line() -> None:
    with pytest.raises(hatnorm.ConversionError, match=r"^module 'aux' \(Linear, 10 parameters\), test_convert\.py:"
                                                      r"\d+ `return self\.fc\(x \* 0\.5\), self\.aux\(x\)`: runs "
                                                      r"only in training, and the training forward's path"):
        hatnorm.convert(TrainingPathDiffers().eval(), num_tasks=2)


def test_a_model_that_moves_units_by_its_shapes_asks_for_an_example_input(tmp_path) -> None:
    model = pretrained_resnet(torchvision.models.shufflenet_v2_x0_5, tmp_path)
    with pytest.raises(hatnorm.ConversionError, match=r"shufflenetv2\.py:\d+ .*pass example_input"):
        hatnorm.convert(model, num_tasks=2)
    with pytest.raises(ValueError, match=r"example_input: the model cannot take a batch of shape \[2, 5, 32, 32\]"):
        hatnorm.convert(model, num_tasks=2, example_input=torch.randn(2, 5, 32, 32))
    with pytest.raises(TypeError, match="example_input must be a non-empty batch tensor"):
        hatnorm.convert(model, num_tasks=2, example_input=[1, 2])


class DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, channels, *_ = x.shape  # fx alone cannot iterate a traced shape
        x = self.conv(x) * (channels // 3)
        if x.sum() > 0:  # a branch on data: no single graph
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def test_models_fx_cannot_trace_are_traced_alongside_the_example_input(tmp_path) -> None:
    model = pretrained_transformers("ResNet", tmp_path, hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16)
    with pytest.raises(hatnorm.ConversionError, match=r"torch\.fx cannot trace ResNetForImageClassification: .*; with "
                                                      r"example_input, convert traces it alongside that batch"):
        hatnorm.convert(model, num_tasks=2)
    converted = hatnorm.convert(model, num_tasks=2, example_input=torch.randn(2, 3, 32, 32))
    assert converted(torch.randn(5, 3, 32, 32), task=1).shape == (5, 7)  # not specialised to the example's batch
    with pytest.raises(hatnorm.ConversionError, match="cannot trace DataBranch, even alongside example_input"):
        hatnorm.convert(DataBranch(), num_tasks=2, example_input=torch.randn(2, 3, 8, 8))


def test_drop_path_survives_conversion_and_drops_paths_in_training(tmp_path) -> None:
    original = pretrained_resnet(small_convnext, tmp_path)
    x = torch.randn(4, 3, 32, 32)
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln", example_input=x)
    drop_paths = [m for m in model.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert len(drop_paths) == 3  # one per block, kept as modules
    hatnorm.HAT(model)
    model.train()
    with torch.no_grad():
        first, second = model(x, task=0, s=400.0), model(x, task=0, s=400.0)
    assert not torch.equal(first, second)  # paths dropped at random, as the original does in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, task=0), model(x, task=0))


class Sinh(nn.Module):
    """sinh: acts on every value alone and maps 0 to 0, but convert has no rule for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sinh(x)


class Reverse(nn.Module):
    """Reverses the channels: only moves values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


class WithOwnOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.sinh = Sinh()
        self.reverse = Reverse()
        self.mix = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reverse(self.sinh(self.conv(x)))
        return self.fc(self.mix(x).mean((2, 3)))


def test_users_register_rules_for_their_own_ops() -> None:
    original = WithOwnOps().eval()
    with pytest.raises(hatnorm.ConversionError, match=r"operation sinh: .*hatnorm\.register_conversion_rule"):
        hatnorm.convert(original, num_tasks=2)
    hatnorm.register_conversion_rule(Sinh, "unitwise")
    hatnorm.register_conversion_rule(Reverse, "moves")
    x = torch.randn(2, 3, 8, 8)
    model = hatnorm.convert(original, num_tasks=2, example_input=x)
    assert any(isinstance(m, Sinh) for m in model.modules()) and any(isinstance(m, Reverse) for m in model.modules())
    hat = hatnorm.HAT(model)
    # the 1×1 conv reads the conv's gate reversed: its input unit i is the conv's unit 5 − i
    mix = next(layer for layer in hat.layers if layer.module is model.body.mix)
    conv = next(layer for layer in hat.layers if layer.module is model.body.conv)
    assert isinstance(mix.inp, hatnorm.blocks.Select) and mix.inp.source is conv.out
    assert mix.inp.index.tolist() == [5, 4, 3, 2, 1, 0]
    hatnorm.open_gates(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, task=1), original(x), atol=1e-5, rtol=0)


def test_register_conversion_rule_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"target must be a function, a tensor method.s name or an nn\.Module class"):
        hatnorm.register_conversion_rule(42, "unitwise")
    with pytest.raises(TypeError, match=r"target must be a function, a tensor method.s name or an nn\.Module class"):
        hatnorm.register_conversion_rule(int, "unitwise")
    with pytest.raises(ValueError, match=r"rule must be one of \['unitwise', 'moves', 'bookkeeping', 'scale'\], "
                                         r"got 'sideways'"):
        hatnorm.register_conversion_rule("flip", "sideways")


class FixedUnits(hatnorm.blocks.MaskSource):
    """A mask source whose earlier tasks used units 0 and 2 of 4."""

    num_features = 4

    def state(self) -> hatnorm.blocks.MaskState:
        used = torch.tensor([1.0, 0.0, 1.0, 0.0])
        return hatnorm.blocks.MaskState(cumulative=used, summative=used * 2)


def test_select_picks_units_and_reads_padding_as_unused() -> None:
    select = hatnorm.blocks.Select(FixedUnits(), torch.tensor([2, -1, 0, 1, 2]))
    assert select.num_features == 5
    state = select.state()
    assert state.cumulative.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # −1: a padded position, always 0
    assert state.summative.tolist() == [2.0, 0.0, 2.0, 0.0, 2.0]
    with pytest.raises(ValueError, match=r"index must lie in \[-1, 4\)"):
        hatnorm.blocks.Select(FixedUnits(), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="index must be a non-empty 1-D integer tensor"):
        hatnorm.blocks.Select(FixedUnits(), torch.tensor([0.5]))
    with pytest.raises(TypeError, match="source must be gates or other mask sources"):
        hatnorm.blocks.Select(3, torch.tensor([0]))


def test_a_relative_position_bias_gets_one_copy_per_task(tmp_path) -> None:
    original = pretrained_transformers("Swin", tmp_path, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                                       patch_size=4)
    model = hatnorm.convert(original, num_tasks=3, example_input=torch.randn(2, 3, 32, 32), norm="masked_ln")
    tables = [m for m in model.modules() if isinstance(m, hatnorm.blocks.TaskParameter)]
    assert len(tables) == 2  # one per attention block
    table = original.swin.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert tables[0].copies.shape == (3, *table.shape)
    assert all(torch.equal(tables[0].copies[t], table) for t in range(3))
    hat = hatnorm.HAT(model)
    hat.begin_task(1)
    multipliers = {id(p): m for p, m in hat._multipliers(1)}
    assert multipliers[id(tables[0].copies)][1].eq(1).all() and multipliers[id(tables[0].copies)][[0, 2]].eq(0).all()


def test_swin_v2_position_bias_mlp_and_logit_scale_get_one_copy_per_task(tmp_path) -> None:
    make, size, _ = MODELS["torchvision_swin_v2"]
    original = make(tmp_path)
    model = hatnorm.convert(original, num_tasks=3, example_input=torch.randn(2, 3, size, size), norm="masked_ln")
    attention = original.features[1][0].attn
    gated = [m for m in model.modules() if type(m).__name__ == "GatedShiftedWindowAttention"]
    assert len(gated) == 4 and all(m.version == 2 for m in gated)
    first = gated[0]
    assert len(first.cpb_mlp.copies) == 3 and first.logit_scale.copies.shape == (3, *attention.logit_scale.shape)
    for t in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first.cpb_mlp.copies[t].parameters(),
                                                     attention.cpb_mlp.parameters(), strict=True))
    hat = hatnorm.HAT(model)
    hat.begin_task(1)
    multipliers = {id(p): m for p, m in hat._multipliers(1)}
    for t, copy in enumerate(first.cpb_mlp.copies):
        assert all(multipliers[id(p)].eq(float(t == 1)).all() for p in copy.parameters())
    scale = multipliers[id(first.logit_scale.copies)]
    assert scale[1].eq(1).all() and scale[[0, 2]].eq(0).all()


def test_a_linear_no_norm_follows_has_its_gate_folded_into_its_weights() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    model = hatnorm.convert(original, num_tasks=2)
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("GatedLinear") == 2 and "NoNorm" not in kinds
    x = torch.randn(5, 8)
    hatnorm.open_gates(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, task=1), original(x), atol=1e-6, rtol=0)
    # the gates learn through the folded weights: (a ⊙ W)x + a ⊙ b
    model.train()
    model(x, task=1, s=1.0).sum().backward()
    gates = [m for m in model.modules() if isinstance(m, hatnorm.HATGate)]
    assert len(gates) == 2 and all(g.embedding.grad[1].abs().sum() > 0 for g in gates)


def test_attention_dropout_read_from_the_mode_follows_it(tmp_path) -> None:
    # transformers passes dropout_p=0.0 if not self.training else p to the attention: both traces are compared,
    # and the converted graph reads it from the mode it runs in
    original = pretrained_transformers("DeiT", tmp_path, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=8, attention_probs_dropout_prob=0.3)
    x = torch.randn(4, 3, 32, 32)
    model = hatnorm.convert(original, num_tasks=2, example_input=x, norm="masked_ln")
    values = [m for m in model.modules() if type(m).__name__ == "ModeValue"]
    assert [(v.when_training, v.when_evaluating) for v in values] == [(0.3, 0.0), (0.3, 0.0)]
    hatnorm.open_gates(model)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = original.train()(x).logits
        torch.manual_seed(1)
        got = model.train()(x, task=0, s=400.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
