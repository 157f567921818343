"""The synthetic language benchmark: deterministic from its seed, every label true to its task's rule, and trained
by the trainer end to end (exact match for generation, the usual accuracy matrix, nothing forgotten under HAT)."""

from __future__ import annotations

import re

import pytest
import torch
from text_models import TinyTextTransformer

from hatnorm import text_tasks
from hatnorm.data import IGNORE_INDEX, NamedTensorDataset, Task, fingerprint
from hatnorm.training import HATMethod, TrainConfig, evaluate, train_sequence

SMALL = {"train_size": 60, "test_size": 20}


def samples(task: Task, split: str = "train") -> list[tuple[list[str], list[str] | int]]:
    """Every sample of a split as ``(x, y)``: the symbols between ``<bos>`` and ``<sep>``, and the answer's symbols
    before ``<eos>`` (generation) or the label."""
    data = getattr(task, split)
    out = []
    for n in range(len(data)):
        row = data[n]
        symbols = text_tasks.decode(row["input_ids"][row["attention_mask"].bool()]).split()
        assert symbols[0] == "<bos>" and "<sep>" in symbols
        x = symbols[1: symbols.index("<sep>")]
        labels = row["labels"]
        if labels.dim() == 0:
            assert symbols[-1] == "<sep>"
            out.append((x, int(labels)))
        else:
            answer = text_tasks.decode(labels[labels != IGNORE_INDEX]).split()
            assert answer[-1] == "<eos>" and symbols[len(x) + 2:] == answer  # the targets are the tokens after <sep>
            out.append((x, answer[:-1]))
    return out


def balanced(symbols: list[str]) -> bool:
    text = "".join(symbols)
    while "()" in text or "[]" in text:
        text = text.replace("()", "").replace("[]", "")
    return text == ""


RULES = {
    "copy": lambda x: x,
    "reverse": lambda x: x[::-1],
    "sort": sorted,
    "count": lambda x: list(str(x.count("a"))),
    "add_mod": lambda x: [str((int("".join(x[:2])) + int("".join(x[3:]))) % 10)],
    "majority": lambda x: int(sum(c <= "h" for c in x) > len(x) / 2),
    "parity": lambda x: sum(c <= "h" for c in x) % 2,
    "contains": lambda x: int(re.search("ab", "".join(x)) is not None),
    "balanced": lambda x: int(balanced(x)),
    "sorted": lambda x: int(x == sorted(x)),
}


@pytest.mark.parametrize("name", list(text_tasks.CATALOG))
def test_every_label_follows_its_task_rule_and_the_test_inputs_are_new(name: str) -> None:
    kind = "generation" if name in text_tasks.GENERATION_TASKS else "classification"
    task = getattr(text_tasks, f"{kind}_tasks")([name], seed=3, **SMALL)[0]
    train, test = samples(task), samples(task, "test")
    for x, y in train + test:
        if name == "close":
            open_left = "".join(x)
            while "()" in open_left or "[]" in open_left:
                open_left = open_left.replace("()", "").replace("[]", "")
            # y closes what x left open, innermost first, and nothing more
            assert set(open_left) <= set("([") and len(y) == len(open_left) > 0 and balanced(x + y)
        else:
            assert y == RULES[name](x), (x, y)
    assert not {tuple(x) for x, _ in test} & {tuple(x) for x, _ in train}
    if kind == "classification":
        assert [y for _, y in train].count(1) == 30 and [y for _, y in test].count(1) == 10
        assert text_tasks.chance_accuracy(task) == 0.5


def test_the_same_seed_gives_identical_tensors_and_another_seed_other_ones() -> None:
    for make in (text_tasks.generation_tasks, text_tasks.classification_tasks):
        first, again, other = make(seed=0, **SMALL), make(seed=0, **SMALL), make(seed=1, **SMALL)
        for a, b, c in zip(first, again, other, strict=True):
            for split in ("train", "test"):
                tensors = [getattr(t, split).tensors for t in (a, b, c)]
                assert all(torch.equal(u, v) for u, v in zip(tensors[0], tensors[1], strict=True))
                assert not torch.equal(tensors[0][0], tensors[2][0])
                assert fingerprint(getattr(a, split)) == fingerprint(getattr(b, split))


def test_a_task_is_the_same_whichever_tasks_come_with_it() -> None:
    alone = text_tasks.generation_tasks(["sort"], seed=5, **SMALL)[0]
    among = text_tasks.generation_tasks(["close", "sort", "copy"], seed=5, **SMALL)[1]
    assert alone.name == among.name == "text-sort"
    assert fingerprint(alone.train) == fingerprint(among.train) and fingerprint(alone.test) == fingerprint(among.test)


def test_samples_are_named_inputs_the_vocabulary_round_trips_and_generation_classes_are_the_vocabulary() -> None:
    task = text_tasks.generation_tasks(["add_mod"], **SMALL)[0]
    assert isinstance(task.train, NamedTensorDataset)
    assert set(task.train[0]) == {"input_ids", "attention_mask", "labels"}
    assert task.num_classes == len(text_tasks.VOCABULARY)
    ids = task.train.tensors[0]
    assert ids.shape == (60, 9) and ids.dtype == torch.int64
    text = text_tasks.decode(ids[0])
    assert text_tasks.encode(text) == ids[0].tolist()
    classifier = text_tasks.classification_tasks(["balanced"], **SMALL)[0]
    assert classifier.classes == (0, 1) and classifier.train.tensors[-1].shape == (60,)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: text_tasks.generation_tasks(["parity"]), r"names must be generation task names .* got \['parity'\]"),
    (lambda: text_tasks.classification_tasks("parity"), "names must be a non-empty sequence"),
    (lambda: text_tasks.generation_tasks(["copy", "copy"]), "must not repeat"),
    (lambda: text_tasks.generation_tasks(seed=-1), "seed must be an int ≥ 0, got -1"),
    (lambda: text_tasks.generation_tasks(train_size=0), "train_size"),
    (lambda: text_tasks.generation_tasks(["add_mod"], train_size=9_990, test_size=20),  # 100 × 100 inputs
     "'add_mod' draws too few distinct samples for train_size"),
    (lambda: text_tasks.encode("a z"), r"got \['z'\]"),
    (lambda: text_tasks.decode([3, 35]), r"token ids in \[0, 35\), got \[35\]"),
])
def test_bad_arguments_are_refused_naming_them(call: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call()


class NextTokenTable(torch.nn.Module):
    """A causal model whose logits at a position depend on that position's token alone: a table [V, V]."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                task: int) -> torch.Tensor:
        return self.table(input_ids)


def test_exact_match_is_the_greedy_answer_decoded_token_by_token() -> None:
    task = text_tasks.generation_tasks(["count"], seed=0, train_size=20, test_size=100)[0]
    torch.manual_seed(0)
    model = NextTokenTable(task.num_classes)
    sep, zero, eos = text_tasks.encode("<sep> 0 <eos>")
    with torch.no_grad():  # after <sep> it answers 0, after 0 it ends: right exactly where no letter is an a
        model.table.weight[sep, zero] = model.table.weight[zero, eos] = 10.0
    right = []
    for ids, labels in zip(task.test.tensors[0], task.test.tensors[-1], strict=True):
        start = int((labels != IGNORE_INDEX).nonzero()[0])
        tokens, answer = ids[:start].tolist(), labels[labels != IGNORE_INDEX].tolist()
        while len(tokens) < start + len(answer):
            tokens.append(int(model(torch.tensor([tokens]), task=0)[0, -1].argmax()))
        right.append(tokens[start:] == answer)
    _, accuracy = evaluate(model, task.test, 0)
    assert 0 < sum(right) < len(right)
    assert accuracy == sum(right) / len(right)


def test_the_trainer_trains_both_sequences_with_hat_and_forgets_nothing() -> None:
    config = TrainConfig(epochs=2, lr=3e-3, optimizer="adamw", schedule="cosine", batch_size=16, recalibrate=True)
    for causal, tasks in ((True, text_tasks.generation_tasks(["copy", "count"], **SMALL)),
                          (False, text_tasks.classification_tasks(["balanced", "contains"], **SMALL))):
        def build(causal: bool = causal, tasks: list[Task] = tasks) -> TinyTextTransformer:
            return TinyTextTransformer([t.num_classes for t in tasks], num_tasks=2, causal=causal)

        result = train_sequence(build, tasks, HATMethod(), config)
        assert len(result.accuracy) == 2 and all(len(row) == 2 for row in result.accuracy)
        assert all(0 <= a <= 1 for row in result.accuracy for a in row)
        # task 0's accuracy and loss after training task 1 are those right after it: bit for bit
        assert result.accuracy[1][0] == result.accuracy[0][0] and result.loss[1][0] == result.loss[0][0]
        assert result.loss[1][1] < result.loss[0][1]  # task 1 was learned


def test_named_datasets_and_next_token_labels_are_checked_at_construction() -> None:
    ids = torch.ones(3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"labels, last; got the names \['labels', 'input_ids'\]"):
        NamedTensorDataset(labels=ids, input_ids=ids)
    with pytest.raises(ValueError, match=r"the same number of samples each, got \{'input_ids': 3, 'labels': 2\}"):
        NamedTensorDataset(input_ids=ids, labels=ids[:2])
    good = NamedTensorDataset(input_ids=ids, labels=torch.tensor([[IGNORE_INDEX, 1, 2, 0]] * 3))
    assert Task("lm", tuple(range(5)), good, good).num_classes == 5
    outside = NamedTensorDataset(input_ids=ids, labels=torch.tensor([[IGNORE_INDEX, 1, 2, 0]] * 2 + [[0, 7, 0, 0]]))
    with pytest.raises(ValueError, match=r"test labels must be local to the task, in \[0, 5\) or -100 \(no target\) "
                                         r"for its classes \[0, 1, 2, 3, 4\]; got 7 at sample 2"):
        Task("lm", tuple(range(5)), good, outside)
    empty = NamedTensorDataset(input_ids=ids, labels=torch.tensor([[IGNORE_INDEX, 1, 2, 0]] * 2 + [[IGNORE_INDEX] * 4]))
    with pytest.raises(ValueError, match="every train sample needs at least one target token, but sample 2 holds only"):
        Task("lm", tuple(range(5)), empty, good)


def test_a_model_whose_logits_do_not_fit_next_token_labels_is_refused_naming_both_shapes() -> None:
    task = text_tasks.generation_tasks(["copy"], **SMALL)[0]
    classifier = TinyTextTransformer([2], num_tasks=1, causal=False)
    with pytest.raises(ValueError, match=r"labels of shape \[20, 19\] are next-token targets \[N, L\]: the model must "
                                         r"return logits \[N, L, vocabulary\], got \[20, 2\]"):
        evaluate(classifier, task.test, 0)
