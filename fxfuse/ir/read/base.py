"""The state the readers share (:class:`ReaderBase`)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, fx, nn

from .. import ops
from .args import attr_target
from .constants import Constants


class ReaderBase:
    """What every reader needs: the graph module, its modules, its constants and its device."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.constants = Constants(gm)
        first: Optional[Tensor] = next(iter(gm.parameters()), None)
        if first is None:
            first = next(iter(gm.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        """The called module, if it computes exactly what its ``torch.nn`` class does: a subclass that overrides
        ``forward`` or a module with forward hooks is opaque (``None``)."""
        mod = self.modules.get(attr_target(node)) if node.op == "call_module" else None
        if mod is None or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        if type(mod).forward not in ops.STOCK_FORWARDS:
            return None
        return mod
