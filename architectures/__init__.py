"""The reference architectures; importing this package registers each of them with hatnorm."""

from architectures import mlp

__all__ = ["mlp"]
