"""Arguments and propagated shapes of a node."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape_of(node: Any) -> Optional[torch.Size]:
    """The propagated output shape of ``node`` (``None`` if unknown or not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)
