"""The house rules of the source tree, checked on the code (not on comments or docstrings):

* rules edit graphs only through :class:`fxfuse.RewriteContext` (no ``ctx.graph``), so every edit is counted and
  keeps the model's other users intact;
* op targets are spelled only in the op table :mod:`fxfuse.ir.ops`: no rule, no surgery, no capture names
  ``operator.add``, ``F.conv2d``, ``torch.ops.aten…``, ``torch._assert`` … itself."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxfuse"
RULES = sorted((PACKAGE / "rules").glob("*.py"))
NO_TARGETS = [*RULES, *sorted((PACKAGE / "rewrite").glob("*.py")), *sorted((PACKAGE / "capture").glob("*.py")),
              PACKAGE / "verified.py"]
# fx surgery a rule would do itself: node / graph methods that edit, and node fields it would assign.
SURGERY = {"replace_all_uses_with", "replace_input_with", "update_arg", "update_kwarg", "erase_node", "prepend",
           "node_copy", "inserting_before", "inserting_after", "call_function", "call_module", "call_method",
           "get_attr", "create_node"}
NODE_FIELDS = {"meta", "args", "kwargs", "target", "op"}
TARGET_MODULES = {"operator", "F", "aten"}  # modules whose attributes are op targets
TARGET_TORCH = {"ops", "_assert", "split", "cat", "concat", "add", "sub", "mul", "div"}  # torch.<these>


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _findings(path: Path, *, graph: bool, targets: bool) -> List[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            name = f"{node.value.id}.{node.attr}"
            if graph and name == "ctx.graph":
                found.append(f"{path.name}:{node.lineno}: {name}")
            spelled = node.value.id in TARGET_MODULES or (node.value.id == "torch" and node.attr in TARGET_TORCH)
            if targets and spelled:
                found.append(f"{path.name}:{node.lineno}: {_dotted(node)}")
        if graph and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SURGERY:
            found.append(f"{path.name}:{node.lineno}: {_dotted(node.func)}()")
        if graph and isinstance(node, (ast.Assign, ast.AugAssign)):
            assigned = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.extend(f"{path.name}:{node.lineno}: {_dotted(t)} = …" for t in assigned
                         if isinstance(t, ast.Attribute) and t.attr in NODE_FIELDS)
        if targets and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n in ("operator", "torch.nn.functional") for n in names if n):
                found.append(f"{path.name}:{node.lineno}: import {', '.join(n for n in names if n)}")
    return found


@pytest.mark.parametrize("path", RULES, ids=[p.name for p in RULES])
def test_rules_edit_graphs_through_the_context(path: Path) -> None:
    assert _findings(path, graph=True, targets=False) == []


@pytest.mark.parametrize("path", NO_TARGETS, ids=[str(p.relative_to(PACKAGE)) for p in NO_TARGETS])
def test_targets_are_spelled_only_in_the_op_table(path: Path) -> None:
    assert _findings(path, graph=False, targets=True) == []
