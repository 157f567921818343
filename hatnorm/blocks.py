"""The blocks a HAT model is wired from: what a hand-written :class:`hatnorm.HATModule` lists as its layers, and the
modules :func:`hatnorm.convert` puts into a converted model.

- :class:`Layer` ties a module's parameters to the gates of its output and input units;
- :class:`MaskSource` is what gives a layer its units' gate (a :class:`hatnorm.HATGate`, or one of
  :class:`Residual`, :class:`Concat`, :class:`Select`, :class:`Flatten` combining gates), :class:`MaskState` what
  earlier tasks left on those units;
- :class:`GatedAttention`, :class:`GatedFeedForward`, :class:`TokenEmbedding`, :func:`run_blocks` and
  :func:`blocks_wiring` build a gated transformer (:class:`StreamEmbedding` and :class:`SharedLMHead` a language
  model's embedding and its head over a shared vocabulary), :class:`Wiring` says which gate feeds which module;
- :class:`TaskParameter` and :class:`ParameterUse` hold the parameters a converted model reads directly.
"""

from hatnorm._convert import ParameterUse, TaskParameter
from hatnorm._hat import Layer
from hatnorm._masks import Concat, Flatten, MaskSource, MaskState, Residual, Select
from hatnorm._step_policy import Wiring
from hatnorm._transformer import (
    GatedAttention,
    GatedFeedForward,
    SharedLMHead,
    StreamEmbedding,
    TokenEmbedding,
    blocks_wiring,
    run_blocks,
)

__all__ = [
    "Concat",
    "Flatten",
    "GatedAttention",
    "GatedFeedForward",
    "Layer",
    "MaskSource",
    "MaskState",
    "ParameterUse",
    "Residual",
    "Select",
    "SharedLMHead",
    "StreamEmbedding",
    "TaskParameter",
    "TokenEmbedding",
    "Wiring",
    "blocks_wiring",
    "run_blocks",
]
