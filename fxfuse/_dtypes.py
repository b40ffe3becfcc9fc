"""dtype bookkeeping: the float64 working copy, and giving every tensor of the result its dtype back.

The pass computes on a float64 copy. Afterwards every tensor reachable from the result — parameters, buffers,
plain tensor attributes of every module, GraphModule constants (``_tensor_constantN``: tensors the trace evaluated,
which ``fx.GraphModule`` registers as buffers), tensors a forward cached — must hold the dtype it would have had
without fxfuse: the original tensor's dtype for what came from the model, the dtype of the replaced layer for
fused parameters, and the model's own (dominant) floating dtype for anything created while the copy ran in
float64. :func:`cast_back` owns that audit; :func:`float64_leaks` checks it before the result is returned.
"""

from __future__ import annotations

import copy
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, MutableMapping, Optional, Set, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .capture.state import MODULE_INTERNALS

Slot = Tuple[nn.Module, MutableMapping[str, Any], str, Tensor]


def tensor_slots(root: nn.Module) -> Iterator[Slot]:
    """``(module, store, name, tensor)`` for every parameter and buffer slot of every module (shared tensors
    appear once per slot)."""
    for _, mod, store, key, t in named_tensor_slots(root):
        yield mod, store, key, t


def named_tensor_slots(root: nn.Module) -> Iterator[Tuple[str, nn.Module, MutableMapping[str, Any], str, Tensor]]:
    """``(path, module, store, name, tensor)`` for every parameter and buffer slot (``path``: dotted name from
    ``root``; a module reachable under several names is visited once, under its first)."""
    for prefix, mod in root.named_modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                if t is not None:
                    yield (f"{prefix}.{key}" if prefix else key), mod, store, key, t


def attribute_tensors(root: nn.Module) -> Iterator[Tuple[str, nn.Module, str, Any]]:
    """``(path, module, attribute, value)`` for every plain attribute of every module that is a tensor or a
    list/tuple/dict holding tensors (not parameters or buffers, not ``nn.Module``'s bookkeeping, not a
    GraphModule's ``meta``)."""
    for path, mod in root.named_modules():
        for key, value in list(vars(mod).items()):
            if key in MODULE_INTERNALS or (key == "meta" and isinstance(mod, fx.GraphModule)):
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


def shared_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that shares the parameters and buffers (modules and plain attributes are copied):
    running it leaves ``model``'s attributes and mode alone at the cost of no weight memory. (An in-place write to
    a buffer in forward would still reach ``model``.)"""
    memo: Dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
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

    def record_slots(self, work: nn.Module, dtypes: SlotDtypes) -> None:
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
    """What :func:`cast_back` changed besides the planned parameters and buffers."""

    attributes: List[str] = field(default_factory=list)  # "path (dtype)" of the tensors cast from float64
    overflowed: List[str] = field(default_factory=list)  # "path (dtype)": finite in float64, inf/NaN once cast


def cast_slots(module: nn.Module, plan: DtypePlan, overflowed: Optional[List[str]] = None) -> Dict[int, Tensor]:
    """Give every parameter and buffer of ``module`` its planned dtype (tensors with no plan are left alone).
    Returns ``id(old tensor) -> tensor now in its slot`` for the planned tensors; appends to ``overflowed`` the
    slots whose finite values do not fit the dtype (a fused float16 weight ``w·γ/σ`` beyond 65504)."""
    done: Dict[int, Tensor] = {}
    for path, _, store, key, t in named_tensor_slots(module):
        dtype = plan.target(t)
        if dtype is None:
            continue
        if id(t) in done:  # a tensor shared by two slots becomes one tensor again
            store[key] = done[id(t)]
            continue
        wide = t.detach() if t.dtype != dtype and t.is_floating_point() and dtype.is_floating_point else None
        done[id(t)] = cast_tensor_(store, key, t, dtype)  # (a Parameter is cast in place; ``wide`` keeps its data)
        # One pass over the cast tensor; the wide one is read only where the cast one is not finite.
        if overflowed is not None and wide is not None and not bool(done[id(t)].isfinite().all()) \
                and bool(wide.isfinite().all()):
            overflowed.append(f"{path} ({_dtype_name(dtype)})")
    return done


def _stray_float64(t: Any, path: str, plan: DtypePlan) -> bool:
    """A float64 tensor with no planned dtype that the model did not hold as float64 under ``path``: made from
    the float64 copy (a trace-time constant, a cache filled by a float64 run)."""
    return (isinstance(t, Tensor) and t.dtype == torch.float64 and plan.target(t) is None
            and path not in plan.float64_attributes and plan.model_dtype != torch.float64)


def cast_back(root: nn.Module, plan: DtypePlan) -> CastReport:
    """The dtype audit of everything reachable from ``root``.

    * parameters and buffers of the model and fused parameters: the planned dtype (:func:`cast_slots`);
    * any other float64 tensor — slots the plan does not know (``_tensor_constantN`` and plain attributes that
      ``fx.GraphModule`` registered as buffers) and plain tensor attributes (also inside lists / tuples / dicts)
      — goes to ``plan.model_dtype``, unless it is float64 in the model under the same path
      (``plan.float64_attributes``); a plain attribute aliasing a planned tensor gets that tensor's new value.

    Nothing float64 survives unless the model had it. (A constant the trace computed from a float64 tensor of a
    model that is otherwise float32 also becomes float32: fxfuse cannot tell what a constant was computed from;
    the artifact check then compares outputs and their dtypes.)"""
    report = CastReport()
    done = cast_slots(root, plan, report.overflowed)
    model_dtype = _dtype_name(plan.model_dtype)
    for path, _, store, key, t in named_tensor_slots(root):
        if _stray_float64(t, path, plan):
            cast_tensor_(store, key, t, plan.model_dtype)
            report.attributes.append(f"{path} ({model_dtype})")
    for path, mod, key, value in attribute_tensors(root):
        new = _cast_attribute(value, path, plan, done)
        if new is not value:
            vars(mod)[key] = new  # a plain attribute stays one (nn.Module.__setattr__ would register a Parameter)
            if any(_is_float64_cast(o, n) for o, n in zip(tree_flatten(value)[0], tree_flatten(new)[0])):
                report.attributes.append(f"{path} ({model_dtype})")
    return report


def _cast_attribute(value: Any, path: str, plan: DtypePlan, done: Dict[int, Tensor]) -> Any:
    """A plain attribute's value with stray float64 tensors cast to the model's dtype and aliases of cast slots
    replaced by the slot's new tensor; ``value`` itself (same object) when nothing changes."""
    changed = False

    def cast(t: Any) -> Any:
        nonlocal changed
        if isinstance(t, Tensor) and plan.target(t) is not None and done.get(id(t), t) is not t:
            changed = True
            return done[id(t)]  # an alias of a buffer that was cast: the slot's new tensor
        if not _stray_float64(t, path, plan):
            return t
        changed = True
        return t.to(plan.model_dtype)

    new = cast(value) if isinstance(value, Tensor) else tree_map(cast, value)
    return new if changed else value


def _is_float64_cast(old: Any, new: Any) -> bool:
    return isinstance(old, Tensor) and old.dtype == torch.float64 and isinstance(new, Tensor) \
        and new.dtype != torch.float64


def float64_leaks(root: nn.Module, plan: DtypePlan) -> List[str]:
    """Paths of float64 tensors reachable from ``root`` that were not float64 in the model: planned slots whose
    plan says otherwise, unplanned slots and plain attributes (empty after :func:`cast_back`; checked before the
    result is returned)."""
    if plan.model_dtype == torch.float64:
        return []

    def leaked(t: Any, path: str) -> bool:
        return isinstance(t, Tensor) and t.dtype == torch.float64 \
            and (plan.target(t) not in (None, torch.float64) or _stray_float64(t, path, plan))

    leaks = [path for path, _, _, _, t in named_tensor_slots(root) if leaked(t, path)]
    leaks += [path for path, _, _, value in attribute_tensors(root)
              if any(leaked(t, path) for t in tree_flatten(value)[0])]
    return leaks


def frozen_constants(root: nn.Module, plan: DtypePlan) -> List[str]:
    """``"path [shape] dtype"`` of every tensor a graph of ``root`` reads (``get_attr``) that is not a parameter or
    buffer of the model: values the trace evaluated (``_tensor_constantN``, e.g. a relative-position bias or an
    attention mask computed from buffers) or plain tensor attributes. They are a snapshot: loading new weights
    into the fused model does not update them. Call before :func:`cast_back` (the plan knows tensors by
    identity); dtypes are the ones the model will hold."""
    out: List[str] = []
    for prefix, gm in root.named_modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            try:
                value = operator.attrgetter(node.target)(gm)
            except AttributeError:
                continue
            if not isinstance(value, Tensor) or plan.target(value) is not None:
                continue
            path = f"{prefix}.{node.target}" if prefix else node.target
            dtype = plan.model_dtype if _stray_float64(value, path, plan) else value.dtype
            out.append(f"{path} {list(value.shape)} {_dtype_name(dtype)}")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    def of(cls, module: nn.Module, plan: DtypePlan) -> FusedTarget:
        ids = plan.as_id_map()
        counts: Dict[torch.dtype, int] = {}
        for p in module.parameters():
            d = ids.get(id(p), p.dtype)
            if d.is_floating_point:
                counts[d] = counts.get(d, 0) + p.numel()
        default = max(counts, key=lambda d: counts[d]) if counts else plan.model_dtype
        return cls(ids, default, any(p.requires_grad for p in module.parameters()))


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``float32`` for ``torch.float32`` (``None`` for no dtype)."""
    return str(dtype).replace("torch.", "")
