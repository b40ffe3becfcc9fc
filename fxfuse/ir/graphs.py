"""Whole-graph utilities below the rewrite layer: copies of a ``GraphModule`` — a fresh graph over shared state
(one per rewrite attempt), a standalone copy holding only what its graph reads with tensors swapped through a memo
(the float64 lens, the returned artifact) — and erasure of dead pure nodes (used by the rewrite context and by the
export capture's clean-up)."""

from __future__ import annotations

import collections
import copy
import operator
import re
import types
from typing import Any, Callable, Dict, Optional

from torch import fx, nn
from torch.utils._pytree import tree_unflatten

from . import ops


def graph_copy(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm``'s graph (nodes, their metadata by reference, the calling convention)."""
    graph = fx.Graph()
    copied: Any = graph.graph_copy(gm.graph, {}, return_output_node=True)
    value, out_node = copied
    graph.output(value, type_expr=out_node.type)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    return graph


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` over a copy of ``gm``'s graph, sharing its parameters and sub-modules (rewrites add new
    modules and never mutate existing tensors, so each rewrite attempt starts from the captured graph)."""
    return fx.GraphModule(gm, graph_copy(gm), type(gm).__name__ if type(gm) is not fx.GraphModule else "GraphModule")


def is_erased(node: fx.Node) -> bool:
    """Whether ``node`` was removed from its graph (rules iterate over a snapshot of the node list)."""
    return bool(getattr(node, "_erased", False))


def erase_if_dead(node: fx.Node, modules: Any) -> int:
    """Erase ``node`` (and, recursively, inputs that become dead) when it has no users and is pure; returns how
    many nodes were erased."""
    if is_erased(node) or node.users or not ops.is_pure(node, modules):
        return 0
    inputs = list(node.all_input_nodes)
    node.graph.erase_node(node)
    return 1 + sum(erase_if_dead(inp, modules) for inp in inputs)


def prune(gm: fx.GraphModule, drop: Callable[[fx.Node], bool] = lambda node: False) -> None:
    """Erase, last node first, the ``call_function`` nodes nothing uses that are pure or that ``drop`` names (the
    export capture's clean-up; rewrites erase through :class:`fxfuse.rewrite.RewriteContext`)."""
    modules = dict(gm.named_modules())
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or is_erased(node):
            continue
        if drop(node) and not node.users:
            gm.graph.erase_node(node)
        else:
            erase_if_dead(node, modules)


def out_of_place(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm``'s in-place ATen ops into their out-of-place twins where that is provably the same program
    (the export capture's cheap functionalization; ``run_decompositions({})`` costs 2-3x the export itself).

    ``y = relu_(x)`` becomes ``y = relu(x)`` and every later reader of ``x`` reads ``y``, when ``x`` owns its
    storage (made by a call returning no alias, or a ``getitem`` of one) and nothing aliases it (no view of
    ``x`` anywhere in the graph): then the write is seen exactly by the later readers of ``x`` and ``y``.
    Writes into inputs, parameters, buffers or views are left alone. Returns whether every in-place op is gone
    (else the caller functionalizes the program properly)."""
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    complete = True
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not ops.writes_input(node, modules):
            continue
        twin = ops.functional_twin(node.target)
        x = node.args[0] if node.args else None
        if twin is None or not isinstance(x, fx.Node) or not _owns_storage(x, modules) \
                or any(u is not node and ops.is_alias(u) for u in x.users):
            complete = False
            continue
        with gm.graph.inserting_before(node):
            fresh = gm.graph.call_function(twin, node.args, node.kwargs)
        fresh.meta = dict(node.meta)
        node.replace_all_uses_with(fresh)
        for user in list(x.users):
            if user is not node and user is not fresh and order.get(user, -1) > order[node]:
                user.replace_input_with(x, fresh)
        gm.graph.erase_node(node)
        order[fresh] = order[node]
    return complete


def _owns_storage(x: fx.Node, modules: Dict[str, Any]) -> bool:
    if x.op != "call_function":
        return False
    if x.target is ops.GETITEM:
        source = x.args[0]
        return isinstance(source, fx.Node) and ops.returns_fresh_storage(source, modules)
    return ops.returns_fresh_storage(x, modules)


def fetch(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for target ``"a.b.c"``."""
    return operator.attrgetter(target)(root)


# Attribute values a leaf module of torch.nn holds that need no copy: they cannot be changed in place.
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None))


def copy_leaf(obj: Any, memo: Dict[int, Any]) -> Any:
    """``copy.deepcopy(obj, memo)``, without the generic protocol for a childless module of ``torch.nn`` (a conv, a
    BatchNorm: what graphs call). ``copy.deepcopy`` pickles its way through such a module's two dozen attribute
    dicts (resnet152's 364 leaves: 0.038 s, twice a pass; 0.010 s here); its ``__dict__`` is rebuilt
    directly: tensors through ``memo`` (or deep-copied), hook and registry dicts and sets copied shallowly (their
    values, hook functions, are what deepcopy keeps too), immutable values shared, anything else deep-copied."""
    if not isinstance(obj, nn.Module) or obj._modules or not type(obj).__module__.startswith("torch.nn.modules."):
        return copy.deepcopy(obj, memo)
    if id(obj) in memo:
        return memo[id(obj)]
    new = object.__new__(type(obj))
    state: Dict[str, Any] = {}
    for key, value in vars(obj).items():
        if key in ("_parameters", "_buffers"):
            state[key] = {k: None if t is None else copy.deepcopy(t, memo) for k, t in value.items()}
        elif isinstance(value, _IMMUTABLE) or (isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE)
                                                                                 for v in value)):
            state[key] = value
        elif type(value) in (dict, collections.OrderedDict, set):
            state[key] = type(value)(value)
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    memo[id(obj)] = new
    return new


def standalone_copy(gm: fx.GraphModule, memo: Optional[Dict[int, Any]] = None, *, flat: bool = False,
                    class_name: str = "GraphModule") -> fx.GraphModule:
    """A ``GraphModule`` that owns deep copies of exactly what ``gm``'s graph reads (``get_attr`` tensors and
    ``call_module`` modules; ``memo`` maps ``id`` of a tensor to the object to use instead, so a copy can change
    dtypes). Nothing the graph does not read comes along: no dead buffer, no orphan sub-module.

    ``flat=True`` re-homes every target at the root under one name (``stages.0.conv.weight`` →
    ``stages_0_conv_weight``), so the generated code fetches each tensor and module with one attribute lookup."""
    memo = {} if memo is None else memo
    graph = graph_copy(gm)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    owned: Dict[str, Any] = {}
    names: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        if target not in names:
            name = _flat_name(target, owned) if flat else target
            names[target] = name
            owned[name] = copy_leaf(fetch(gm, target), memo)
        node.target = names[target]
    out = fx.GraphModule(owned, graph, class_name)
    for key in ("_user_preserved_attributes",):
        if key in gm.meta:
            out.meta[key] = dict(gm.meta[key])
    return out


_MODULE_CALL = re.compile(r"\bself\.([A-Za-z_][A-Za-z0-9_]*)\(")


def direct_module_calls(gm: fx.GraphModule) -> bool:
    """Let ``gm``'s forward call its flat sub-modules as ``self._modules['conv'](x)`` instead of ``self.conv(x)``.

    A sub-module is not an instance attribute: ``self.conv`` misses ``__dict__`` and runs ``nn.Module.__getattr__``
    (a Python function searching ``_parameters``, ``_buffers``, ``_modules``) on every call. Measured on the fused
    MobileOne reference net (22 module calls, ~1 ms a call on one CPU thread) the lookups cost 3–5 % of the call —
    the whole gap to its hand-written twin (docs/benchmarks.md). ``self._modules`` is an instance attribute and the
    lookup a dict read; it reads the live dict, so a sub-module replaced later (``setattr``, ``_modules[name] = m``,
    ``delete_submodule``) is what runs. Only this instance's forward changes (each ``GraphModule`` has its own
    class); ``recompile()``, a deep copy or unpickling regenerate fx's own code. Line numbers are kept, so error
    messages still point at the right line. Returns whether the code changed (nothing to do, or fx internals this
    does not know: no change)."""
    names = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    src = gm.code
    new = _MODULE_CALL.sub(lambda m: f"self._modules[{m.group(1)!r}](" if m.group(1) in names else m.group(0), src)
    if new == src:
        return False
    try:
        from torch.fx.graph_module import _forward_from_src

        forward = _forward_from_src(new, dict(type(gm).forward.__globals__), None)
    except Exception:  # a torch whose fx internals differ: keep fx's code (correct, only slower)
        return False
    type(gm).forward = forward
    gm._code = new
    return True


def _flat_name(target: str, taken: Dict[str, Any]) -> str:
    base = target.replace(".", "_")
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


_PLAIN_CONTAINERS = (tuple, list, dict)


def _plain_spec(spec: Any) -> bool:
    """A pytree spec built only of tuples, lists, plain dicts and leaves (what fx's own codegen can return)."""
    if spec.is_leaf():
        return True
    return spec.type in _PLAIN_CONTAINERS and all(_plain_spec(c) for c in spec.children())


def plain_calling_convention(gm: fx.GraphModule) -> bool:
    """Replace an exported graph's pytree calling convention (``tree_flatten_spec`` of the inputs, ``tree_unflatten``
    of the outputs on every call) by fx's plain one where it means the same: positional tensor inputs, outputs
    built of tuples / lists / dicts. Returns whether it did; call ``gm.recompile()`` afterwards."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None or info.out_spec is None:
        return False
    in_spec, out_spec = info.in_spec, info.out_spec
    if in_spec.type is not tuple or len(in_spec.children()) != 2:
        return False
    args_spec, kwargs_spec = in_spec.children()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if args_spec.type is not tuple or not all(c.is_leaf() for c in args_spec.children()) \
            or kwargs_spec.num_leaves != 0 or len(placeholders) != args_spec.num_leaves or not _plain_spec(out_spec):
        return False
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0]
    if not isinstance(flat, (list, tuple)) or len(flat) != out_spec.num_leaves:
        return False
    output.args = (tree_unflatten(list(flat), out_spec),)
    gm.graph._codegen = fx.graph.CodeGen()
    return True


def eager_spellings(gm: fx.GraphModule) -> None:
    """Call each ATen overload of :data:`fxfuse.ir.ops.EAGER_SPELLING` through its public binding."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.EAGER_SPELLING:
            node.target = ops.EAGER_SPELLING[node.target]


def direct_input_guard(gm: fx.GraphModule) -> bool:
    """Call the input guard of an unlifted exported program (``_guards_fn``: the shape checks ``torch.export``
    specialized the program to) as the plain function it wraps. ``torch.export`` calls it through a module whose
    ``forward`` enters a Dynamo config patch on every call (~12 µs per call on a 2-core CPU vs ~1.5 µs for the
    checks themselves). The function stays in the graph as a side-effecting call (not dead-code eliminated) and
    raises as before on inputs of other shapes. Returns whether it did; call ``gm.recompile()`` afterwards."""
    done = False
    for node in list(gm.graph.nodes):
        if not ops.is_input_guard(node) or node.op != "call_module":
            continue
        checks = _wrapped_guard(fetch(gm, str(node.target)))
        if checks is None:
            continue
        # a copy of the function under a name fx's code generator can print (torch's is an anonymous ``_``)
        checks = types.FunctionType(checks.__code__, checks.__globals__, "export_input_guard", checks.__defaults__,
                                    checks.__closure__)
        checks.__module__ = __name__
        setattr(checks, ops.INPUT_GUARD_MARK, True)
        fx.node.has_side_effect(checks)
        with gm.graph.inserting_before(node):
            direct = gm.graph.call_function(checks, node.args, node.kwargs)
        direct.meta = dict(node.meta)
        node.replace_all_uses_with(direct)
        gm.graph.erase_node(node)
        gm.delete_submodule(str(node.target))
        done = True
    return done


def _wrapped_guard(module: Any) -> Optional[Callable[..., Any]]:
    """The plain function behind ``torch.export``'s ``GuardsFn`` module (``forward`` = a context-manager wrapper
    closing over it), or ``None`` where this torch builds it differently."""
    forward = vars(module).get("forward") if isinstance(module, nn.Module) else None
    cells = getattr(forward, "__closure__", None) or ()
    inner = [c.cell_contents for c in cells if isinstance(c.cell_contents, types.FunctionType)]
    return inner[0] if len(inner) == 1 else None
