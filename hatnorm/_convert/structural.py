"""transformers models converted by their structure rather than by a graph walk.

Attention splits features into heads and mixes tokens, rotary embeddings rotate pairs of features, and
transformers' language models take several inputs and branch on them in Python: a unit-wise walk of one traced
graph cannot follow them. These models are rebuilt around their own weights from hatnorm's gated blocks, one
converter per family, chosen by the model's class name (so transformers stays optional) and imported on first
use. Each converter takes the model and ``num_tasks``, ``norms`` (:class:`~.norms.Norms`), ``num_classes`` and
``s_max`` as :func:`hatnorm.convert` received them, and returns a HAT model that, with every gate open, computes
what the original computes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

#: transformers class name → ``"module:function"`` of its structural converter
STRUCTURAL: dict[str, str] = {
    "ViTForImageClassification": "hatnorm._convert.vit:convert_vit",
    "BertForSequenceClassification": "hatnorm._convert.text_bert:convert_bert",
    "RobertaForSequenceClassification": "hatnorm._convert.text_bert:convert_roberta",
    "DistilBertForSequenceClassification": "hatnorm._convert.text_bert:convert_distilbert",
    "GPT2ForSequenceClassification": "hatnorm._convert.text_gpt2:convert_gpt2",
    "GPT2LMHeadModel": "hatnorm._convert.text_gpt2:convert_gpt2",
    "LlamaForCausalLM": "hatnorm._convert.text_llama:convert_llama",
    "LlamaForSequenceClassification": "hatnorm._convert.text_llama:convert_llama",
    "Qwen2ForCausalLM": "hatnorm._convert.text_llama:convert_llama",
    "Qwen2ForSequenceClassification": "hatnorm._convert.text_llama:convert_llama",
    "MistralForCausalLM": "hatnorm._convert.text_llama:convert_llama",
    "MistralForSequenceClassification": "hatnorm._convert.text_llama:convert_llama",
}


def structural_converter(module: nn.Module) -> Callable[..., nn.Module] | None:
    """The structural converter for ``module``'s class, or ``None`` when the graph walk converts it."""
    target = STRUCTURAL.get(type(module).__name__)
    if target is None:
        return None
    path, name = target.split(":")
    return getattr(importlib.import_module(path), name)
