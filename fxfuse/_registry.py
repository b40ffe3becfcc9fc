"""Rewrite rules: registration, the context a rule works through, and the fixed-point driver.

A rule is ``fn(ctx, node) -> Optional[Callable[[], None]]``: it inspects ``node`` and returns ``None`` early when
the node does not match or an exactness condition fails (calling ``ctx.skip(node, reason)`` for a candidate a user
would want to hear about); when it can rewrite, it returns a thunk that performs the surgery through ``ctx``.
Splitting *match* from *rewrite* lets the driver count, deny (rollback) and report every rewrite uniformly::

    @fxfuse.register_rule("my_block")
    def my_block(ctx, node):
        read = ctx.read.conv(node)
        if not isinstance(read, ConvRead):
            return None
        ...
        return lambda: ctx.replace(node, ctx.insert_conv(new_spec, read.input, before=node, like=read.like))

Built-in rules register themselves the same way (``fxfuse/rules/``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, fx, nn

from ._graph import Reader, erase_if_dead, is_metadata_user, real_users, shape_of
from ._report import Unfused
from ._spec import ConvSpec

Rewrite = Callable[[], None]
LATE_PHASE = 90  # rules at or above this priority run only after the others reached their fixed point
RuleFn = Callable[["RewriteContext", fx.Node], Optional[Rewrite]]


@dataclass(frozen=True)
class Rule:
    """A registered rewrite rule. ``enabled`` rules run by default; others only when named in ``rules=`` or
    ``enable=``."""

    name: str
    fn: RuleFn
    enabled: bool = True
    priority: int = 70
    description: str = ""


_RULES: Dict[str, Rule] = {}


def register_rule(name: Optional[str] = None, *, enabled: bool = True, priority: int = 70,
                  replace: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``fn(ctx, node)`` as a rewrite rule (see module docstring).

    ``priority`` orders rules within one sweep (lower first; built-ins use 0..60, so the default 70 runs a user
    rule after them in every sweep of the main phase). Priorities ≥ ``LATE_PHASE`` (90) run only after the main
    phase has reached its fixed point. ``enabled=False`` keeps the
    rule out of the default set: enable it per call with ``reparametrize(..., enable=[name])``. Registering an
    existing name raises ``ValueError`` unless ``replace=True``."""

    def decorator(fn: RuleFn) -> RuleFn:
        rule_name = name or fn.__name__
        if rule_name in _RULES and not replace:
            raise ValueError(f"a rule named {rule_name!r} is already registered (pass replace=True to override)")
        doc = (fn.__doc__ or "").strip().splitlines()
        _RULES[rule_name] = Rule(rule_name, fn, enabled, priority, doc[0] if doc else "")
        return fn

    return decorator


def unregister_rule(name: str) -> None:
    """Remove a registered rule (``KeyError`` if unknown)."""
    del _RULES[name]


def registered_rules() -> List[Rule]:
    """All registered rules in the order they run."""
    return sorted(_RULES.values(), key=lambda r: (r.priority, r.name))


RuleLike = Union[str, Rule, RuleFn]


def resolve_rules(rules: Optional[Sequence[RuleLike]] = None, enable: Iterable[str] = (),
                  disable: Iterable[str] = ()) -> List[Rule]:
    """The rules of one call: ``rules`` (names, :class:`Rule` objects or bare functions) or else every enabled
    registered rule, plus ``enable``, minus ``disable``. Unknown names raise ``ValueError``."""
    enable, disable = list(enable), set(disable)
    for n in itertools.chain(enable, disable):
        if n not in _RULES:
            raise ValueError(f"unknown rule {n!r}; registered: {', '.join(sorted(_RULES))}")
    if rules is None:
        chosen = [r for r in registered_rules() if r.enabled or r.name in enable]
    else:
        chosen = []
        for r in rules:
            if isinstance(r, Rule):
                chosen.append(r)
            elif isinstance(r, str):
                if r not in _RULES:
                    raise ValueError(f"unknown rule {r!r}; registered: {', '.join(sorted(_RULES))}")
                chosen.append(_RULES[r])
            elif callable(r):
                chosen.append(Rule(getattr(r, "__name__", "user_rule"), r))
            else:
                raise TypeError(f"rules must be names, Rule objects or functions, got {type(r).__name__}")
        chosen += [_RULES[n] for n in enable if all(c.name != n for c in chosen)]
        chosen.sort(key=lambda r: r.priority)
    return [r for r in chosen if r.name not in disable]


class RewriteContext:
    """What a rule sees: the graph, a :class:`Reader` for its nodes, and surgery helpers that keep the model's
    other users intact (fused parameters always go into *new* modules; nothing existing is mutated)."""

    def __init__(self, gm: fx.GraphModule, target_dtype: Dict[int, torch.dtype], default_dtype: torch.dtype,
                 requires_grad: bool, options: Optional[dict] = None,
                 reshape: Optional[Callable[[], None]] = None) -> None:
        self.gm = gm
        self.reshape = reshape  # re-runs shape propagation after rewrites that could not give a new node a shape
        self.graph = gm.graph
        self.read = Reader(gm)
        self.options = dict(options or {})
        self._target_dtype = target_dtype
        self._default_dtype = default_dtype
        self._requires_grad = requires_grad
        self.new_modules: Dict[str, torch.dtype] = {}
        self.skips: Dict[tuple, Unfused] = {}
        self._rule = ""
        self._names: Set[str] = set(dict(gm.named_modules()))
        self._held: Optional[Set[int]] = None  # storages the module holds (filled on the first insertion)

    # -- users -------------------------------------------------------------------------------------
    real_users = staticmethod(real_users)

    @staticmethod
    def single_user(node: fx.Node) -> Optional[fx.Node]:
        """The only real (non-metadata) user of ``node``, or ``None``."""
        users = real_users(node)
        return users[0] if len(users) == 1 else None

    shape = staticmethod(shape_of)

    def skip(self, node: fx.Node, reason: str) -> None:
        """Record that the current rule left candidate ``node`` unfused, and why. Returns ``None``."""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        self.skips[(self._rule, node.name)] = Unfused(self._rule, node.name, str(target), reason)
        return None

    # -- surgery -------------------------------------------------------------------------------------
    def _fresh_name(self, base: str) -> str:
        base = "fused_" + base.replace(".", "_")
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
        if spec.transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[ndim - 1]
            mod = cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                      spec.output_padding, spec.groups, True, spec.dilation, device="meta")
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
            mod = cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
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
        with self.graph.inserting_before(before):
            node = self.graph.call_module(target, (input,))
        node.meta = dict(before.meta) if same_shape else {}
        return node

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
        moved = [u for c in consumed for u in list(c.users) if is_metadata_user(u, c)]
        for c in consumed:
            for u in list(c.users):
                if is_metadata_user(u, c):
                    u.replace_input_with(c, new)
        if moved:
            order = {n: i for i, n in enumerate(self.graph.nodes)}
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


def _hoist(node: fx.Node, anchor: fx.Node, order: Dict[fx.Node, int]) -> None:
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


def _held_tensors(root: nn.Module):
    """Every parameter, buffer and plain tensor attribute of ``root``'s modules."""
    for mod in root.modules():
        yield from (t for t in mod._parameters.values() if t is not None)
        yield from (t for t in mod._buffers.values() if t is not None)
        yield from (v for v in vars(mod).values() if isinstance(v, Tensor))


def _channels_last(dim: int) -> torch.memory_format:
    return torch.channels_last if dim == 4 else torch.channels_last_3d


@dataclass
class PassResult:
    applied: List[str]
    fused: Counter
    unfused: List[Unfused]
    denied: List[str]


def run_rules(ctx: RewriteContext, rules: Sequence[Rule], *, deny: Set[str] = frozenset(),
              max_rewrites: Optional[int] = None, max_sweeps: int = 50) -> PassResult:
    """Apply ``rules`` to a fixed point. Each rewrite has a stable key ``rule:node``; keys in ``deny`` (and every
    rewrite after the first ``max_rewrites``) are skipped — the verifier bisects with these."""
    applied: List[str] = []
    fused: Counter = Counter()
    denied: List[str] = []
    skips: Dict[tuple, Unfused] = {}
    phases = [[r for r in rules if r.priority < LATE_PHASE], [r for r in rules if r.priority >= LATE_PHASE]]
    for phase in phases:
        if phase:
            _sweep(ctx, phase, deny, max_rewrites, max_sweeps, applied, fused, denied)
            skips.update(ctx.skips)
    ctx.graph.lint()
    ctx.gm.recompile()
    return PassResult(applied, fused, list(skips.values()), denied)


def _sweep(ctx: RewriteContext, rules: Sequence[Rule], deny: Set[str], max_rewrites: Optional[int],
           max_sweeps: int, applied: List[str], fused: Counter, denied: List[str]) -> None:
    for _ in range(max_sweeps):
        ctx.skips.clear()
        if ctx.reshape is not None and any("tensor_meta" not in n.meta for n in ctx.graph.nodes
                                           if n.op not in ("output", "get_attr")):
            ctx.reshape()
        changed = False
        for rule in rules:
            ctx._rule = rule.name
            for node in list(ctx.graph.nodes):
                if getattr(node, "_erased", False) or node.op == "output":
                    continue
                rewrite = rule.fn(ctx, node)
                if rewrite is None:
                    continue
                key = f"{rule.name}:{node.name}"
                if key in deny or (max_rewrites is not None and len(applied) >= max_rewrites):
                    if key in deny:
                        ctx.skip(node, "rolled back: this rewrite changed the model's outputs")
                        if key not in denied:
                            denied.append(key)
                    continue
                rewrite()
                applied.append(key)
                fused[rule.name] += 1
                changed = True
        if not changed:
            break
