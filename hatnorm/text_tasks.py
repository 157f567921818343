"""A synthetic continual language benchmark: algorithmic string tasks over one shared vocabulary.

No text corpus is needed (nor downloaded): every sample is generated from a seed by the rule of its task,
so the benchmark ships with the code. Two task sequences share the vocabulary :data:`VOCABULARY`:

- :func:`generation_tasks`, for a causal language model: a prompt ``<bos> x <sep>``, then the answer
  ``y <eos>``; the loss is taken on the answer tokens only and a sample counts as right when the greedy
  answer is exactly ``y <eos>`` (:data:`GENERATION_TASKS`: copy, reverse, sort, count, modular addition,
  closing brackets).
- :func:`classification_tasks`, for a BERT-style sequence classifier with a head per task: the input
  ``<bos> x <sep>`` and one label (:data:`CLASSIFICATION_TASKS`: majority, parity, contains a pattern,
  balanced brackets, sortedness; two classes each, exactly balanced).

Every task is a :class:`hatnorm.data.Task` over :class:`hatnorm.data.NamedTensorDataset` samples
``{"input_ids", "attention_mask", "labels"}``, padded on the right with ``<pad>`` (id 0) to the task's
longest possible sample. Generation labels are ``[N, L]`` next-token targets aligned with ``input_ids``
(transformers' causal-LM convention: the logits at position ``i − 1`` predict ``labels[:, i]``;
:data:`hatnorm.data.IGNORE_INDEX` on the prompt and the padding); classification labels are ``[N]``.
Test inputs never occur in the training set. ``docs/data.md`` states every task's rule, lengths and sizes.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from torch import Tensor

from hatnorm._checks import check_positive_int
from hatnorm.data import IGNORE_INDEX, NamedTensorDataset, Task

SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")
DIGITS = tuple("0123456789")
LETTERS = tuple("abcdefghijklmnop")
BRACKETS = tuple("()[]")
#: the shared vocabulary: token id i is ``VOCABULARY[i]``
VOCABULARY: tuple[str, ...] = (*SPECIALS, *DIGITS, *LETTERS, *BRACKETS, "+")
PAD, BOS, SEP, EOS = range(4)
_ID = {symbol: i for i, symbol in enumerate(VOCABULARY)}
_LETTER_IDS = np.array([_ID[c] for c in LETTERS])
_OPENING, _CLOSING = {_ID["("]: _ID[")"], _ID["["]: _ID["]"]}, {_ID[")"]: _ID["("], _ID["]"]: _ID["["]}


def encode(text: str) -> list[int]:
    """The token ids of ``text``, whitespace-separated symbols of :data:`VOCABULARY` (``"<bos> a b <sep>"``)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str of whitespace-separated symbols, got {type(text).__name__}")
    unknown = [symbol for symbol in text.split() if symbol not in _ID]
    if unknown:
        raise ValueError(f"text must hold only symbols of VOCABULARY {list(VOCABULARY)}, got {unknown}")
    return [_ID[symbol] for symbol in text.split()]


def decode(ids: Sequence[int] | Tensor) -> str:
    """The symbols of token ids, space-separated (the inverse of :func:`encode`)."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    size = len(VOCABULARY)
    bad = [i for i in values if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < size]
    if bad:
        raise ValueError(f"ids must be token ids in [0, {size}), got {bad}")
    return " ".join(VOCABULARY[i] for i in values)


Sample = tuple[list[int], list[int] | int]
Sampler = Callable[[np.random.Generator, int], Sample]


@dataclass(frozen=True)
class TextTask:
    """The rule of one task: how a sample is drawn, its longest ``x`` and ``y``, and its label count.

    Attributes:
        name: the task's name (its :class:`~hatnorm.data.Task` is named ``"text-<name>"``).
        sample: draws ``(x, y)`` from a generator: ``y`` the answer's tokens (generation) or the label
            asked for as the second argument (classification).
        max_prompt: the most tokens ``x`` holds.
        max_answer: the most tokens ``y`` holds (0 for classification).
        num_labels: 2 for a classification task, 0 for generation.
        rule: the rule in words.
    """

    name: str
    sample: Sampler
    max_prompt: int
    max_answer: int
    num_labels: int
    rule: str

    @property
    def length(self) -> int:
        """The padded sample length: ``<bos> x <sep>`` (and ``y <eos>`` for generation)."""
        return self.max_prompt + 2 + (self.max_answer + 1 if self.max_answer else 0)


def _letters(rng: np.random.Generator, low: int, high: int, alphabet: np.ndarray = _LETTER_IDS) -> list[int]:
    """Between ``low`` and ``high`` (inclusive) tokens drawn uniformly from ``alphabet``."""
    return rng.choice(alphabet, size=int(rng.integers(low, high + 1))).tolist()


def _number(value: int, digits: int = 0) -> list[int]:
    """``value`` in decimal digit tokens, zero-padded to ``digits``."""
    return [_ID[c] for c in str(value).zfill(digits)]


def _copy(rng: np.random.Generator, _: int) -> Sample:
    x = _letters(rng, 3, 8)
    return x, x


def _reverse(rng: np.random.Generator, _: int) -> Sample:
    x = _letters(rng, 3, 8)
    return x, x[::-1]


def _sort(rng: np.random.Generator, _: int) -> Sample:
    x = _letters(rng, 3, 8)
    return x, sorted(x)


def _count(rng: np.random.Generator, _: int) -> Sample:
    x = _letters(rng, 4, 12, _LETTER_IDS[:4])
    return x, _number(x.count(_ID["a"]))


def _add_mod(rng: np.random.Generator, _: int) -> Sample:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    return [*_number(a, 2), _ID["+"], *_number(b, 2)], _number((a + b) % 10)


def _open_brackets(rng: np.random.Generator, steps: int) -> tuple[list[int], list[int]]:
    """A random walk of ``steps`` brackets, each opening one (either kind) or closing the innermost open one;
    returns the brackets and the stack of those left open."""
    x: list[int] = []
    stack: list[int] = []
    for _ in range(steps):
        if stack and rng.random() < 0.5:
            x.append(_OPENING[stack.pop()])
        else:
            stack.append(_ID["(["[int(rng.integers(2))]])
            x.append(stack[-1])
    return x, stack


def _close(rng: np.random.Generator, _: int) -> Sample:
    x, stack = _open_brackets(rng, int(rng.integers(2, 11)))
    if not stack:
        stack.append(_ID["(["[int(rng.integers(2))]])
        x.append(stack[-1])
    return x, [_OPENING[b] for b in reversed(stack)]


def _first_half(x: list[int]) -> int:
    """How many tokens of ``x`` are letters a–h."""
    return sum(1 for t in x if t < _ID["i"])


def _drawn(rng: np.random.Generator, label: int, draw: Callable[[], list[int]],
           rule: Callable[[list[int]], int]) -> list[int]:
    """A draw of ``draw()`` whose label by ``rule`` is ``label`` (rejection: each label is frequent)."""
    while True:
        x = draw()
        if rule(x) == label:
            return x


def _majority(rng: np.random.Generator, label: int) -> Sample:
    length = int(rng.choice([5, 7, 9, 11]))
    return _drawn(rng, label, lambda: _letters(rng, length, length), lambda x: int(2 * _first_half(x) > len(x))), label


def _parity(rng: np.random.Generator, label: int) -> Sample:
    return _drawn(rng, label, lambda: _letters(rng, 4, 8), lambda x: _first_half(x) % 2), label


def _has_pattern(x: list[int]) -> int:
    a, b = _ID["a"], _ID["b"]
    return int(any(s == a and t == b for s, t in pairwise(x)))


def _contains(rng: np.random.Generator, label: int) -> Sample:
    if not label:
        return _drawn(rng, 0, lambda: _letters(rng, 6, 12), _has_pattern), 0
    x = _letters(rng, 4, 10)
    at = int(rng.integers(len(x) + 1))
    return [*x[:at], _ID["a"], _ID["b"], *x[at:]], 1


def _is_balanced(x: list[int]) -> int:
    stack: list[int] = []
    for t in x:
        if t in _OPENING:
            stack.append(t)
        elif not stack or stack.pop() != _CLOSING[t]:
            return 0
    return int(not stack)


def _balanced_word(rng: np.random.Generator, pairs: int) -> list[int]:
    """A random balanced word of ``pairs`` bracket pairs of either kind."""
    while True:
        x, stack = _open_brackets(rng, 2 * pairs)
        if not stack and len(x) == 2 * pairs:
            return x


def _balanced(rng: np.random.Generator, label: int) -> Sample:
    x = _balanced_word(rng, int(rng.integers(2, 7)))
    if label:
        return x, 1
    # unbalanced with the same brackets (shuffled), or with one bracket of the other kind
    if rng.random() < 0.5:
        return _drawn(rng, 0, lambda: rng.permutation(x).tolist(), _is_balanced), 0
    at = int(rng.integers(len(x)))
    swap = {_ID["("]: _ID["["], _ID["["]: _ID["("], _ID[")"]: _ID["]"], _ID["]"]: _ID[")"]}
    return [*x[:at], swap[x[at]], *x[at + 1:]], 0


def _is_sorted(x: list[int]) -> int:
    return int(all(s <= t for s, t in pairwise(x)))


def _sorted(rng: np.random.Generator, label: int) -> Sample:
    # both labels start from a sorted word of two letters at least; a negative has two unequal neighbours
    # swapped: one descent
    x = _drawn(rng, 1, lambda: sorted(_letters(rng, 4, 10)), lambda x: int(len(set(x)) > 1))
    if label:
        return x, 1
    at = int(rng.choice([i for i in range(len(x) - 1) if x[i] != x[i + 1]]))
    return [*x[:at], x[at + 1], x[at], *x[at + 2:]], 0


#: every task of the benchmark by name, generation tasks first; the index seeds it
CATALOG: dict[str, TextTask] = {t.name: t for t in (
    TextTask("copy", _copy, 8, 8, 0, "x: 3–8 letters a–p; y = x"),
    TextTask("reverse", _reverse, 8, 8, 0, "x: 3–8 letters a–p; y = x reversed"),
    TextTask("sort", _sort, 8, 8, 0, "x: 3–8 letters a–p; y = x sorted (a < b < … < p)"),
    TextTask("count", _count, 12, 2, 0, "x: 4–12 letters a–d; y = how many are a, in decimal digits"),
    TextTask("add_mod", _add_mod, 5, 1, 0, "x = m + n with m, n two-digit (zero-padded) in 0–99; "
             "y = (m + n) mod 10, one digit"),
    TextTask("close", _close, 11, 10, 0, "x: a random walk of 2–10 brackets ( [ that opens or closes the innermost "
             "open one, ending with one open at least; y = the brackets closing the open ones, innermost first"),
    TextTask("majority", _majority, 11, 0, 2, "x: 5, 7, 9 or 11 letters a–p; label 1 iff more than half are a–h"),
    TextTask("parity", _parity, 8, 0, 2, "x: 4–8 letters a–p; label = how many are a–h, mod 2"),
    TextTask("contains", _contains, 12, 0, 2, "x: 6–12 letters a–p; label 1 iff an a is directly followed by a b"),
    TextTask("balanced", _balanced, 12, 0, 2, "x: 4–12 brackets ( ) [ ]; label 1 iff balanced and properly nested; "
             "negatives are a balanced word shuffled, or with one bracket of the other kind"),
    TextTask("sorted", _sorted, 10, 0, 2, "x: 4–10 letters a–p; label 1 iff non-decreasing; negatives are a sorted "
             "word with one pair of unequal neighbours swapped"),
)}
GENERATION_TASKS = ("copy", "reverse", "sort", "count", "add_mod", "close")
CLASSIFICATION_TASKS = ("majority", "parity", "contains", "balanced", "sorted")


def _encoded(task: TextTask, x: list[int], y: list[int] | int) -> tuple[list[int], list[int] | int]:
    """``input_ids`` (unpadded) and labels of one sample."""
    prompt = [BOS, *x, SEP]
    if not task.max_answer:
        return prompt, y
    answer = [*y, EOS]
    return [*prompt, *answer], [IGNORE_INDEX] * len(prompt) + answer


def _make(task: TextTask, index: int, seed: int, train_size: int, test_size: int) -> Task:
    rng = np.random.default_rng([seed, index])
    total, seen = train_size + test_size, set()
    inputs: list[list[int]] = []
    labels: list[list[int] | int] = []
    tries = 0
    while len(inputs) < total:
        tries += 1
        if tries > 20 * total:
            raise ValueError(f"task {task.name!r} draws too few distinct samples for train_size + test_size = {total}; "
                             "ask for fewer")
        # classification: labels alternate, so both splits are balanced (exactly, for even sizes)
        x, y = task.sample(rng, len(inputs) % max(task.num_labels, 1))
        if tuple(x) in seen:
            continue
        seen.add(tuple(x))
        ids, target = _encoded(task, x, y)
        inputs.append(ids)
        labels.append(target)
    ids = torch.full((total, task.length), PAD, dtype=torch.int64)
    mask = torch.zeros((total, task.length), dtype=torch.int64)
    target = (torch.full((total, task.length), IGNORE_INDEX, dtype=torch.int64) if task.max_answer
              else torch.tensor(labels, dtype=torch.int64))
    for n, row in enumerate(inputs):
        ids[n, : len(row)] = torch.tensor(row)
        mask[n, : len(row)] = 1
        if task.max_answer:
            target[n, : len(row)] = torch.tensor(labels[n])
    splits = [NamedTensorDataset(input_ids=ids[part], attention_mask=mask[part], labels=target[part])
              for part in (slice(0, train_size), slice(train_size, total))]
    classes = tuple(range(len(VOCABULARY))) if task.max_answer else tuple(range(task.num_labels))
    return Task(f"text-{task.name}", classes, splits[0], splits[1])


def _tasks(names: Sequence[str], allowed: tuple[str, ...], what: str, seed: int, train_size: int,
           test_size: int) -> list[Task]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"names must be a non-empty sequence of {what} task names from {list(allowed)}, got {names!r}")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"names must be {what} task names from {list(allowed)}, got {unknown}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must not repeat a task, got {list(names)}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int ≥ 0, got {seed!r}")
    train_size = check_positive_int(train_size, "train_size")
    test_size = check_positive_int(test_size, "test_size")
    order = list(CATALOG)
    return [_make(CATALOG[n], order.index(n), int(seed), train_size, test_size) for n in names]


def generation_tasks(
    names: Sequence[str] = GENERATION_TASKS, *, seed: int = 0, train_size: int = 2000, test_size: int = 500
) -> list[Task]:
    """The generation tasks ``names`` in that order, for a causal language model.

    Each sample is ``input_ids = <bos> x <sep> y <eos> <pad>…``, ``attention_mask`` 1 on all but the padding,
    and ``labels`` ``[N, L]``: the ids of ``y <eos>`` at their positions, :data:`~hatnorm.data.IGNORE_INDEX`
    elsewhere. The task's classes are the vocabulary's ids, so a shared language-model head has
    ``num_classes = len(VOCABULARY)`` outputs. A task's samples depend on ``seed`` and the task alone, not on
    which other tasks are asked for or in which order; its test inputs differ from all its training inputs.

    Args:
        names: tasks of :data:`GENERATION_TASKS`, in the order of the sequence.
        seed: the seed of the samples (≥ 0).
        train_size: training samples per task.
        test_size: test samples per task.
    """
    return _tasks(names, GENERATION_TASKS, "generation", seed, train_size, test_size)


def classification_tasks(
    names: Sequence[str] = CLASSIFICATION_TASKS, *, seed: int = 0, train_size: int = 2000, test_size: int = 500
) -> list[Task]:
    """The sequence-classification tasks ``names`` in that order, for a classifier with a head per task.

    Each sample is ``input_ids = <bos> x <sep> <pad>…`` (``<bos>`` in the place of BERT's ``[CLS]``),
    ``attention_mask`` 1 on all but the padding, and one label in {0, 1}; labels alternate, so both splits
    are balanced (exactly, for even sizes). Samples depend on ``seed`` and the task alone; test inputs
    differ from all training inputs.

    Args:
        names: tasks of :data:`CLASSIFICATION_TASKS`, in the order of the sequence.
        seed: the seed of the samples (≥ 0).
        train_size: training samples per task.
        test_size: test samples per task.
    """
    return _tasks(names, CLASSIFICATION_TASKS, "classification", seed, train_size, test_size)


def chance_accuracy(task: Task) -> float:
    """A_R for a task of this benchmark: the accuracy of guessing whole answers at their training frequencies.

    Σ_a p_train(a) · p_test(a) over the distinct answers ``a`` (a class label, or the target tokens of a
    generation sample): the random stratified classifier of :func:`hatnorm.metrics.random_stratified_accuracy`
    with whole answers as its classes.

    Args:
        task: a task of :func:`generation_tasks` or :func:`classification_tasks`.
    """
    if not isinstance(task, Task) or not isinstance(task.train, NamedTensorDataset):
        raise TypeError(f"task must be a Task of hatnorm.text_tasks, got {task!r}")

    def frequencies(data: NamedTensorDataset) -> dict[tuple[int, ...], float]:
        labels = data.tensors[-1]
        answers = Counter(tuple(row[row != IGNORE_INDEX].tolist()) if labels.dim() == 2 else (int(row),)
                          for row in labels)
        return {a: n / len(labels) for a, n in answers.items()}

    train, test = frequencies(task.train), frequencies(task.test)
    return float(sum(p * test.get(a, 0.0) for a, p in train.items()))
