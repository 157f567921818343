"""How far Torch-Pruning's DepGraph gets on the models ``convert_coverage.py`` tries: the comparison behind
the choice of hatnorm's own graph walk (docs/architectures.md).

For every torchvision classification builder (random weights, evaluation mode, the same input sizes as
``convert_coverage.py``), ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``
is timed; a model counts when the graph builds and every Conv/Linear/norm layer of the model appears in
it. Building the groups is all DepGraph offers HAT: it does not rewrite the forward, so the gates, the
residual unions, the squeeze-excitation products and the parameters added to the stream would still
have to come from a graph walk of hatnorm's own.

    pip install torch-pruning   # not a hatnorm dependency
    python benchmarks/depgraph_coverage.py
"""

from __future__ import annotations

import time

import torch
from convert_coverage import CLASSES, torchvision_models
from run import cpu_model
from torch import nn

LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)


def main() -> None:
    try:
        import torch_pruning
    except ImportError:
        raise SystemExit("torch-pruning is not installed: pip install torch-pruning") from None
    print(f"torch-pruning {torch_pruning.__version__}, torch {torch.__version__}, {cpu_model()}, "
          f"{CLASSES} classes")
    built = 0
    models = torchvision_models()
    for name, make, size in models:
        torch.manual_seed(0)
        model = make().eval()
        started = time.perf_counter()
        try:
            example = torch.randn(1, 3, size, size)
            graph = torch_pruning.DependencyGraph().build_dependency(model, example_inputs=example)
            layers = [m for m in model.modules() if isinstance(m, LAYERS)]
            missing = sum(m not in graph.module2node for m in layers)
            result = "built" if not missing else f"built, {missing} of {len(layers)} layers missing"
            built += not missing
        except Exception as error:  # whatever DepGraph raises for a model it cannot take
            result = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        print(f"{name}: {result} ({time.perf_counter() - started:.2f} s)", flush=True)
    print(f"DepGraph builds the groups of {built} of {len(models)} torchvision builders")


if __name__ == "__main__":
    main()
