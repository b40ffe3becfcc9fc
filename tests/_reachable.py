"""Every tensor reachable from a module, found independently of ``fxfuse._dtypes`` (which the tests check).

Reachable: parameters and buffers of every sub-module, plain attributes of every sub-module (also inside
lists / tuples / dicts / sets), and the value of every ``get_attr`` node of every ``fx.GraphModule`` (the graph
constants ``_tensor_constantN`` fx registers as buffers, plain attributes the graph reads).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import torch
from torch import Tensor, fx, nn

_MODULE_OWN = set(vars(nn.Module()))  # nn.Module's bookkeeping: hook dicts, the parameter/buffer/module stores


def _leaves(value: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    else:
        yield path, value


def reachable(root: nn.Module) -> Dict[str, Any]:
    """``path -> object`` for every tensor (and every ``fx.Proxy``, which must never be left behind) reachable
    from ``root``."""
    found: Dict[str, Any] = {}
    for prefix, mod in root.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, t in mod.named_parameters(recurse=False):
            found[dot + name] = t
        for name, t in mod.named_buffers(recurse=False):
            found[dot + name] = t
        for key, value in vars(mod).items():
            if key in _MODULE_OWN or key == "meta":  # GraphModule.meta holds the report, no tensors
                continue
            found.update((path, leaf) for path, leaf in _leaves(value, dot + key)
                         if isinstance(leaf, (Tensor, fx.Proxy)))
        if isinstance(mod, fx.GraphModule):
            for node in mod.graph.nodes:
                if node.op == "get_attr":
                    obj: Any = mod
                    for part in node.target.split("."):
                        obj = getattr(obj, part)
                    if isinstance(obj, Tensor):
                        found[f"{dot}{node.target} (get_attr)"] = obj
    return found


def floating_dtypes(root: nn.Module) -> Dict[str, torch.dtype]:
    """``path -> dtype`` of the floating tensors reachable from ``root`` (paths as :func:`wrong_dtypes` reads
    them): what a result should hold where the model held something under the same path."""
    return {p.replace(" (get_attr)", ""): t.dtype for p, t in reachable(root).items()
            if isinstance(t, Tensor) and t.is_floating_point()}


def wrong_dtypes(root: nn.Module, expected: Dict[str, torch.dtype], default: torch.dtype) -> Dict[str, str]:
    """``path -> what is wrong`` for reachable objects that are Proxies or floating tensors whose dtype is not
    ``expected[path]`` (``default`` for paths not listed). Integer / bool tensors are left alone."""
    bad: Dict[str, str] = {}
    for path, obj in reachable(root).items():
        if isinstance(obj, fx.Proxy):
            bad[path] = "a torch.fx.Proxy left by tracing"
            continue
        if obj.is_floating_point():
            want = expected.get(path.replace(" (get_attr)", ""), default)
            if obj.dtype != want:
                bad[path] = f"{obj.dtype}, expected {want}"
    return bad
