"""All graph surgery: :class:`RewriteContext`, what a rule sees and the only code that edits a graph.

Fused parameters always go into *new* modules (nothing the model holds is mutated); nodes are erased only when
dead and pure; metadata users (``x.shape`` …) of folded intermediates are handed to the fused node.

The surgery methods, by what they do (each counted in :attr:`RewriteContext.counts`, a :class:`SurgeryCounts`):

* insert (``counts.inserted``, one per node added): :meth:`~RewriteContext.insert_conv`,
  :meth:`~RewriteContext.insert_linear`, :meth:`~RewriteContext.insert_constant` (a new module holding fused
  tensors), :meth:`~RewriteContext.insert_sum` (``Σ coef·term`` as out-of-place adds),
  :meth:`~RewriteContext.insert_split` (a split along one axis and its pieces), :meth:`~RewriteContext.insert_reshape`,
  :meth:`~RewriteContext.copy_before`;
* replace (``counts.replaced``, one per node whose users or inputs were rerouted): :meth:`~RewriteContext.replace`
  (a new node computes what the old one did), :meth:`~RewriteContext.bypass` (the old node computed nothing: its
  users read its input), :meth:`~RewriteContext.replace_input` (one user reads another input),
  :meth:`~RewriteContext.set_arg` (a node's argument changes);
* erase (``counts.erased``, one per node removed, including inputs that became dead with it):
  :meth:`~RewriteContext.erase_if_dead`, :meth:`~RewriteContext.erase_unused`, and the clean-up inside
  ``replace`` / ``bypass``.

Rules never call ``ctx.graph`` themselves; the counters let a test check what a rewrite did to the graph (and that
nothing else edited it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn

from ..ir import ops
from ..ir.algebra import ConvSpec
from ..ir.graphs import erase_if_dead, is_erased
from ..ir.read import Reader, shape_of
from ..ir.read.args import SHAPED
from ..reasons import Reason
from ..report import Unfused, WeightGrowth


@dataclass
class SurgeryCounts:
    """How many nodes the surgery methods of one :class:`RewriteContext` added, rerouted and removed."""

    inserted: int = 0
    replaced: int = 0
    erased: int = 0


class RewriteContext:
    """What a rule sees: the graph, a :class:`Reader` for its nodes, and surgery helpers that keep the model's
    other users intact (fused parameters always go into *new* modules; nothing existing is mutated)."""

    def __init__(self, gm: fx.GraphModule, target_dtype: Dict[int, torch.dtype], default_dtype: torch.dtype,
                 requires_grad: bool, reshape: Optional[Callable[[], None]] = None) -> None:
        self.gm = gm
        self.reshape = reshape  # re-runs shape propagation after rewrites that could not give a new node a shape
        self.graph = gm.graph
        self.read = Reader(gm)
        self._target_dtype = target_dtype
        self._default_dtype = default_dtype
        self._requires_grad = requires_grad
        self.new_modules: Dict[str, torch.dtype] = {}
        self.skips: Dict[tuple, Unfused] = {}
        self.rule = ""  # the rule being matched (set by the driver through begin_rule)
        self._names: Set[str] = set(dict(gm.named_modules()))
        self._held: Optional[Set[int]] = None  # storages the module holds (filled on the first insertion)
        # new conv module -> the main branch's original kernel (root of its `like` chain), for weight_growth()
        self._main_kernel: Dict[str, Tensor] = {}
        self._main_of: Dict[int, Tensor] = {}  # id(new conv weight) -> that kernel (read.modules keeps them alive)
        self.counts = SurgeryCounts()

    # -- users -------------------------------------------------------------------------------------
    real_users = staticmethod(ops.real_users)

    @staticmethod
    def single_user(node: fx.Node) -> Optional[fx.Node]:
        """The only real (non-metadata) user of ``node``, or ``None``."""
        users = ops.real_users(node)
        return users[0] if len(users) == 1 else None

    shape = staticmethod(shape_of)

    def begin_rule(self, name: str) -> None:
        """Attribute the skips recorded from now on to rule ``name``."""
        self.rule = name

    def needs_shapes(self) -> bool:
        """Whether a node inserted without a known shape is waiting for shape propagation."""
        return any(SHAPED not in n.meta for n in self.graph.nodes if n.op not in ("output", "get_attr"))

    def skip(self, node: fx.Node, code: Reason, reason: str) -> None:
        """Record that the current rule left candidate ``node`` unfused: ``code`` (a :class:`~fxfuse.reasons.Reason`,
        the stable code callers branch on) names the exactness condition that failed, ``reason`` says it in a
        sentence. Returns ``None`` (``return ctx.skip(...)`` is the rule idiom)."""
        if not isinstance(code, Reason):
            raise TypeError(f"ctx.skip(node, code, reason): code must be a fxfuse.Reason, not {code!r}")
        op = node.args[0] if ops.tuple_output_of(node) and isinstance(node.args[0], fx.Node) else node
        # (a tuple BatchNorm's output is named by the BatchNorm, not ``getitem``)
        target = op.target if isinstance(op.target, str) else getattr(op.target, "__name__", str(op.target))
        self.skips[(self.rule, node.name)] = Unfused(self.rule, node.name, str(target), code, reason)
        return None

    # -- surgery -------------------------------------------------------------------------------------
    def _fresh_name(self, base: str) -> str:
        base = "fused_" + base.replace(".", "_").removeprefix("fused_")
        name, i = base, 1
        while name in self._names or hasattr(self.gm, name):
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _dtype_for(self, like: Optional[Tensor]) -> torch.dtype:
        if like is not None and id(like) in self._target_dtype:
            return self._target_dtype[id(like)]
        return self._default_dtype

    def _add_module(self, module: nn.Module, base: str, like: Optional[Tensor]) -> str:
        name = self._fresh_name(base)
        for p in module.parameters():
            p.requires_grad_(like.requires_grad if isinstance(like, nn.Parameter) else self._requires_grad)
        self.gm.add_module(name, module)
        self.read.modules[name] = module
        self.new_modules[name] = self._dtype_for(like)
        return name

    def conv_module(self, spec: ConvSpec, like: Optional[Tensor]) -> nn.Module:
        """An ``nn.ConvNd`` / ``nn.ConvTransposeNd`` holding ``spec`` (same device as ``spec.weight``)."""
        ndim = spec.ndim
        mod: nn.Module
        if spec.transposed:
            transposed_cls: Any = ops.CONV_T_MODULES[ndim - 1]
            mod = transposed_cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                      spec.output_padding, spec.groups, True, spec.dilation, device="meta")
        else:
            conv_cls: Any = ops.CONV_MODULES[ndim - 1]
            mod = conv_cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                      spec.dilation, spec.groups, True, spec.padding_mode, device="meta")
        weight = spec.weight.detach()
        if like is not None and like.dim() == weight.dim() and like.dim() in (4, 5) \
                and not like.is_contiguous() and like.is_contiguous(memory_format=_channels_last(like.dim())):
            weight = weight.contiguous(memory_format=_channels_last(like.dim()))
        mod.weight = nn.Parameter(self._own(weight))
        mod.bias = nn.Parameter(self._own(spec.bias.detach().to(weight.device)))
        return mod

    def _own(self, t: Tensor) -> Tensor:
        """``t`` for a new parameter: copied only if its storage is shared with a tensor the graph module (or a
        module added by this pass) already holds; a freshly computed fused tensor is taken without a copy."""
        if self._held is None:
            self._held = {_storage_ptr(x) for x in _held_tensors(self.gm)}
        ptr = _storage_ptr(t)
        if ptr == 0 or ptr in self._held:
            t = t.clone()
            ptr = _storage_ptr(t)
        self._held.add(ptr)
        return t

    def insert_conv(self, spec: ConvSpec, input: fx.Node, *, before: fx.Node, like: Optional[Tensor] = None,
                    name: Optional[str] = None, same_shape: bool = True, shape_of: Optional[fx.Node] = None) -> fx.Node:
        """Insert ``call_module(new conv holding spec)(input)`` before ``before``; returns the new node. With
        ``same_shape`` its output shape is ``before``'s, or ``shape_of``'s when given (else shapes are re-propagated
        before the next sweep)."""
        target = self._add_module(self.conv_module(spec, like), name or before.name, like)
        if like is not None and not spec.transposed:
            main = self._main_of.get(id(like), like)
            self._main_kernel[target] = main
            self._main_of[id(self.read.modules[target].weight)] = main
        meta = (shape_of or before).meta if same_shape else None
        return self._insert(before, "call_module", target, (input,), meta=meta)

    def weight_growth(self) -> List[WeightGrowth]:
        """Per added conv still in the graph: its kernel's per-output-channel range vs the main branch's original
        kernel (:class:`fxfuse.report.WeightGrowth`)."""
        live = [str(n.target) for n in self.graph.nodes
                if n.op == "call_module" and str(n.target) in self._main_kernel]
        out = []
        for name in live:
            weight = self.read.modules[name].weight
            growth = WeightGrowth.of(name, weight, self._main_kernel[name]) if isinstance(weight, Tensor) else None
            if growth is not None:
                out.append(growth)
        return out

    def insert_linear(self, weight: Tensor, bias: Tensor, input: fx.Node, *, before: fx.Node,
                      like: Optional[Tensor] = None, name: Optional[str] = None,
                      shape_of: Optional[fx.Node] = None) -> fx.Node:
        """Insert ``call_module(new nn.Linear(weight, bias))(input)`` before ``before``, with ``before``'s output
        shape (``shape_of``'s when given); returns the new node."""
        mod = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        mod.weight = nn.Parameter(self._own(weight.detach()))
        mod.bias = nn.Parameter(self._own(bias.detach().to(weight.device)))
        target = self._add_module(mod, name or before.name, like)
        return self._insert(before, "call_module", target, (input,), meta=(shape_of or before).meta)

    def replace(self, old: fx.Node, new: fx.Node, consumed: Sequence[fx.Node] = ()) -> None:
        """Make ``new`` (same shape as ``old``) compute what ``old`` did; ``consumed`` nodes (intermediates
        folded into ``new``) hand their metadata users to ``new`` and are erased with ``old`` when dead."""
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
        self.counts.replaced += 1
        moved = [u for c in consumed for u in list(c.users) if ops.is_metadata_user(u, c)]
        for c in consumed:
            for u in list(c.users):
                if ops.is_metadata_user(u, c):
                    u.replace_input_with(c, new)
        if moved:
            order: Dict[fx.Node, float] = {n: float(i) for i, n in enumerate(self.graph.nodes)}
            _hoist(new, min(moved, key=order.__getitem__), order)
        for n in (old, *consumed):
            self.erase_if_dead(n)

    def replace_input(self, user: fx.Node, old: fx.Node, new: fx.Node) -> None:
        """``user`` reads ``new`` where it read ``old`` (its other inputs and its users stay)."""
        user.replace_input_with(old, new)
        self.counts.replaced += 1

    def set_arg(self, node: fx.Node, index: int, name: str, value: Any) -> None:
        """Set ``node``'s argument ``index`` (or keyword ``name`` when it was passed by keyword) to ``value``."""
        if len(node.args) > index:
            node.update_arg(index, value)
        else:
            node.update_kwarg(name, value)
        self.counts.replaced += 1

    def bypass(self, node: fx.Node, source: fx.Node) -> None:
        """``node`` computes nothing (an identity, eval dropout, ``t + 0``): its users read ``source`` instead, and
        it is erased, even where the op table calls it impure (``F.dropout``)."""
        node.replace_all_uses_with(source)
        self.counts.replaced += 1
        self.erase_unused(node)

    def live_new_modules(self) -> List[Tuple[nn.Module, torch.dtype]]:
        """Modules this pass added that survived later rewrites, with the dtype each must end up in."""
        live = dict(self.gm.named_modules())
        return [(live[name], dt) for name, dt in self.new_modules.items() if name in live]

    def erase_if_dead(self, node: fx.Node) -> None:
        """Erase ``node`` (and inputs that become dead) if nothing uses it and it is pure."""
        self.counts.erased += erase_if_dead(node, self.read.modules)

    def erase_unused(self, node: fx.Node) -> None:
        """Erase ``node`` if nothing uses it, even if impure (an in-place op the caller proved harmless once its
        result is unused), then its inputs that become dead."""
        if is_erased(node) or node.users:
            return
        inputs = list(node.all_input_nodes)
        self.graph.erase_node(node)
        self.counts.erased += 1
        for i in inputs:
            self.erase_if_dead(i)

    def insert_constant(self, value: Tensor, *, before: fx.Node, like: Optional[Tensor] = None,
                        name: Optional[str] = None) -> fx.Node:
        """A ``get_attr`` of a new module's parameter holding ``value`` (a parameter-only sub-graph evaluated
        once), inserted before ``before`` with its metadata; cast back to ``like``'s dtype like fused layers."""
        holder = nn.Module()
        holder.value = nn.Parameter(self._own(value.detach()))
        target = self._add_module(holder, name or before.name, like)
        return self._insert(before, "get_attr", f"{target}.value", (), meta=before.meta)

    def copy_before(self, node: fx.Node, anchor: fx.Node, *, replacing: fx.Node, by: fx.Node) -> fx.Node:
        """A copy of ``node`` reading ``by`` where it read ``replacing``, inserted before ``anchor`` (its shape
        is unknown until the next propagation)."""
        copy = self.graph.node_copy(node, lambda n: by if n is replacing else n)
        anchor.prepend(copy)
        copy.meta = {}
        self.counts.inserted += 1
        return copy

    def insert_sum(self, terms: Sequence[Tuple[float, fx.Node]], *, before: fx.Node) -> fx.Node:
        """``Σ coef·term`` as out-of-place adds before ``before``, each with ``before``'s metadata (same shape);
        the first term's coefficient must be 1. Returns the last add (the first term if there is only one)."""
        first_coef, acc = terms[0]
        if first_coef != 1.0:
            raise ValueError(f"insert_sum: the first term's coefficient must be 1, not {first_coef}")
        for coef, term in terms[1:]:
            target, args, kwargs = ops.weighted_add(acc, term, coef)
            acc = self._insert(before, "call_function", target, args, kwargs, meta=before.meta)
        return acc

    def insert_split(self, input: fx.Node, sizes: Sequence[int], *, dim: int, before: fx.Node) -> List[fx.Node]:
        """``input`` split along ``dim`` into pieces of ``sizes``, inserted before ``before``: one node per piece
        (their shapes are unknown until the next propagation)."""
        parts = self._insert(before, "call_function", ops.SPLIT, (input, list(sizes)), {"dim": dim})
        return [self._insert(before, "call_function", ops.GETITEM, (parts, i)) for i in range(len(sizes))]

    def insert_reshape(self, input: fx.Node, sizes: Sequence[int], *, before: fx.Node,
                       shape_of: Optional[fx.Node] = None) -> fx.Node:
        """``input.reshape(sizes)`` inserted before ``before`` (``-1`` for the batch), with ``shape_of``'s metadata
        when given (else its shape is unknown until the next propagation)."""
        meta = shape_of.meta if shape_of is not None else None
        return self._insert(before, "call_function", ops.RESHAPE, (input, list(sizes)), meta=meta)

    def in_graph_order(self, nodes: Iterable[fx.Node]) -> List[fx.Node]:
        """``nodes`` sorted by their position in the graph."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        return sorted(nodes, key=order.__getitem__)

    def _insert(self, before: fx.Node, op: str, target: Any, args: Tuple[Any, ...],
                kwargs: Optional[Dict[str, Any]] = None, *, meta: Optional[Dict[str, Any]] = None) -> fx.Node:
        """The one place a node is created: ``op`` / ``target`` / ``args`` before ``before``, with a copy of
        ``meta`` (``None``: unknown shape, filled by the next propagation)."""
        with self.graph.inserting_before(before):
            node = self.graph.create_node(op, target, args, kwargs)
        node.meta = dict(meta) if meta is not None else {}
        self.counts.inserted += 1
        return node

    is_erased = staticmethod(is_erased)


def _hoist(node: fx.Node, anchor: fx.Node, order: Dict[fx.Node, float]) -> None:
    """Move ``node`` (and the inputs it needs) before ``anchor`` if it comes later: keeps the graph topological
    after a shape-reading user of a folded intermediate was handed to the fused node."""
    if order[node] < order[anchor]:
        return
    for inp in node.all_input_nodes:
        _hoist(inp, anchor, order)
    anchor.prepend(node)
    order[node] = order[anchor] - 0.5


def _storage_ptr(t: Tensor) -> int:
    return 0 if t.device.type == "meta" or t.numel() == 0 else t.untyped_storage().data_ptr()


def _held_tensors(root: nn.Module) -> Iterator[Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``root``'s modules."""
    for mod in root.modules():
        yield from (t for t in mod._parameters.values() if t is not None)
        yield from (t for t in mod._buffers.values() if t is not None)
        yield from (v for v in vars(mod).values() if isinstance(v, Tensor))


def _channels_last(dim: int) -> torch.memory_format:
    return torch.channels_last if dim == 4 else torch.channels_last_3d

