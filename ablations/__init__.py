"""hatnorm's ablation scripts, runnable as ``python -m ablations.<name>``."""
