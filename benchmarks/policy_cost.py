"""The cost of a training step under each gradient policy, as a ratio to a HAT step, measured in one run.

    python benchmarks/policy_cost.py            # ResNet-18 (masked BN) and vit_micro (masked LN), batch 64
    python benchmarks/policy_cost.py --quick    # ResNet-18 at base width 16

Every step is one of task 1 after task 0 was learned (so every policy has earlier tasks to protect): forward,
loss with the capacity regulariser, backward, ``HAT.protect``, ``HAT.step`` with Adam (FG-AdaHAT's optimizer
in the paper). The policies' steps are timed interleaved (median of ``--repeats``); the target is an FG-AdaHAT
step ≤ 1.3× a HAT step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from harness import Clock, cpu_model, inputs
from torch import nn

import hatnorm

POLICIES: dict[str, Callable[[], str | hatnorm.GradientPolicy]] = {
    "hat": lambda: "hat",
    "adahat (task start)": lambda: "adahat",
    "adahat (reference)": lambda: hatnorm.policies.AdaHATReferencePolicy(),
    "fg_adahat IG": lambda: hatnorm.policies.FGAdaHATPolicy(),
    "fg_adahat ICU": lambda: hatnorm.policies.FGAdaHATPolicy(importance="input_weight_abs_sum_x_activation_abs"),
    "fg_adahat OG": lambda: hatnorm.policies.FGAdaHATPolicy(alpha=1e-7, importance="output_weight_gradient_abs_sum",
                                                   base_linear=10.0),
}
TARGET = 1.3
SCALE = 100.0  # a scale from the middle of the schedule


def step_under(arch: str, norm: str, options: dict, policy: str | hatnorm.GradientPolicy, batch: int) -> Callable:
    """A training step of task 1 under ``policy``, after a task 0 of two steps."""
    torch.manual_seed(0)
    model: nn.Module = hatnorm.build(arch, num_tasks=2, norm=norm, num_classes=10, **options)
    hat = hatnorm.HAT(model, policy=policy)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = inputs(batch, torch.device("cpu"))

    def step(task: int) -> None:
        model.train()
        loss = hat.loss(F.cross_entropy(model(x, task=task, s=SCALE), y), SCALE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hat.protect(SCALE)
        hat.step(optimizer)

    hat.begin_task(0)
    for _ in range(2):
        step(0)
    hat.end_task()
    hat.begin_task(1)
    return lambda: step(1)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 at base width 16")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per policy (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per policy first")
    p.add_argument("--arch", nargs="+", choices=("resnet18", "vit_micro"), default=["resnet18", "vit_micro"],
                   help="architectures")
    args = p.parse_args(argv)
    models = {"resnet18": ("masked_bn", {"base_width": 16 if args.quick else 64}), "vit_micro": ("masked_ln", {})}
    models = {arch: models[arch] for arch in args.arch}
    clock = Clock(torch.device("cpu"), repeats=args.repeats, warmup=args.warmup)
    print(f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}; batch {args.batch}, "
          f"Adam, task 1 of 2, s = {SCALE:g}; median of {args.repeats} interleaved steps")
    found = {}
    for arch, (norm, options) in models.items():
        steps = {name: step_under(arch, norm, options, make(), args.batch) for name, make in POLICIES.items()}
        times = clock(steps)
        found[arch] = {name: t / times["hat"] for name, t in times.items()}
        print(f"\n{arch} ({norm}, {', '.join(f'{k} {v}' for k, v in options.items()) or 'defaults'}): "
              f"HAT step {times['hat'] * 1e3:.0f} ms")
        for name, ratio in found[arch].items():
            mark = "" if not name.startswith("fg_adahat") else ("  ok" if ratio <= TARGET else f"  > {TARGET}")
            print(f"  {name:<22} {ratio:5.2f}× a HAT step{mark}")
    return found


if __name__ == "__main__":
    main()
