"""The house rules of the source tree, checked on the code (not on comments or docstrings):

* layers import downward only (LAYERS below: ir and the op table, captures, rewrite, rules, the verified loop,
  the entry points, what is built on them);
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


# ------------------------------------------------------------------------------------------------- layers
# The pipeline's layers, bottom first (README "Layout"): a module imports only from its own layer or below. The
# leaves everything may use (the reason codes, errors, the one output comparison, the op table), what rules read
# (ir, and report's data types), the captures, the dtype lens and the rewrite machinery, the rules, the verified
# loop and the artifact check, the public entry points, and what is built on them (training side, tools, testing).
LAYERS = (
    ("reasons", "errors", "verify", "ir.ops", "ir.read.args", "models"),
    ("ir", "report", "tools.executed_ops"),  # (the run-time op counter: auto's choice counts with it)
    ("capture",),
    ("_dtypes", "rewrite"),
    ("rules",),
    ("artifact", "verified"),
    ("api", "__init__"),
    ("expansion", "testing", "tools", "__main__"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    best, rank = -1, len(LAYERS)  # the longest matching prefix decides
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    return rank


def _imports(path: Path) -> List[str]:
    """The fxfuse modules ``path`` imports (relative imports resolved; ``from . import x``: the sub-module ``x``, or
    the package where ``x`` is a name it defines)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "fxfuse":
                target = node.module.split(".")[1:]
            else:
                continue
            if not node.module:  # from . import a, b: a sub-module where one exists, else the package's name
                for alias in node.names:
                    sub = PACKAGE.joinpath(*target, alias.name)
                    exists = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                    found.append(".".join([*target, alias.name]) if exists else ".".join(target) or "__init__")
            else:
                found.append(".".join(target) or "__init__")
        elif isinstance(node, ast.Import):
            found.extend(".".join(a.name.split(".")[1:]) or "__init__" for a in node.names
                         if a.name.split(".")[0] == "fxfuse")
    return [m for m in found if m]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(PACKAGE)) for p in SOURCES])
def test_layers_import_downward(path: Path) -> None:
    module = _module_name(path)
    if module == "__init__" or path.name == "__init__.py":
        return  # a package's __init__ re-exports its own layer's modules
    mine = _layer(module)
    assert mine < len(LAYERS), f"{module} is in no layer of LAYERS"
    upward = [m for m in _imports(path) if _layer(m) > mine]
    assert upward == [], f"{module} (layer {mine}) imports from a higher layer: {upward}"


def test_layer_check_sees_an_upward_import() -> None:
    """The check reads real imports and ranks them: a rule's imports are found, and one of the verified loop
    would be upward."""
    assert {"rewrite", "ir.read", "reasons"} <= set(_imports(PACKAGE / "rules" / "conv_bn.py"))
    assert "tools.cli" in _imports(PACKAGE / "__main__.py")
    assert _layer("rules.conv_bn") < _layer("verified")
    assert _layer("ir.read.args") == 0 and _layer("ir.read.layers") == 1 and _layer("capture.export") == 2
