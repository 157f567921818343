"""hatnorm.export of converted language models: the exported task takes the converted model's named inputs
(``input_ids``, ``attention_mask``, ``token_type_ids``) and gives its logits; a LLaMA-family model loses the stream
and SwiGLU units the task does not use (a tied head stays tied to the pruned table), and keeps its attention heads
whole. Units read by index (a channel split in a converted graph) stay whole while the others are removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 64, 9
LLAMA_FAMILY = {
    "Llama": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "Qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "Mistral": {"sliding_window": 3},
}
LLAMA_CLASSES = [family + kind for family in LLAMA_FAMILY for kind in ("ForCausalLM", "ForSequenceClassification")]


def llama_family(name: str) -> nn.Module:
    """A small ``name`` (hidden 32, 2 layers, 4 heads over 2 kv heads, pad id 0, 3 labels), non-trivial RMSNorm γ."""
    family = next(f for f in LLAMA_FAMILY if name.startswith(f))
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0, **LLAMA_FAMILY[family])
    model = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model


def batch(seed: int, *, segments: bool = False) -> dict[str, torch.Tensor]:
    """Token ids ``[4, 9]`` padded (pad id 0) on the right of two rows and the left of one, with their mask (and
    segments when ``segments``)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, LENGTH, dtype=torch.long)
    mask[0, 6:], mask[1, 3:], mask[2, :5] = 0, 0, 0
    inputs = {"input_ids": torch.randint(3, VOCAB, (4, LENGTH), generator=generator) * mask, "attention_mask": mask}
    if segments:
        inputs["token_type_ids"] = (torch.arange(LENGTH) >= LENGTH // 2).long().expand(4, -1) * mask
    return inputs


def train_two_tasks(model: nn.Module, classes: int | None, *, segments: bool = False) -> None:
    """Three HAT steps with AdamW on task 0, then on task 1: next-token loss (``classes=None``) or class labels."""
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for task in (0, 1):
        hat.begin_task(task)
        model.train()
        for step in range(3):
            s = hat.scale(step, 3)
            inputs = batch(10 * task + step, segments=segments)
            logits = model(**inputs, task=task, s=s)
            if classes is None:
                labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)[:, 1:]
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
            else:
                loss = F.cross_entropy(logits, torch.arange(4) % classes)
            optimizer.zero_grad()
            hat.loss(loss, s).backward()
            hat.protect(s)
            hat.step(optimizer)
        hat.end_task()
    model.eval()


def assert_exports(model: nn.Module, task: int, **inputs: torch.Tensor) -> hatnorm.TaskModel:
    """Export ``task`` and check it gives the model's logits on ``inputs`` by name, with no gate or task-aware norm."""
    exported = hatnorm.export(model, task)
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs), model(**inputs, task=task), atol=1e-5, rtol=0)
    assert not exported.training
    assert not any(isinstance(m, hatnorm.HATGate | hatnorm.MaskedNorm | hatnorm.TaskHeads)
                   for m in exported.modules())
    return exported


@pytest.mark.parametrize("name", LLAMA_CLASSES)
def test_a_llama_family_export_takes_the_named_inputs_and_keeps_only_the_units_of_its_task(name: str) -> None:
    causal = name.endswith("CausalLM")
    model = hatnorm.convert(llama_family(name), num_tasks=3, norm="masked_rms")
    train_two_tasks(model, None if causal else 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for task in (0, 1, 2):  # two learned tasks and one never trained
        exported = assert_exports(model, task, **batch(99))
        ids, mask = batch(98).values()
        with torch.no_grad():  # by position, as the converted model takes them
            torch.testing.assert_close(exported(ids, mask), model(ids, mask, task=task), atol=1e-5, rtol=0)
            torch.testing.assert_close(exported(input_ids=ids), model(input_ids=ids, task=task), atol=1e-5, rtol=0)
        body = exported.body
        stream = int(model.gate_stream.selection(task).sum())
        assert body.embedding.token.shape == (VOCAB, stream) and body.norm.weight.shape == (stream,)
        for feedforward, converted in zip(body.feedforwards, model.feedforwards, strict=True):
            hidden = int(converted.gate.selection(task).sum())
            assert feedforward.up_proj.weight.shape == feedforward.gate_proj.weight.shape == (hidden, stream)
            assert feedforward.down_proj.weight.shape == (stream, hidden)
        for attention, converted in zip(body.attentions, model.attentions, strict=True):  # heads keep their width
            assert attention.to_q.weight.shape == (converted.to_q.out_features, stream)
            assert attention.to_k.weight.shape == attention.to_v.weight.shape == (converted.to_k.out_features, stream)
            assert attention.to_out.weight.shape == (stream, converted.to_out.in_features)
        if causal:
            assert body.head.weight.shape == (VOCAB, stream)
            # a head tied to the token table reads the pruned table itself
            assert (body.head.weight is body.embedding.token) == (model.head.weight is model.embedding.token)
        assert exported.parameters_saved > sum(g.embedding.numel() for g in model.modules()
                                               if isinstance(g, hatnorm.HATGate))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "export changed the model"


BERT_FAMILY = {
    "BertForSequenceClassification": transformers.BertConfig,
    "RobertaForSequenceClassification": transformers.RobertaConfig,
    "DistilBertForSequenceClassification": transformers.DistilBertConfig,
    "GPT2ForSequenceClassification": transformers.GPT2Config,
    "GPT2LMHeadModel": transformers.GPT2Config,
}


def bert_or_gpt2(name: str) -> nn.Module:
    """A small ``name``: width 32, 2 layers, 4 heads, vocabulary 64, 40 positions, pad id 0 (RoBERTa's 1), no
    dropout, 3 labels."""
    sizes = {
        "DistilBertConfig": {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "dropout": 0.0,
                             "attention_dropout": 0.0, "seq_classif_dropout": 0.0},
        "GPT2Config": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "resid_pdrop": 0.0,
                       "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    }
    config = BERT_FAMILY[name]
    options = sizes.get(config.__name__, {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                          "intermediate_size": 48, "hidden_dropout_prob": 0.0,
                                          "attention_probs_dropout_prob": 0.0, "type_vocab_size": 2})
    torch.manual_seed(0)
    return getattr(transformers, name)(config(vocab_size=VOCAB, max_position_embeddings=40, num_labels=3,
                                              pad_token_id=1 if name.startswith("Roberta") else 0, **options)).eval()


@pytest.mark.parametrize("name", list(BERT_FAMILY))
def test_a_bert_or_gpt2_export_takes_the_named_inputs(name: str) -> None:
    segments = name.startswith(("Bert", "Roberta"))
    model = hatnorm.convert(bert_or_gpt2(name), num_tasks=2, norm="masked_ln")
    train_two_tasks(model, None if name == "GPT2LMHeadModel" else 3, segments=segments)
    inputs = batch(99, segments=segments)
    if name.startswith("Roberta"):  # RoBERTa pads with id 1
        inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)
    for task in (0, 1):
        assert_exports(model, task, **inputs)


def test_an_exported_model_refuses_a_task_or_scale() -> None:
    model = hatnorm.convert(llama_family("LlamaForCausalLM"), num_tasks=2, norm="masked_rms")
    hatnorm.HAT(model)
    model.eval()
    exported = hatnorm.export(model, 1)
    ids = batch(0)["input_ids"]
    for named in ({"task": 0}, {"s": 400.0}):
        with pytest.raises(TypeError, match=f"inputs of task 1 alone, without task or s; got {next(iter(named))}="):
            exported(input_ids=ids, **named)


class Split(nn.Module):
    """conv → BN → split into two channel halves: one half through conv → BN, both pooled, then an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc1, self.bn3 = nn.Linear(10, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.relu(self.bn1(self.conv1(x))).chunk(2, dim=1)
        pooled = torch.cat([torch.relu(self.bn2(self.conv2(first))), second], 1).mean((2, 3))
        return self.fc2(torch.relu(self.bn3(self.fc1(pooled))))


def test_units_read_by_index_stay_whole_and_the_others_are_removed() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = hatnorm.convert(Split().eval(), num_tasks=2, example_input=x)
    hatnorm.HAT(model)
    model.eval()
    exported = hatnorm.export(model, 0)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x, task=0), atol=1e-5, rtol=0)
    hidden = next(g for g in model.modules() if isinstance(g, hatnorm.HATGate) and g.num_features == 16)
    exported_layers = dict(exported.body.body.named_modules())
    # conv1's channels (split) and conv2's (concatenated with the other half) are read by index: whole
    expected = {8: 8, 6: 6, 16: int(hidden.selection(0).sum())}
    assert 0 < expected[16] < 16
    layers = [(n, m) for n, m in model.body.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)
              and m.weight.shape[0] in expected]
    assert len(layers) == 3
    for name, layer in layers:
        assert exported_layers[name].weight.shape[0] == expected[layer.weight.shape[0]], name
