"""hatnorm.convert on transformers' GPT-2 (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``): the converted
model reproduces the original with open gates, with and without padding; the language-model head shares the token
embedding's tensor, protected once; an earlier task keeps its outputs bit-identical after a later one trains with
AdamW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm
from hatnorm import text_tasks
from hatnorm.training import HATMethod, TrainConfig, train_sequence

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, PAD = 64, 12, 0


def config(*, dropout: float = 0.0, **options) -> object:
    """A small config: hidden 32, 2 layers, 4 heads, vocabulary 64, padding id 0."""
    return transformers.GPT2Config(**{
        "vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "resid_pdrop": dropout,
        "embd_pdrop": dropout, "attn_pdrop": dropout, "num_labels": 3, "pad_token_id": PAD, "bos_token_id": 1,
        "eos_token_id": 2} | options)


def pretrained(kind: str, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    """``GPT2LMHeadModel`` (kind ``"lm"``) or ``GPT2ForSequenceClassification`` loaded from a state dict, its
    LayerNorms' γ and β away from 1 and 0."""
    torch.manual_seed(0)
    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification
    source = cls(config(**options))
    with torch.no_grad():
        for module in source.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    model = cls(config(**options))
    model.load_state_dict(source.state_dict())
    return model.to(dtype).eval()


def inputs(*, padding: str | None, seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    """Token ids with padding on the ``"right"`` or ``"left"`` of some rows (or none), and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((LENGTH, 7, 3, 9)[:n]):
        if padding == "right":
            mask[row, length:] = 0
        elif padding == "left":
            mask[row, : LENGTH - length] = 0
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


@pytest.mark.parametrize("kind", ["lm", "classifier"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_converted_gpt2_reproduces_the_original(kind: str, dtype: torch.dtype, tolerance: float) -> None:
    original = pretrained(kind, dtype)
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    hatnorm.open_gates(model)
    model.eval()
    assert all(p.dtype == dtype for p in model.parameters())
    for padding in (None, "right", "left"):
        batch = inputs(padding=padding)
        with torch.no_grad():
            expected, got = original(**batch).logits, model(**batch, task=1)
        if kind == "lm" and padding == "left":  # a padding token before every real one reads nothing: its logits
            real = batch["attention_mask"].bool()  # are left out, as every loss leaves them
            expected, got = expected[real], got[real]
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


def test_the_language_model_head_is_the_token_embedding_protected_once() -> None:
    original = pretrained("lm")
    assert original.lm_head.weight is original.transformer.wte.weight
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    token = model.body.embedding.token
    assert model.head.weight is token
    assert sum(p is token for p in model.parameters()) == 1
    wired = [layer.module for layer in model.hat_layers()]
    assert model.body.embedding in wired and model.head not in wired
    hat = hatnorm.HAT(model)
    hat.begin_task(0)
    hat.end_task()
    hat.begin_task(1)
    multipliers = hat.gradient_multipliers()
    used = model.body.gate_stream.cumulative.bool()
    names = [name for name, p in model.named_parameters() if p is token]
    assert names == ["body.embedding.token"] and names[0] in multipliers
    # every vocabulary row frozen in the columns of the stream units task 0 uses, free in the others
    assert bool((multipliers[names[0]][:, used] == 0).all()) and bool((multipliers[names[0]][:, ~used] == 1).all())


def test_an_untied_head_is_copied_and_protected_as_its_own_tensor() -> None:
    original = pretrained("lm", tie_word_embeddings=False)
    assert original.lm_head.weight is not original.transformer.wte.weight
    with torch.no_grad():
        original.lm_head.weight.normal_()
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    assert model.head.weight is not model.body.embedding.token
    assert torch.equal(model.head.weight, original.lm_head.weight)
    assert model.head in [layer.module for layer in model.hat_layers()]
    hatnorm.open_gates(model)
    batch = inputs(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch, task=0), original(**batch).logits, atol=1e-5, rtol=0)


def train_two_tasks(model: nn.Module, kind: str) -> list[torch.Tensor]:
    """Task 0 then task 1 under HAT with one AdamW (real gradients, a few steps each); task 0's outputs on a probe
    after each task."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    probe = inputs(padding="right", seed=99)
    outputs, states = [], []
    for task in range(2):
        hat.begin_task(task)
        for b in range(4):
            model.train()
            s = hat.scale(b, 4)
            batch = inputs(padding="right", seed=10 * task + b + 1)
            logits = model(**batch, task=task, s=s)
            if kind == "lm":  # next-token loss on the real tokens
                targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets.reshape(-1))
            else:
                loss = F.cross_entropy(logits, torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(b)))
            loss = hat.loss(loss, s)
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
    assert "body.embedding.token" in changed and any("blocks" in k for k in changed)  # task 1 trained
    return outputs


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_an_earlier_task_keeps_its_outputs_bit_identical_after_adamw(kind: str) -> None:
    model = hatnorm.convert(pretrained(kind), num_tasks=2, norm="masked_ln")
    outputs = train_two_tasks(model, kind)
    assert torch.equal(outputs[0], outputs[1])


def test_the_original_dropouts_run_in_training() -> None:
    original = pretrained("lm", dropout=0.1)
    model = hatnorm.convert(original, num_tasks=2, norm="masked_ln")
    hatnorm.open_gates(model)
    batch = inputs(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch, task=0), original(**batch).logits, atol=1e-5, rtol=0)
        model.train()
        assert not torch.equal(model(**batch, task=0, s=400.0), model(**batch, task=0, s=400.0))


@pytest.mark.parametrize("options", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True},
                                     {"activation_function": "relu", "n_inner": 24}])
def test_the_attention_scale_and_mlp_options_are_kept(options: dict) -> None:
    original = pretrained("lm", **options)
    model = hatnorm.convert(original, num_tasks=1, norm="masked_ln")
    hatnorm.open_gates(model)
    batch = inputs(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch, task=0), original(**batch).logits, atol=1e-5, rtol=0)


def test_a_converted_gpt2_language_model_trains_on_the_generation_tasks() -> None:
    tasks = text_tasks.generation_tasks(text_tasks.GENERATION_TASKS[:2], train_size=32, test_size=8)
    length = max(t.train[0]["input_ids"].shape[0] for t in tasks)

    def build() -> nn.Module:
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(text_tasks.VOCABULARY), n_embd=32, n_layer=2, n_head=4, n_positions=length,
            pad_token_id=text_tasks.PAD, bos_token_id=text_tasks.BOS, eos_token_id=text_tasks.EOS))
        return hatnorm.convert(gpt2, num_tasks=len(tasks), norm="masked_ln")

    result = train_sequence(build, tasks, HATMethod(), TrainConfig(epochs=1, batch_size=16, lr=1e-3,
                                                                    optimizer="adamw", schedule="constant"))
    assert len(result.accuracy) == 2 and all(len(row) == 2 for row in result.accuracy)
    assert all(0.0 <= a <= 1.0 for row in result.accuracy for a in row)


def test_without_a_padding_id_the_classifier_takes_one_row_at_a_time() -> None:
    original = pretrained("classifier", pad_token_id=None)
    model = hatnorm.convert(original, num_tasks=1, norm="masked_ln")
    hatnorm.open_gates(model)
    model.eval()
    ids = inputs(padding=None)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[:1], task=0), original(input_ids=ids[:1]).logits, atol=1e-5,
                                   rtol=0)
        with pytest.raises(ValueError, match=r"input_ids: a batch of 4 rows needs config\.pad_token_id"):
            model(input_ids=ids, task=0)


@pytest.mark.parametrize(("kind", "options", "convert_options", "message"), [
    ("lm", {}, {"num_classes": [5, 5]}, r"num_classes: a causal language model predicts its vocabulary"),
    ("lm", {"add_cross_attention": True}, {}, r"config\.add_cross_attention=True"),
    ("classifier", {"activation_function": "sigmoid"}, {},
     r"config\.activation_function='sigmoid' .*maps 0 to 0\.5"),
    ("classifier", {}, {"norm": "masked_bn"}, r"norm: .*'masked_bn' cannot replace LayerNorm"),
])
def test_a_model_that_cannot_convert_is_refused_naming_the_option(kind: str, options: dict, convert_options: dict,
                                                                  message: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=message):
        hatnorm.convert(pretrained(kind, **options), num_tasks=2, **({"norm": "masked_ln"} | convert_options))
