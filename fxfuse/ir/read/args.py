"""Arguments and propagated shapes of a node."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import fx


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def arg_node(node: fx.Node, index: int, name: str = "input") -> Optional[fx.Node]:
    """Argument ``index`` (keyword ``name``) of ``node`` if it is a node of the graph (a tensor computed there),
    else None: a literal, a list, or absent."""
    a = arg(node, index, name)
    return a if isinstance(a, fx.Node) else None


def arg_ints(node: fx.Node, index: int, name: str, default: Any = None) -> Optional[Tuple[int, ...]]:
    """Argument ``index`` (keyword ``name``) as a tuple of Python ints if it is a list or tuple of them, else None:
    a node, a symbolic size, a bool or anything else the graph computes at run time."""
    a = arg(node, index, name, default)
    if not isinstance(a, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in a):
        return None
    return tuple(int(i) for i in a)


def call_target(node: fx.Node) -> Callable[..., Any]:
    """The function a ``call_function`` node calls."""
    if node.op != "call_function" or not callable(node.target):
        raise TypeError(f"{node.name} is a {node.op} node, not a call of a function")
    return node.target


def attr_target(node: fx.Node) -> str:
    """The name a ``get_attr`` / ``call_module`` / ``call_method`` node refers to (``layer1.0.conv``, ``add_``)."""
    if not isinstance(node.target, str):
        raise TypeError(f"{node.name} is a {node.op} node: its target is not a name")
    return node.target


# ``node.meta`` key set on every node shape propagation ran over (``tensor_meta`` is set only on tensor outputs:
# a node returning ``None``, like export's input guard, would otherwise look unpropagated forever).
SHAPED = "fxfuse_shaped"


def shape_of(node: Any) -> Optional[torch.Size]:
    """The propagated output shape of ``node`` (``None`` if unknown or not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)
