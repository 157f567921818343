"""The masked LayerNorm's fused CPU kernels (:class:`hatnorm.norms.MaskedLayerNorm` on float32/float64 CPU tensors).

They need numba (``pip install 'hatnorm[fused]'``) and are loaded by the first masked-LayerNorm call that
uses them; without numba, or inside ``with kernels(False):``, or with ``HATNORM_FUSED=0`` in the
environment, the layer runs on ATen ops, with the same results to rounding (docs/performance.md).
"""

from hatnorm._fused import available, enabled, kernels, load

__all__ = ["available", "enabled", "kernels", "load"]
