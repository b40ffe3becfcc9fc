"""dtype logic: the float64 lens on a captured graph, and the way back to the model's own dtypes.

The graph is captured from the model as given, in its own dtypes and on its device (docs/dtypes.md): every dtype
the forward derives (``torch.arange(n, dtype=x.dtype)``, ``x.to(w.dtype)``, ``torch.full(..., dtype=...)``) is
recorded as the model computes it. The rules and the float64 check run on a :class:`Lens` of that graph: a
standalone copy whose floating tensors are float64 copies of the model's and whose recorded floating dtype
literals (and ``.float()`` / ``.half()`` / ``.bfloat16()`` calls) are retargeted to float64, so the fold
arithmetic is exact and verification can be tight. :meth:`Lens.back` builds what is returned: the rewritten
graph with every literal restored, every unchanged tensor a copy of the model's own (bit-identical: the float64
copies were exact), every fused tensor cast once to the dtype of the layer it replaces.

Where the model cannot run in float64, the lens is an own-dtype copy (``Lens.of(gm, float64=False)``) and the
check runs in the model's dtype with a dtype-aware tolerance. With ``verify=False`` nothing is checked: the lens
is own-dtype and reads the model's parameters themselves (``share_parameters``); the folds are float64 either way.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_map

from .capture.state import MODULE_INTERNALS
from .ir.graphs import direct_input_guard, eager_spellings, fetch, plain_calling_convention, standalone_copy

# Tensor methods that name a floating dtype: the lens calls ``double`` instead and the way back restores them.
_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def float64_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with its floating parameters and buffers created in float64 directly."""
    memo: Dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) in (Tensor, nn.Parameter) and t.is_floating_point() and id(t) not in memo:
            t64 = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(t64, t.requires_grad) if isinstance(t, nn.Parameter) else t64
    return copy.deepcopy(model, memo)


def shared_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` sharing the parameters and buffers (modules and plain attributes are copied): it can
    be put in eval mode, run and captured without touching ``model``'s attributes or mode, at no weight memory."""
    memo: Dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def cast_inputs(args: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) input cast to ``dtype``."""
    return tree_map(lambda a: a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a, args)


def leaf_dtype(output: Any) -> Optional[torch.dtype]:
    """The dtype of the first tensor in a nested output."""
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, Tensor):
            return leaf.dtype
    return None


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``float32`` for ``torch.float32`` (``None`` for no dtype)."""
    return str(dtype).replace("torch.", "")


def reachable_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor held by ``obj`` (a tensor, or a module tree: parameters, buffers, plain tensor attributes, also
    inside lists / tuples / dicts), shared ones once per place."""
    if isinstance(obj, Tensor):
        yield obj
        return
    if not isinstance(obj, nn.Module):
        return
    for mod in obj.modules():
        yield from (t for t in mod._parameters.values() if t is not None)
        yield from (t for t in mod._buffers.values() if t is not None)
        for key, value in vars(mod).items():
            if key in MODULE_INTERNALS or (key == "meta" and isinstance(mod, fx.GraphModule)):
                continue
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, (list, tuple, dict)) or type(value) in SUPPORTED_NODES:  # (not numbers, strings)
                yield from (t for t in tree_flatten(value)[0] if isinstance(t, Tensor))


def _graph_tensors(gm: fx.GraphModule) -> Iterator[Tuple[str, Tensor]]:
    """``(target, tensor)`` for every tensor reachable from what ``gm``'s graph reads."""
    seen: Set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in seen:
            seen.add(str(node.target))
            for t in reachable_tensors(fetch(gm, str(node.target))):
                yield str(node.target), t


def _all_finite(t: Tensor) -> bool:
    """No inf / NaN in ``t``: one reduction (min and max propagate both), no ``isfinite`` mask of ``t``'s size."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _as_like(value: Tensor, like: Tensor, requires_grad: Optional[bool] = None) -> Tensor:
    """``value`` as a Parameter when ``like`` is one (with ``like``'s ``requires_grad`` unless given)."""
    if isinstance(like, nn.Parameter):
        return nn.Parameter(value, like.requires_grad if requires_grad is None else requires_grad)
    return value


# ------------------------------------------------------------------------------------- dtype literals
@dataclass
class _Literals:
    """The floating dtypes a node named, in argument order, and the dtype method it called (``x.float()``)."""

    dtypes: List[torch.dtype]
    method: Optional[str] = None


def _retarget(graph: fx.Graph, to: torch.dtype) -> Dict[str, _Literals]:
    """Point every floating dtype literal and dtype method of ``graph`` at ``to``; returns what each changed node
    named, for :func:`_restore`."""
    record: Dict[str, _Literals] = {}
    for node in graph.nodes:
        seen: List[torch.dtype] = []

        def swap(a: Any, seen: List[torch.dtype] = seen) -> Any:
            if isinstance(a, torch.dtype) and a.is_floating_point:
                seen.append(a)
                return to
            return a

        args, kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
        method = node.target if node.op == "call_method" and node.target in _DTYPE_METHODS else None
        if any(d != to for d in seen) or (method is not None and _DTYPE_METHODS[str(method)] != to):
            node.args, node.kwargs = args, kwargs
            if method is not None:
                node.target = next(m for m, d in _DTYPE_METHODS.items() if d == to)
            record[node.name] = _Literals(seen, str(method) if method is not None else None)
    return record


def _restore(graph: fx.Graph, record: Dict[str, _Literals]) -> None:
    """Undo :func:`_retarget` on the nodes of ``graph`` that still carry a recorded name."""
    for node in graph.nodes:
        lit = record.get(node.name)
        if lit is None:
            continue
        queue = list(lit.dtypes)

        def back(a: Any, queue: List[torch.dtype] = queue) -> Any:
            if isinstance(a, torch.dtype) and a.is_floating_point and queue:
                return queue.pop(0)
            return a

        node.args = fx.node.map_aggregate(node.args, back)
        node.kwargs = fx.node.map_aggregate(node.kwargs, back)
        if lit.method is not None and node.op == "call_method":
            node.target = lit.method


# ------------------------------------------------------------------------------------- the lens
@dataclass
class FusedTarget:
    """What every rewrite attempt on one graph shares: the dtype each lens tensor goes back to (by id), the dtype
    for fused tensors without an original (most parameters' dtype), and whether fused parameters require grad."""

    dtypes: Dict[int, torch.dtype]
    default_dtype: torch.dtype
    requires_grad: bool


@dataclass
class Lens:
    """The graph the rules rewrite and the check runs: a float64 view of a captured graph (``float64``), or an
    own-dtype copy where float64 is impossible. ``originals``: ``id(lens tensor) -> (lens tensor, model tensor)``
    for every floating tensor the graph reads; ``literals``: the dtype literals retargeted, per node name."""

    gm: fx.GraphModule
    float64: bool
    originals: Dict[int, Tuple[Tensor, Tensor]]
    literals: Dict[str, _Literals]
    model_dtype: torch.dtype
    model_state: Set[int] = field(default_factory=set)  # ids of the model's parameters and buffers

    @classmethod
    def of(cls, gm: fx.GraphModule, float64: bool, model_state: Optional[Set[int]] = None,
           share_parameters: bool = False) -> Lens:
        """``share_parameters`` (own-dtype lens only): the lens reads the model's parameters themselves instead of
        copies — for a lens that is never run (``verify=False``): rewrites never write a tensor they read, and
        buffers, which a forward may write, are still copied."""
        if share_parameters and float64:
            raise ValueError("a float64 lens cannot share the model's parameters")
        memo: Dict[int, Any] = {}
        originals: Dict[int, Tuple[Tensor, Tensor]] = {}
        counts: Dict[torch.dtype, int] = {}
        for _, t in _graph_tensors(gm):
            if id(t) in memo or type(t) not in (Tensor, nn.Parameter):
                continue
            if share_parameters and isinstance(t, nn.Parameter):
                view: Tensor = t
            else:
                copied = t.detach().to(torch.float64 if float64 and t.is_floating_point() else t.dtype, copy=True)
                view = _as_like(copied, t)
            memo[id(t)] = view
            originals[id(view)] = (view, t)
            if isinstance(t, nn.Parameter):
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        model_dtype = max(counts, key=lambda d: counts[d]) if counts else (
            next((t.dtype for _, t in originals.values()), torch.get_default_dtype()))
        lens_gm = standalone_copy(gm, memo, class_name=type(gm).__name__)
        literals = _retarget(lens_gm.graph, torch.float64) if float64 else {}
        if literals:
            lens_gm.recompile()
        return cls(lens_gm, float64, originals, literals, model_dtype, model_state or set())

    def inputs(self, args: Any) -> Any:
        """The example inputs as the lens runs them (floating tensors in float64 for a float64 lens)."""
        return cast_inputs(args, torch.float64) if self.float64 else args

    def fused_target(self) -> FusedTarget:
        params = [(view, orig) for view, orig in self.originals.values() if isinstance(orig, nn.Parameter)]
        counts: Dict[torch.dtype, int] = {}
        for _, orig in params:
            counts[orig.dtype] = counts.get(orig.dtype, 0) + orig.numel()
        default = max(counts, key=lambda d: counts[d]) if counts else self.model_dtype
        return FusedTarget({k: orig.dtype for k, (_, orig) in self.originals.items()}, default,
                           any(orig.requires_grad for _, orig in params))

    def back(self, fused: fx.GraphModule, new_modules: List[Tuple[nn.Module, torch.dtype]]) -> Returned:
        """The model ``fused`` (a rewrite of :attr:`gm`) stands for, in the model's own dtypes: a standalone, flat
        ``GraphModule`` holding copies of the model's tensors it still reads and the fused tensors cast once."""
        new: Dict[int, Tuple[torch.dtype, str]] = {
            id(t): (dt, name) for mod, dt in new_modules
            for name, t in itertools.chain(mod.named_parameters(), mod.named_buffers())}
        memo: Dict[int, Any] = {}
        out = Returned(fused)
        for target, t in _graph_tensors(fused):
            if id(t) in memo:
                continue
            if id(t) in self.originals:
                view, orig = self.originals[id(t)]
                memo[id(t)] = _as_like(orig.detach().clone(), orig)
                if id(orig) not in self.model_state:
                    out.frozen.append((target, memo[id(t)]))
            elif id(t) in new and t.is_floating_point():
                dtype, name = new[id(t)]
                cast = t.detach().to(dtype)
                memo[id(t)] = _as_like(cast, t, t.requires_grad)
                if t.dtype != cast.dtype and not _all_finite(cast) and _all_finite(t):
                    out.overflowed.append(f"{target}.{name} ({dtype_name(cast.dtype)})")
            elif t.is_floating_point() and t.dtype == torch.float64 and self.float64 \
                    and self.model_dtype != torch.float64:
                memo[id(t)] = _as_like(t.detach().to(self.model_dtype), t)  # made by the pass in the lens
                out.cast.append(f"{target} ({dtype_name(self.model_dtype)})")
        out.gm = standalone_copy(fused, memo, flat=True, class_name=type(self.gm).__name__)
        _restore(out.gm.graph, self.literals)
        eager_spellings(out.gm)
        plain_calling_convention(out.gm)
        direct_input_guard(out.gm)
        out.gm.recompile()
        out.gm.eval()
        names = {id(t): n for n, t in itertools.chain(out.gm.named_parameters(), out.gm.named_buffers())}
        out.frozen_names = [f"{names.get(id(t), target)} {list(t.shape)} {dtype_name(t.dtype)}"
                            for target, t in out.frozen]
        return out


@dataclass
class Returned:
    """What :meth:`Lens.back` built: the returned graph module, and what the report says about its tensors."""

    gm: fx.GraphModule
    overflowed: List[str] = field(default_factory=list)  # "target (dtype)": finite in float64, inf once cast
    cast: List[str] = field(default_factory=list)  # tensors the pass made in float64, cast to the model's dtype
    frozen: List[Tuple[str, Tensor]] = field(default_factory=list)
    frozen_names: List[str] = field(default_factory=list)  # "name [shape] dtype" of trace-time constants read
