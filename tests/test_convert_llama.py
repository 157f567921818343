"""hatnorm.convert on transformers' LLaMA-family language models (Llama, Qwen2, Mistral; causal LM and sequence
classifier): the original's outputs with open gates, with and without padding; a closed gate removes exactly its
units (a rotated q/k pair whole, a kv head's value feature for its whole group, a SwiGLU hidden unit); an earlier
task's outputs bit-identical after AdamW on a later one (tied embeddings included); the trainer runs the converted
model on the synthetic language benchmark; what cannot convert is refused naming it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatnorm
from hatnorm import text_tasks
from hatnorm.data import IGNORE_INDEX
from hatnorm.training import HATMethod, TrainConfig, train_sequence

transformers = pytest.importorskip("transformers")
activations = pytest.importorskip("transformers.activations")

FAMILIES = ("Llama", "Qwen2", "Mistral")
KINDS = ("ForCausalLM", "ForSequenceClassification")
CLASSES = [family + kind for family in FAMILIES for kind in KINDS]
#: per family what its small config sets beyond the sizes: Llama with every bias and tied embeddings, Qwen2 (q/k/v
#: biases) with a sliding window on its second layer, Mistral with a window shorter than the sequences
OPTIONS = {
    "Llama": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "Qwen2": {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    "Mistral": {"sliding_window": 3},
}
VOCAB = 64


def original(name: str, dtype: torch.dtype = torch.float32, **options: object) -> nn.Module:
    """A small ``name`` (hidden 32, 2 layers, 4 heads over 2 kv heads, vocabulary 64, pad id 0, 3 labels), in
    evaluation mode, its weights drawn from seed 0 with non-trivial RMSNorm γ."""
    family = next(f for f in FAMILIES if name.startswith(f))
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, **({"pad_token_id": 0} | OPTIONS[family] | options))
    model = getattr(transformers, name)(config).to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Token ids ``[4, 9]`` without a mask, and with padding on the right and on the left (pad id 0 at the padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 9), generator=generator)
    right, left = torch.ones_like(ids), torch.ones_like(ids)
    right[0, 6:], right[1, 3:] = 0, 0
    left[2, :6] = 0
    return [(ids, None), (ids * right, right), (ids * left, left)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", CLASSES)
def test_each_class_reproduces_the_original_with_open_gates(name: str, dtype: torch.dtype) -> None:
    """Logits equal to the original's for batches with and without padding, every position of a causal LM included
    (transformers computes RMSNorm in float32 even for a float64 model: float64 agrees to 1e-7)."""
    source = original(name, dtype)
    model = hatnorm.convert(source, num_tasks=2, norm="masked_rms")
    hatnorm.HAT(model)
    hatnorm.open_gates(model)
    model.eval()
    with torch.no_grad():
        for ids, mask in batches(1):
            expected = source(input_ids=ids, attention_mask=mask).logits
            for task in (0, 1):
                got = model(input_ids=ids, attention_mask=mask, task=task)
                assert got.dtype == dtype and got.shape == expected.shape
                torch.testing.assert_close(got, expected, atol=1e-5 if dtype == torch.float32 else 1e-6, rtol=0)
        ids, mask = batches(1)[2]
        assert not torch.allclose(expected, source(input_ids=ids).logits)  # the left padding mattered


RMS_NORMS = [n for n in hatnorm.list_norms() if nn.RMSNorm in hatnorm.get_norm(n).replaces]


@pytest.mark.parametrize("norm", RMS_NORMS)
def test_every_rms_norm_stands_for_the_originals(norm: str) -> None:
    """Each norm that replaces an RMSNorm (masked, shared, per task) converts with γ in every task slot and gives the
    original's outputs with open gates, for every task."""
    source = original("LlamaForCausalLM")
    model = hatnorm.convert(source, num_tasks=2, norm=norm).eval()
    hatnorm.HAT(model)
    hatnorm.open_gates(model)
    with torch.no_grad():
        for ids, mask in batches(7):
            for task in (0, 1):
                torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=task),
                                           source(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["MistralForCausalLM", "Qwen2ForSequenceClassification"])
def test_the_sliding_window_is_the_originals(name: str) -> None:
    """A window of 3 changes the original's outputs, and the converted model follows it."""
    ids, mask = batches(2)[1]
    windowed, full = original(name), original(name, sliding_window=None, use_sliding_window=False)
    with torch.no_grad():
        assert not torch.allclose(windowed(input_ids=ids, attention_mask=mask).logits,
                                  full(input_ids=ids, attention_mask=mask).logits)
        for source in (windowed, full):
            model = hatnorm.convert(source, num_tasks=1, norm="masked_rms").eval()
            hatnorm.open_gates(model)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=0),
                                       source(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def closing(where: str) -> tuple[str, int, list[tuple[str, list[int]]]]:
    """A gate of layer 0 and one of its units, and the rows of the original's projections that closing it removes:
    q pair 5 (head 1, pair 1) is rows 9 and 13 of q_proj; k pair 2 (kv head 0, pair 2) rows 2 and 6 of k_proj; v unit
    11 (kv head 1, feature 3), read by query heads 2 and 3; SwiGLU unit 7 of gate_proj and up_proj."""
    return {
        "q_pair": ("attentions.0.gate_q", 5, [("self_attn.q_proj", [9, 13])]),
        "k_pair": ("attentions.0.gate_k", 2, [("self_attn.k_proj", [2, 6])]),
        "v_feature": ("attentions.0.gate_v", 11, [("self_attn.v_proj", [11])]),
        "mlp_unit": ("feedforwards.0.gate", 7, [("mlp.gate_proj", [7]), ("mlp.up_proj", [7])]),
    }[where]


@pytest.mark.parametrize("where", ["q_pair", "k_pair", "v_feature", "mlp_unit"])
def test_a_closed_gate_removes_exactly_its_units_from_the_original(where: str) -> None:
    """Closing one unit of a gate computes the original with that unit's rows (and biases) zeroed: a rotated q/k pair
    closes whole, so the rotation still acts on what is left; a kv head's v feature leaves every query head of its
    group; a SwiGLU unit leaves both of its projections."""
    source = original("Qwen2ForCausalLM", torch.float64)
    model = hatnorm.convert(source, num_tasks=1, norm="masked_rms").eval()
    hatnorm.open_gates(model)
    gate, unit, rows = closing(where)
    with torch.no_grad():
        model.get_submodule(gate).embedding[0, unit] = -6.0
        for path, indices in rows:
            projection = source.model.layers[0].get_submodule(path)
            projection.weight[indices] = 0
            if projection.bias is not None:
                projection.bias[indices] = 0
        for ids, mask in batches(3):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=0),
                                       source(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Qwen2ForSequenceClassification"])
def test_every_parameter_learns_and_attention_dropout_acts_in_training_only(name: str) -> None:
    """In training every parameter (tables, norms, each projection and bias, gates, the task's head) gets a non-zero
    gradient, and the original's attention dropout draws anew on every call; in evaluation the outputs are the
    original's."""
    source = original(name, attention_dropout=0.3)
    model = hatnorm.convert(source, num_tasks=2, norm="masked_rms")
    ids, mask = batches(6)[1]
    model.train()
    first = model(input_ids=ids, attention_mask=mask, task=0, s=50.0)
    first.square().sum().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.any())]
    assert silent == (["head.heads.1.weight"] if name.endswith("Classification") else [])
    with torch.no_grad():
        assert not torch.equal(first, model(input_ids=ids, attention_mask=mask, task=0, s=50.0))
        hatnorm.open_gates(model)
        model.eval()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=0),
                                   source(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def train_steps(model: nn.Module, hat: hatnorm.HAT, optimizer: torch.optim.Optimizer, task: int,
                classes: int | None) -> None:
    """Three HAT steps of ``task`` on random padded token ids: next-token loss (``classes=None``) or class labels."""
    generator = torch.Generator().manual_seed(10 + task)
    hat.begin_task(task)
    model.train()
    for step in range(3):
        s = hat.scale(step, 3)
        ids = torch.randint(1, VOCAB, (6, 9), generator=generator)
        mask = torch.ones_like(ids)
        mask[::2, 6:] = 0
        ids = ids * mask
        logits = model(input_ids=ids, attention_mask=mask, task=task, s=s)
        if classes is None:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)[:, 1:]
            task_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        else:
            task_loss = F.cross_entropy(logits, torch.randint(0, classes, (6,), generator=generator))
        loss = hat.loss(task_loss, s)
        optimizer.zero_grad()
        loss.backward()
        hat.protect(s)
        hat.step(optimizer)
    hat.end_task()
    model.eval()


@pytest.mark.parametrize("name", CLASSES)
def test_an_earlier_task_is_bit_identical_after_adamw_on_a_later_one(name: str) -> None:
    """Task 0 trained with HAT, then task 1 with AdamW: task 0's outputs do not move by a bit, task 1's do. Llama's
    causal LM ties its head to the embedding: one parameter, protected once."""
    causal = name.endswith("CausalLM")
    source = original(name)
    kept = {k: v.clone() for k, v in source.state_dict().items()}
    model = hatnorm.convert(source, num_tasks=2, norm="masked_rms", num_classes=None if causal else [3, 4])
    if name == "LlamaForCausalLM":
        assert model.head.weight is model.embedding.token
        assert sum(p is model.embedding.token for p in model.parameters()) == 1
    hat = hatnorm.HAT(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    probes = batches(4)

    def outputs(task: int) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(input_ids=ids, attention_mask=mask, task=task) for ids, mask in probes]

    train_steps(model, hat, optimizer, 0, None if causal else 3)
    before, other = outputs(0), outputs(1)
    train_steps(model, hat, optimizer, 1, None if causal else 4)
    after = outputs(0)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(other, outputs(1), strict=True))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in kept.items())  # the original is untouched


def test_the_converted_causal_lm_trains_on_the_language_benchmark() -> None:
    """A LlamaForCausalLM over the benchmark's vocabulary, converted, runs through the trainer on two generation tasks
    and gives a 2 × 2 accuracy matrix, task 0's accuracy unchanged by task 1."""
    tasks = text_tasks.generation_tasks(["copy", "count"], seed=0, train_size=40, test_size=16)
    config = transformers.LlamaConfig(vocab_size=len(text_tasks.VOCABULARY), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=text_tasks.PAD, tie_word_embeddings=True)

    def build() -> nn.Module:
        return hatnorm.convert(transformers.LlamaForCausalLM(config), num_tasks=2, norm="masked_rms")

    result = train_sequence(build, tasks, HATMethod(), TrainConfig(epochs=1, lr=3e-3, optimizer="adamw",
                                                                   schedule="constant", batch_size=16))
    assert [len(row) for row in result.accuracy] == [2, 2]
    assert all(0 <= a <= 1 for row in result.accuracy for a in row)
    assert result.accuracy[1][0] == result.accuracy[0][0] and result.loss[1][0] == result.loss[0][0]


def replaced(name: str, path: str, module: nn.Module) -> nn.Module:
    source = original(name)
    parent, _, attribute = path.rpartition(".")
    setattr(source.get_submodule(parent), attribute, module)
    return source


@pytest.mark.parametrize(("make", "options", "match"), [
    (lambda: original("LlamaForCausalLM"), {"norm": "masked_ln"},
     r"norm 'masked_ln' cannot replace model\.layers\.0\.input_layernorm: it replaces LayerNorm; norms that "
     r"replace RMSNorm: \['masked_rms'"),
    (lambda: replaced("Qwen2ForCausalLM", "model.layers.1.self_attn.k_proj", nn.Sequential(nn.Linear(32, 16))),
     {}, r"model\.layers\.1\.self_attn\.k_proj must be an nn\.Linear, got Sequential"),
    (lambda: original("LlamaForCausalLM"), {"num_classes": [5, 5]},
     r"num_classes: a causal LM predicts its vocabulary over one shared head: None or 64 for every task, got \[5, 5\]"),
])
def test_what_cannot_convert_is_refused_naming_it(make: object, options: dict, match: str) -> None:
    with pytest.raises(hatnorm.ConversionError, match=match):
        hatnorm.convert(make(), num_tasks=2, **({"norm": "masked_rms"} | options))


@pytest.mark.parametrize("name", sorted(activations.ACT2FN))
def test_every_activation_without_parameters_converts(name: str) -> None:
    """The SwiGLU gate closes the product, so any activation acting on every value alone converts, f(0) ≠ 0 included
    (sigmoid, laplace); one with parameters, which every unit would share, is refused naming the setting."""
    source = original("MistralForSequenceClassification", hidden_act=name)
    if list(source.model.layers[0].mlp.act_fn.parameters()):
        with pytest.raises(hatnorm.ConversionError, match=rf"config\.hidden_act='{name}' .* parameter\(s\) shared by"):
            hatnorm.convert(source, num_tasks=2, norm="masked_rms")
        return
    model = hatnorm.convert(source, num_tasks=2, norm="masked_rms").eval()
    hatnorm.open_gates(model)
    ids, mask = batches(5)[1]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, task=0),
                                   source(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_bad_inputs_are_refused_naming_them() -> None:
    model = hatnorm.convert(original("LlamaForSequenceClassification"), num_tasks=2, norm="masked_rms").eval()
    ids = torch.randint(1, VOCAB, (2, 5))
    for call, error, match in [
        (lambda: model(input_ids=ids.float(), task=0), TypeError, r"input_ids must be a tensor of token ids \[N, L\]"),
        (lambda: model(input_ids=ids[0], task=0), TypeError, r"got shape \[5\] and dtype torch\.int64"),
        (lambda: model(input_ids=ids + VOCAB, task=0), ValueError, r"token ids in \[0, 64\), got values in \[6[5-9]"),
        (lambda: model(input_ids=ids, attention_mask=torch.ones(2, 4), task=0), ValueError,
         r"attention_mask must be None or a 0/1 tensor of input_ids' shape \[2, 5\] on its device, got shape \[2, 4\]"),
        (lambda: model(input_ids=ids, attention_mask=torch.full((2, 5), 2), task=0), ValueError,
         "only 0 .padding. and 1"),
        (lambda: model(input_ids=ids, task=2), ValueError, r"task must be in \[0, 2\), got 2"),
    ]:
        with pytest.raises(error, match=match):
            call()
    unpadded = hatnorm.convert(original("LlamaForSequenceClassification", pad_token_id=None), num_tasks=1,
                               norm="masked_rms").eval()
    with pytest.raises(ValueError, match=r"input_ids: a classifier without config\.pad_token_id takes one sequence"):
        unpadded(input_ids=ids, task=0)
    assert unpadded(input_ids=ids[:1], task=0).shape == (1, 3)


def test_a_per_step_policy_damps_the_tied_table_per_stream_unit() -> None:
    """FG-AdaHAT on the tied causal LM: after task 0 the one table shared by the embedding and the head gets one rate
    per stream unit (the same for every token row), below 1 where task 0 used the unit."""
    model = hatnorm.convert(original("LlamaForCausalLM"), num_tasks=2, norm="masked_rms")
    hat = hatnorm.HAT(model, policy="fg_adahat")
    train_steps(model, hat, torch.optim.AdamW(model.parameters(), lr=1e-2), 0, None)
    hat.begin_task(1)
    rate = hat.policy.rates(hat.scale(0, 3))[model.embedding.token].expand(VOCAB, 32)
    assert torch.equal(rate, rate[:1].expand(VOCAB, 32))
    used = model.gate_stream.cumulative.bool()
    assert bool(used.any()) and bool((rate[0, used] < 1).all()) and bool((rate[0] > 0).all())
