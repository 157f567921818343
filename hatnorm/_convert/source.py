"""Where an operation of a traced forward comes from, for conversion messages: the module and the source line."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import torch
from torch import fx

_TORCH = Path(torch.__file__).parent
_TRACING = Path(__file__).with_name("tracing.py")
_HATNORM = Path(__file__).parents[1]


def where(node: fx.Node) -> str:
    """The innermost module whose forward holds ``node``, the source line (file name, line number and code)
    and the operation."""
    target = node.target
    op = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    stack = node.meta.get("nn_module_stack") or {}
    key, owner = next(reversed(stack.items()), ("", None))
    path = module_path(key)
    owner_name = owner[1].__name__ if isinstance(owner, tuple) and isinstance(owner[1], type) else None
    module = (f"module {path!r} ({owner_name})" if path and owner_name else f"module {path!r}" if path
              else "the model's own forward")
    frames = model_frames(node)
    return f"{module}{source_line(frames[-1]) if frames else ''}: operation {op}"


def module_path(key: str) -> str:
    """The module path of a key of a node's ``nn_module_stack``: ``torch.fx`` names the second call of a module
    ``path@1``, the third ``path@2``."""
    return re.sub(r"@\d+$", "", key)


def model_frames(node: fx.Node) -> list[tuple[str, str, str]]:
    """The frames (file, line number, code) of the model's own code that created ``node``, outermost first: the
    model's lines, not torch's or the tracer's."""
    return [f for f in re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
            if not Path(f[0]).is_relative_to(_TORCH) and Path(f[0]) != _TRACING]


def source_line(frame: tuple[str, str, str]) -> str:
    """``, file.py:123 `code```: a frame as messages show it."""
    return f", {Path(frame[0]).name}:{frame[1]} `{frame[2].strip()}`"


def raised_at(error: BaseException) -> str:
    """`` (stopped at file.py:123 `code`)``: the innermost line of the model's own code that ``error`` passed through
    (where tracing stopped), or ``""`` when it came from torch or hatnorm alone."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not Path(f.filename).is_relative_to(_TORCH) and not Path(f.filename).is_relative_to(_HATNORM)
              and f.line]
    if not frames:
        return ""
    return f" (stopped at{source_line((frames[-1].filename, str(frames[-1].lineno), frames[-1].line))[1:]})"


def call_site(gm: fx.GraphModule, name: str) -> str:
    """The source line that calls the module at path ``name`` in the traced forward (``aux1 = self.aux1(x)``)."""
    call = re.compile(rf"\bself\.{re.escape(name.rpartition('.')[2])}\(")
    for node in gm.graph.nodes:
        paths = {module_path(key) for key in node.meta.get("nn_module_stack") or {}}
        if name in paths or (node.op == "call_module" and node.target == name):
            frames = model_frames(node)
            calls = [f for f in frames if call.search(f[2])]
            return source_line(calls[-1] if calls else frames[-1]) if frames else ""
    return ""
