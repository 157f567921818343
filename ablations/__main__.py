"""The ablations' command line: ``python -m ablations [COMMAND] [options]``.

Commands: norms, layernorm, channelnorm, sweep, policy, pretrained, depth, language, cifar, curves, demo,
report.

With no arguments it runs the default ablation, ``norms`` on the embedded Split-MNIST.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = ("norms", "layernorm", "channelnorm", "sweep", "policy", "pretrained", "depth", "language", "cifar",
            "curves", "demo", "report")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:")
        for name in COMMANDS:
            module = __import__(f"ablations.{name}", fromlist=["main"])
            print(f"  {name:10s} {module.__doc__.splitlines()[0]}")
        print("\n`python -m ablations COMMAND --help` lists a command's options.")
        return
    command = "norms"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in COMMANDS:
            sys.exit(f"python -m ablations: unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    __import__(f"ablations.{command}", fromlist=["main"]).main(argv)


if __name__ == "__main__":
    main()
