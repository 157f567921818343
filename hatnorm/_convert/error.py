"""The error of :func:`hatnorm.convert`, in a module of its own so every conversion path can raise it."""

from __future__ import annotations


class ConversionError(ValueError):
    """A model, or a part of it, that :func:`hatnorm.convert` cannot turn into a HAT model."""
