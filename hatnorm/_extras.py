"""The optional dependencies: a feature that needs one of pyproject.toml's extras names it when it is missing."""

from __future__ import annotations


def missing(feature: str, module: str, extra: str) -> ImportError:
    """The error of ``feature``, which needs ``module`` (installed by the extra ``extra``) where it is not installed.

    Args:
        feature: what needs the module, as the user knows it (``"hatnorm.stats"``).
        module: the top-level module that could not be imported.
        extra: the extra of ``hatnorm`` that installs it.
    """
    return ImportError(f"{feature} needs {module}, which is not installed: pip install 'hatnorm[{extra}]'",
                       name=module)
