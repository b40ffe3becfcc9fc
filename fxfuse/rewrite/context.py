"""All graph surgery: :class:`RewriteContext`, what a rule sees and the only code that edits a graph.

Fused parameters always go into *new* modules (nothing the model holds is mutated); nodes are erased only when
dead and pure; metadata users (``x.shape`` …) of folded intermediates are handed to the fused node.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn

from ..ir import ops
from ..ir.algebra import ConvSpec
from ..ir.graphs import erase_if_dead, is_erased
from ..ir.read import Reader, shape_of
from ..reasons import Reason
from ..report import Unfused, WeightGrowth


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
        return any("tensor_meta" not in n.meta for n in self.graph.nodes if n.op not in ("output", "get_attr"))

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
            transposed_cls: Any = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[ndim - 1]
            mod = transposed_cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                      spec.output_padding, spec.groups, True, spec.dilation, device="meta")
        else:
            conv_cls: Any = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
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
                    name: Optional[str] = None, same_shape: bool = True) -> fx.Node:
        """Insert ``call_module(new conv holding spec)(input)`` before ``before``; returns the new node. With
        ``same_shape`` its output shape is ``before``'s (else shapes are re-propagated before the next sweep)."""
        target = self._add_module(self.conv_module(spec, like), name or before.name, like)
        if like is not None and not spec.transposed:
            main = self._main_of.get(id(like), like)
            self._main_kernel[target] = main
            self._main_of[id(self.read.modules[target].weight)] = main
        with self.graph.inserting_before(before):
            node = self.graph.call_module(target, (input,))
        node.meta = dict(before.meta) if same_shape else {}
        return node

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
                      like: Optional[Tensor] = None, name: Optional[str] = None) -> fx.Node:
        mod = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
        mod.weight = nn.Parameter(self._own(weight.detach()))
        mod.bias = nn.Parameter(self._own(bias.detach().to(weight.device)))
        target = self._add_module(mod, name or before.name, like)
        with self.graph.inserting_before(before):
            node = self.graph.call_module(target, (input,))
        node.meta = dict(before.meta)
        return node

    def replace(self, old: fx.Node, new: fx.Node, consumed: Sequence[fx.Node] = ()) -> None:
        """Make ``new`` (same shape as ``old``) compute what ``old`` did; ``consumed`` nodes (intermediates
        folded into ``new``) hand their metadata users to ``new`` and are erased with ``old`` when dead."""
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
        moved = [u for c in consumed for u in list(c.users) if ops.is_metadata_user(u, c)]
        for c in consumed:
            for u in list(c.users):
                if ops.is_metadata_user(u, c):
                    u.replace_input_with(c, new)
        if moved:
            order: Dict[fx.Node, float] = {n: float(i) for i, n in enumerate(self.graph.nodes)}
            _hoist(new, min(moved, key=order.__getitem__), order)
        for n in (old, *consumed):
            erase_if_dead(n, self.read.modules)

    def live_new_modules(self) -> List[Tuple[nn.Module, torch.dtype]]:
        """Modules this pass added that survived later rewrites, with the dtype each must end up in."""
        live = dict(self.gm.named_modules())
        return [(live[name], dt) for name, dt in self.new_modules.items() if name in live]

    def erase_if_dead(self, node: fx.Node) -> None:
        """Erase ``node`` (and inputs that become dead) if nothing uses it and it is pure."""
        erase_if_dead(node, self.read.modules)

    def erase_unused(self, node: fx.Node) -> None:
        """Erase ``node`` if nothing uses it, even if impure (an in-place op the caller proved harmless once its
        result is unused), then its inputs that become dead."""
        if is_erased(node) or node.users:
            return
        inputs = list(node.all_input_nodes)
        self.graph.erase_node(node)
        for i in inputs:
            self.erase_if_dead(i)

    def insert_constant(self, value: Tensor, *, before: fx.Node, like: Optional[Tensor] = None,
                        name: Optional[str] = None) -> fx.Node:
        """A ``get_attr`` of a new module's parameter holding ``value`` (a parameter-only sub-graph evaluated
        once), inserted before ``before`` with its metadata; cast back to ``like``'s dtype like fused layers."""
        holder = nn.Module()
        holder.value = nn.Parameter(self._own(value.detach()))
        target = self._add_module(holder, name or before.name, like)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(f"{target}.value")
        node.meta = dict(before.meta)
        return node

    def copy_before(self, node: fx.Node, anchor: fx.Node, *, replacing: fx.Node, by: fx.Node) -> fx.Node:
        """A copy of ``node`` reading ``by`` where it read ``replacing``, inserted before ``anchor`` (its shape
        is unknown until the next propagation)."""
        copy = self.graph.node_copy(node, lambda n: by if n is replacing else n)
        anchor.prepend(copy)
        copy.meta = {}
        return copy

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

