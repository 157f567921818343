"""The reference architectures; importing this package registers each of them with hatnorm."""

from architectures import alexnet, mlp, resnet, vit

__all__ = ["alexnet", "mlp", "resnet", "vit"]
