"""A stand-in for a third-party package that plugs into hatnorm through an entry point.

Its entry point names this module; importing it registers the gradient policy ``fake_plugin_policy``
with the public decorator, exactly as a real plugin would (see ``tests/test_registry.py``).
"""

from __future__ import annotations

from torch import Tensor

import hatnorm


@hatnorm.register_policy("fake_plugin_policy")
class HalfHATPolicy(hatnorm.GradientPolicy):
    """Half of HAT's rate: g' = (1 − a^{<t})·g / 2."""

    def rate(self, cumulative: Tensor, summative: Tensor, free: float) -> Tensor:
        return (1 - cumulative) / 2
