"""hatnorm.convert on transformers' BERT-family classifiers (BERT, RoBERTa, DistilBERT): the converted model
reproduces the original with open gates, with and without padding, keeps an earlier task's outputs bit-identical
after a later task trains with AdamW, and trains through hatnorm.training on the shipped text tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm
from hatnorm import text_tasks
from hatnorm.training import HATMethod, TrainConfig, train_sequence

transformers = pytest.importorskip("transformers")

FAMILIES = ("bert", "roberta", "distilbert")
VOCAB, LENGTH = 64, 12


def config(family: str, *, dropout: float = 0.0, **options) -> object:
    """A small config: hidden 32, 2 layers, 4 heads, vocabulary 64 (RoBERTa's padding id 1, the others' 0)."""
    if family == "distilbert":
        return transformers.DistilBertConfig(**{
            "vocab_size": VOCAB, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "dropout": dropout,
            "attention_dropout": dropout, "seq_classif_dropout": dropout, "max_position_embeddings": 40,
            "num_labels": 3} | options)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 48, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
              "max_position_embeddings": 40, "num_labels": 3, "type_vocab_size": 2} | options
    if family == "roberta":
        return transformers.RobertaConfig(**{"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2} | common)
    return transformers.BertConfig(**common)


CLASSES = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
           "distilbert": "DistilBertForSequenceClassification"}


def pretrained(family: str, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    """The classifier built from its config and loaded from a state dict, its LayerNorms' γ and β away from 1 and 0."""
    torch.manual_seed(0)
    cls = getattr(transformers, CLASSES[family])
    source = cls(config(family, **options))
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    model = cls(config(family, **options))
    model.load_state_dict(source.state_dict())
    return model.to(dtype).eval()


def inputs(family: str, *, padded: bool, seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    """Token ids (padding on the right of some rows when ``padded``), their mask, and segments where the model
    takes them."""
    generator = torch.Generator().manual_seed(seed)
    pad = 1 if family == "roberta" else 0
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate((LENGTH, 7, 3, 9)[:n]):
            mask[row, length:] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if family != "distilbert":
        batch["token_type_ids"] = (torch.arange(LENGTH) >= LENGTH // 2).long().expand(n, -1) * mask
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_converted_encoder_reproduces_the_original(family: str, dtype: torch.dtype, tolerance: float) -> None:
    original = pretrained(family, dtype)
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    hatnorm.open_gates(model)
    model.eval()
    assert all(p.dtype == dtype for p in model.parameters())
    for padded in (False, True):
        batch = inputs(family, padded=padded)
        with torch.no_grad():
            expected = original(**batch).logits
            for task in (0, 1):
                torch.testing.assert_close(model(**batch, task=task), expected, atol=tolerance, rtol=0)
            # without a mask every token is read, as in the original
            unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
            torch.testing.assert_close(model(**unmasked, task=0), original(**unmasked).logits, atol=tolerance, rtol=0)


def test_every_layer_norm_becomes_the_chosen_norm_with_its_statistics() -> None:
    original = pretrained("bert")
    model = hatnorm.convert(original, num_tasks=3, norm="task_ln")
    norms = [m for m in model.modules() if isinstance(m, hatnorm.MaskedNorm)]
    originals = [m for m in original.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == len(originals) == 1 + 2 * 2
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    for norm, layer_norm in zip(norms, originals, strict=True):
        assert norm.eps == layer_norm.eps
        for task in range(3):
            assert torch.equal(norm.weight[task], layer_norm.weight) and torch.equal(norm.bias[task], layer_norm.bias)


def train_two_tasks(model: nn.Module, family: str, probe: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Task 0 then task 1 under HAT with one AdamW (real gradients, a few steps each); task 0's logits on ``probe``
    after each task, and every parameter after each."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    outputs, states = [], []
    for task, classes in enumerate((3, 4)):
        hat.begin_task(task)
        for b in range(4):
            model.train()
            s = hat.scale(b, 4)
            batch = inputs(family, padded=True, seed=10 * task + b + 1)
            labels = torch.randint(0, classes, (4,), generator=torch.Generator().manual_seed(b))
            loss = hat.loss(F.cross_entropy(model(**batch, task=task, s=s), labels), s)
            optimizer.zero_grad()
            loss.backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
        model.eval()
        with torch.no_grad():
            outputs.append(model(**probe, task=0))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    changed = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert any("embedding" in k for k in changed) and any("blocks" in k for k in changed)  # task 1 trained
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_an_earlier_task_keeps_its_outputs_bit_identical_after_adamw(family: str) -> None:
    """Invariant 5 for a post-norm encoder: every LayerNorm reads an ungated sum whose other units task 1 rewrites,
    and the masked LayerNorm's statistics over task 0's units alone keep task 0 exactly."""
    model = hatnorm.convert(pretrained(family), num_tasks=2, norm="masked_ln", num_classes=[3, 4])
    outputs = train_two_tasks(model, family, inputs(family, padded=True, seed=99))
    assert torch.equal(outputs[0], outputs[1])


def test_a_shared_layer_norm_reads_the_ungated_sum_and_drifts() -> None:
    """The post-norm structure is kept: a shared LayerNorm takes its statistics over every unit of the ungated sum,
    so what task 1 writes into its own units moves task 0's outputs (which the masked LayerNorm prevents)."""
    model = hatnorm.convert(pretrained("bert"), num_tasks=2, norm="shared_ln", num_classes=[3, 4])
    outputs = train_two_tasks(model, "bert", inputs("bert", padded=True, seed=99))
    assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_original_dropouts_run_in_training(family: str) -> None:
    original = pretrained(family, dropout=0.1)
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    hatnorm.open_gates(model)
    batch = inputs(family, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch, task=0), original(**batch).logits, atol=1e-5, rtol=0)
        model.train()
        assert not torch.equal(model(**batch, task=0, s=400.0), model(**batch, task=0, s=400.0))


def test_roberta_positions_count_the_tokens_after_left_padding() -> None:
    """RoBERTa's position ids come from input_ids (non-padding tokens count from padding_idx + 1), so left padding
    gives the real tokens the positions they have unpadded, as in the original."""
    original = pretrained("roberta")
    model = hatnorm.convert(original, num_tasks=1, norm="masked_ln")
    hatnorm.open_gates(model)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    ids[1, :3] = 1
    mask = (ids != 1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=0),
                                   original(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_a_converted_bert_classifier_trains_on_the_text_tasks() -> None:
    tasks = text_tasks.classification_tasks(text_tasks.CLASSIFICATION_TASKS[:2], train_size=64, test_size=32)
    length = max(t.train[0]["input_ids"].shape[0] for t in tasks)

    def build() -> nn.Module:
        bert = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=len(text_tasks.VOCABULARY), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=length, num_labels=2, pad_token_id=text_tasks.PAD))
        return hatnorm.convert(bert, num_tasks=len(tasks), norm="masked_ln", num_classes=[t.num_classes for t in tasks])

    result = train_sequence(build, tasks, HATMethod(), TrainConfig(epochs=1, batch_size=16, lr=1e-3,
                                                                    optimizer="adamw", schedule="constant"))
    assert len(result.accuracy) == 2 and all(len(row) == 2 for row in result.accuracy)
    assert all(0.0 <= a <= 1.0 for row in result.accuracy for a in row)


@pytest.mark.parametrize(("family", "options", "message"), [
    ("bert", {"is_decoder": True}, r"config\.is_decoder=True"),
    ("bert", {"hidden_act": "sigmoid"}, r"config\.hidden_act='sigmoid' .*maps 0 to 0\.5"),
    ("distilbert", {"activation": "sigmoid"}, r"config\.activation='sigmoid' .*maps 0 to 0\.5"),
])
def test_a_model_that_cannot_convert_is_refused_naming_the_option(family: str, options: dict, message: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=message):
        hatnorm.convert(pretrained(family, **options), num_tasks=2, norm="masked_ln")


@pytest.mark.parametrize("norm", ["masked_bn", "masked_rms"])
def test_a_norm_that_cannot_replace_a_layer_norm_is_refused(norm: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=rf"norm: .*{norm!r} cannot replace LayerNorm"):
        hatnorm.convert(pretrained("roberta"), num_tasks=2, norm=norm)


def test_inputs_the_model_cannot_take_are_refused_naming_them() -> None:
    model = hatnorm.convert(pretrained("distilbert"), num_tasks=2, norm="masked_ln")
    model.eval()
    batch = inputs("distilbert", padded=True)
    with pytest.raises(ValueError, match="token_type_ids: this model has no token-type embedding"):
        model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), task=0)
    with pytest.raises(ValueError, match=r"input_ids must have at most 40 tokens"):
        model(input_ids=torch.ones(1, 41, dtype=torch.long), task=0)
    with pytest.raises(ValueError, match=r"input_ids must hold integer token ids"):
        model(input_ids=torch.ones(1, 4), task=0)
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of input_ids' shape \[4, 12\]"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :5], task=0)
