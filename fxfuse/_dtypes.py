"""dtype bookkeeping: the float64 working copy, and giving every tensor of the result its dtype back.

The pass computes on a float64 copy. Afterwards every tensor reachable from the result — parameters, buffers,
plain tensor attributes of every module (GraphModule constants such as ``_tensor_constant0``, tensors a
forward cached) — must hold the dtype it would have had without fxfuse: the original tensor's dtype for what
came from the model, the dtype of the replaced layer for fused parameters, and the model's own (dominant)
floating dtype for anything created while the copy ran in float64. :func:`cast_back` owns that audit.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, MutableMapping, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

Slot = Tuple[nn.Module, MutableMapping[str, Any], str, Tensor]


def tensor_slots(root: nn.Module) -> Iterator[Slot]:
    """``(module, store, name, tensor)`` for every parameter and buffer slot of every module (shared tensors
    appear once per slot)."""
    for mod in root.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                if t is not None:
                    yield mod, store, key, t


def attribute_tensors(root: nn.Module) -> Iterator[Tuple[str, nn.Module, str, Any]]:
    """``(path, module, attribute, value)`` for every plain attribute of every module that is a tensor or a
    list/tuple/dict holding tensors (not parameters or buffers)."""
    for path, mod in root.named_modules():
        for key, value in list(vars(mod).items()):
            if key.startswith("__") or key in ("_parameters", "_buffers", "_modules"):
                continue
            if any(isinstance(leaf, Tensor) for leaf in tree_flatten(value)[0]):
                yield (f"{path}.{key}" if path else key), mod, key, value


def dominant_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype holding most parameter elements (the default dtype if there is none)."""
    counts: Dict[torch.dtype, int] = {}
    for p in itertools.chain(module.parameters(), module.buffers()):
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.get_default_dtype()


def float64_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with its floating parameters and buffers created in float64 directly: one new
    tensor per weight instead of a copy and then a cast (on big models the pass is bound by fresh memory)."""
    memo: Dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if type(t) in (Tensor, nn.Parameter) and t.is_floating_point() and id(t) not in memo:
            t64 = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(t64, t.requires_grad) if isinstance(t, nn.Parameter) else t64
    return copy.deepcopy(model, memo)


def cast_tensor_(store: MutableMapping[str, Any], key: str, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Give slot ``store[key]`` dtype ``dtype``; a Parameter keeps its identity (``.data`` is swapped)."""
    if t.dtype == dtype:
        return t
    if isinstance(t, nn.Parameter):
        t.data = t.data.to(dtype)
        return t
    store[key] = t.to(dtype)
    return store[key]


@dataclass
class DtypePlan:
    """Target dtype of tensors of the working copy, by identity (the tensor is kept alive so ids stay unique).

    ``model_dtype`` is the dtype for floating tensors with no recorded origin (created while the copy ran)."""

    model_dtype: torch.dtype
    _plan: Dict[int, Tuple[Tensor, torch.dtype]] = field(default_factory=dict)
    float64_attributes: Set[str] = field(default_factory=set)  # attribute paths that are float64 in the model

    def record_attributes(self, original: nn.Module) -> None:
        """Remember which plain tensor attributes of the original model are float64 on purpose."""
        for path, _, _, value in attribute_tensors(original):
            if any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in tree_flatten(value)[0]):
                self.float64_attributes.add(path)

    def record(self, t: Tensor, dtype: torch.dtype) -> None:
        self._plan[id(t)] = (t, dtype)

    def target(self, t: Tensor) -> Optional[torch.dtype]:
        entry = self._plan.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def as_id_map(self) -> Dict[int, torch.dtype]:
        return {k: d for k, (_, d) in self._plan.items()}

    def record_slots(self, work: nn.Module, dtypes: "SlotDtypes") -> None:
        """Record for every slot of ``work`` the dtype ``dtypes`` (from :func:`slot_dtypes`) holds for it."""
        for mod, _, key, t in tensor_slots(work):
            dtype = dtypes.get((id(mod), key))
            if dtype is not None:
                self.record(t, dtype)


SlotDtypes = Dict[Tuple[int, str], torch.dtype]


def slot_dtypes(original: nn.Module, work: nn.Module) -> SlotDtypes:
    """``(id(module of work), slot name) -> dtype`` of the matching slot of ``original`` (``work`` is
    ``original`` or its deep copy, so the two module trees correspond one to one)."""
    return {(id(w), key): t.dtype for m, w in zip(original.modules(), work.modules())
            for store in (m._parameters, m._buffers) for key, t in store.items() if t is not None}


def restore_slot_dtypes(module: nn.Module, dtypes: SlotDtypes) -> None:
    """Give every slot back its recorded dtype (undoes ``.double()``; parameters keep their identity)."""
    for mod, store, key, t in tensor_slots(module):
        dtype = dtypes.get((id(mod), key))
        if dtype is not None:
            cast_tensor_(store, key, t, dtype)


@dataclass
class CastReport:
    """What :func:`cast_back` changed besides parameters and buffers."""

    attributes: List[str] = field(default_factory=list)  # plain tensor attributes cast back ("path (dtype)")


def cast_slots(module: nn.Module, plan: DtypePlan) -> None:
    """Give every parameter and buffer of ``module`` its planned dtype (tensors with no plan are left alone)."""
    done: Dict[int, Tensor] = {}
    for _, store, key, t in tensor_slots(module):
        dtype = plan.target(t)
        if dtype is None:
            continue
        if id(t) in done:  # a tensor shared by two slots becomes one tensor again
            store[key] = done[id(t)]
            continue
        done[id(t)] = cast_tensor_(store, key, t, dtype)


def cast_back(root: nn.Module, plan: DtypePlan) -> CastReport:
    """The dtype audit of everything reachable from ``root``: parameters and buffers by the plan; plain tensor
    attributes (graph constants, forward caches) that are float64 go to the plan's dtype if they are a planned
    tensor, else to ``plan.model_dtype``. Nothing float64 survives unless the model itself was float64."""
    cast_slots(root, plan)
    report = CastReport()
    if plan.model_dtype == torch.float64:
        return report
    for path, mod, key, value in attribute_tensors(root):
        if path in plan.float64_attributes:
            continue
        changed: List[bool] = []

        def cast(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dtype != torch.float64:
                return t
            changed.append(True)
            target = plan.target(t) or plan.model_dtype
            return t.to(target)

        new = cast(value) if isinstance(value, Tensor) else tree_map(cast, value)
        if changed:
            setattr(mod, key, new)
            report.attributes.append(f"{path} ({str(plan.model_dtype).replace('torch.', '')})")
    return report


def float64_leaks(root: nn.Module, plan: DtypePlan) -> List[str]:
    """Names of float64 tensors reachable from ``root`` that were not float64 in the model (empty after
    :func:`cast_back`; checked before the result is returned)."""
    if plan.model_dtype == torch.float64:
        return []
    leaks = [f"{type(m).__name__}.{k}" for m, _, k, t in tensor_slots(root)
             if t.dtype == torch.float64 and plan.target(t) not in (None, torch.float64)]
    for path, _, _, value in attribute_tensors(root):
        if path not in plan.float64_attributes and any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in tree_flatten(value)[0]):
            leaks.append(path)
    return leaks


def cast_inputs(args: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) input cast to ``dtype``."""
    return tree_map(lambda a: a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a, args)


def leaf_dtype(output: Any) -> Optional[torch.dtype]:
    """The dtype of the first tensor in a nested output."""
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, Tensor):
            return leaf.dtype
    return None


@dataclass
class FusedTarget:
    """What every rewrite attempt on one module shares: the dtype each tensor goes back to, the dtype for fused
    tensors without an original (most parameters' dtype), and whether fused parameters require grad."""

    dtypes: Dict[int, torch.dtype]
    default_dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, module: nn.Module, plan: DtypePlan) -> "FusedTarget":
        ids = plan.as_id_map()
        counts: Dict[torch.dtype, int] = {}
        for p in module.parameters():
            d = ids.get(id(p), p.dtype)
            if d.is_floating_point:
                counts[d] = counts.get(d, 0) + p.numel()
        default = max(counts, key=lambda d: counts[d]) if counts else plan.model_dtype
        return cls(ids, default, any(p.requires_grad for p in module.parameters()))
