"""Symbolic front end: ``torch.fx`` symbolic tracing (``torch.nn`` modules stay leaves, the rest is inlined)."""

from __future__ import annotations

import collections
from typing import Any

from torch import fx, nn

from .state import attributes_preserved


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps an ``OrderedDict`` (segmentation / backbone outputs) an ``OrderedDict``: plain fx
    turns it into a ``dict``, which changes the traced module's output type (and its pytree structure)."""

    def create_arg(self, a: Any) -> Any:
        if type(a) is collections.OrderedDict:
            return self.create_node("call_function", collections.OrderedDict, (self.create_arg(list(a.items())),), {})
        return super().create_arg(a)


def trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` (``OrderedDict`` values kept); ``torch.nn`` modules stay leaves, everything else
    is inlined. ``module`` is left as it was: what the forward stored in plain attributes while traced (Proxies)
    and the tracer's ``_tensor_constantN`` are removed from it (the GraphModule keeps what its graph reads)."""
    with attributes_preserved(module):
        tracer = _Tracer()
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, module.__class__.__name__)
