"""No file of hatnorm/ over 600 lines, no class over 400: a file or class past that holds several jobs, which split
along them (the conversion package: an op table, its handlers, the walk, the runtime modules; HAT: the method and
its optimizer safety)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES, MAX_CLASS_LINES = 600, 400


def test_no_file_of_hatnorm_is_over_600_lines() -> None:
    long_files = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "hatnorm").rglob("*.py"))
                  if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long_files, f"files over {MAX_FILE_LINES} lines (split them by job): {long_files}"


def test_no_class_of_hatnorm_is_over_400_lines() -> None:
    long_classes = {f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
                    for path in sorted((ROOT / "hatnorm").rglob("*.py"))
                    for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES}
    assert not long_classes, f"classes over {MAX_CLASS_LINES} lines: {long_classes}"
