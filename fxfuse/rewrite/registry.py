"""Rule registration: :class:`Rule`, :func:`register_rule`, phases and the run order.

A rule is ``fn(ctx, node) -> Optional[Callable[[], None]]``: it inspects ``node`` and returns ``None`` early when
the node does not match or an exactness condition fails (calling ``ctx.skip(node, Reason.X, "why")`` for a
candidate a user would want to hear about: a stable :class:`fxfuse.Reason` code and a sentence); when it can
rewrite, it returns a thunk that performs the surgery through ``ctx`` (:class:`fxfuse.RewriteContext`). Splitting
*match* from *rewrite* lets the driver count, deny (rollback) and report every rewrite uniformly::

    @fxfuse.register_rule("my_block", after="branch_sum")
    def my_block(ctx, node):
        read = ctx.read.conv(node)
        if not isinstance(read, ConvRead):
            return None
        ...
        return lambda: ctx.replace(node, ctx.insert_conv(new_spec, read.input, before=node, like=read.like))

Order: rules run phase by phase (:data:`PHASES`); within a phase in registration order, which for the built-ins
is the order table in ``fxfuse/rules/__init__.py``. A user rule goes to the end of its phase unless
``before=`` / ``after=`` name a registered rule of that phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence, Union

from torch import fx

if TYPE_CHECKING:
    from .context import RewriteContext

Rewrite = Callable[[], None]
RuleFn = Callable[["RewriteContext", fx.Node], Optional[Rewrite]]

PHASES = ("main", "late")
"""``main``: every rule of the phase is swept over the graph until none applies. ``late``: runs once the main
phase has reached its fixed point (for rules such as ``horizontal`` that must not pre-empt the others)."""


@dataclass(frozen=True)
class Rule:
    """A rewrite rule. ``enabled`` rules run by default; others only when named in ``rules=`` or ``enable=``."""

    name: str
    fn: RuleFn
    enabled: bool = True
    phase: str = "main"
    description: str = ""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"rule {self.name!r}: phase must be one of {PHASES}, got {self.phase!r}")


_RULES: Dict[str, Rule] = {}  # insertion order is the run order within a phase


def register_rule(name: Optional[str] = None, *, enabled: bool = True, phase: str = "main",
                  before: Optional[str] = None, after: Optional[str] = None,
                  replace: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Decorator registering ``fn(ctx, node)`` as a rewrite rule (see the module docstring).

    ``phase``: ``"main"`` (default) or ``"late"``. ``before`` / ``after``: run just before / after that
    registered rule within each sweep (default: after every rule registered so far). ``enabled=False`` keeps the
    rule out of the default set: enable it per call with ``reparametrize(..., enable=[name])``. Registering an
    existing name raises ``ValueError`` unless ``replace=True`` (which keeps the old rule's place)."""
    if before is not None and after is not None:
        raise ValueError("pass at most one of before= and after=")

    def decorator(fn: RuleFn) -> RuleFn:
        rule_name = name or fn.__name__
        if rule_name in _RULES and not replace:
            raise ValueError(f"a rule named {rule_name!r} is already registered (pass replace=True to override)")
        anchor = before if before is not None else after
        if anchor is not None and anchor not in _RULES:
            raise ValueError(f"unknown rule {anchor!r} in before=/after=; registered: {', '.join(_RULES)}")
        doc = (fn.__doc__ or "").strip().splitlines()
        rule = Rule(rule_name, fn, enabled, phase, doc[0] if doc else "")
        if rule_name in _RULES or anchor is None:
            _RULES[rule_name] = rule
            return fn
        items = list(_RULES.items())
        at = [k for k, _ in items].index(anchor) + (0 if before is not None else 1)
        items.insert(at, (rule_name, rule))
        _RULES.clear()
        _RULES.update(items)
        return fn

    return decorator


def unregister_rule(name: str) -> None:
    """Remove a registered rule (``KeyError`` if unknown)."""
    del _RULES[name]


def registered_rules() -> List[Rule]:
    """All registered rules in the order they run (phase by phase)."""
    return sorted(_RULES.values(), key=lambda r: PHASES.index(r.phase))  # stable: registration order within


RuleLike = Union[str, Rule, RuleFn]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown rule {name!r}; registered: {', '.join(sorted(_RULES))}")


def resolve_rules(rules: Optional[Sequence[RuleLike]] = None, enable: Iterable[str] = (),
                  disable: Iterable[str] = ()) -> List[Rule]:
    """The rules of one call, in run order: ``rules`` (names, :class:`Rule` objects or bare functions, run in
    the order given within each phase) or else every enabled registered rule; plus ``enable`` (in registry
    order), minus ``disable``. Unknown names raise ``ValueError``."""
    enable, disable = list(enable), set(disable)
    for n in [*enable, *disable]:
        if n not in _RULES:
            raise _unknown(n)
    if rules is None:
        chosen = [r for r in registered_rules() if r.enabled or r.name in enable]
    else:
        chosen = []
        for r in rules:
            if isinstance(r, Rule):
                chosen.append(r)
            elif isinstance(r, str):
                if r not in _RULES:
                    raise _unknown(r)
                chosen.append(_RULES[r])
            elif callable(r):
                chosen.append(Rule(getattr(r, "__name__", "user_rule"), r))
            else:
                raise TypeError(f"rules must be names, Rule objects or functions, got {type(r).__name__}")
        chosen += [r for r in registered_rules() if r.name in enable and all(c.name != r.name for c in chosen)]
        chosen.sort(key=lambda r: PHASES.index(r.phase))
    return [r for r in chosen if r.name not in disable]
