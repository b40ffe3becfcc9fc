"""Expansion schemes as data: what a scheme sees (one conv's
:class:`~fxfuse.ir.algebra.ConvGeometry`), what it returns (:class:`Plan` of
:class:`Branch` es), and the registry (:func:`register_scheme`, same style as :func:`fxfuse.register_rule`).

A scheme is a function ``fn(geometry, **options) -> Plan`` (or a list of :class:`Branch`): given one conv's
geometry it names the branches to add next to it. It does not build modules or choose parameter values; the
block builder (:mod:`fxfuse.expansion.modules`) does both, the same way for every scheme::

    @fxfuse.expansion.register_scheme("mine")
    def mine(g: ConvGeometry) -> Plan:
        if g.aligned_padding((1, 1)) is None:
            return Plan(notes=("no 1x1 branch: its tap is not on the kxk grid",))
        return Plan((Branch("conv", (1, 1)),))

Every branch reads the block input and is summed with the main branch (the user's conv and its BatchNorm).
Branch kinds (each ends in a BatchNorm unless ``bn=False``):

* ``"conv"``: a conv of kernel ``kernel`` (default: the main kernel) with the main stride, dilation and groups,
  padded so that its taps sit on the main conv's tap grid (:meth:`ConvGeometry.aligned_padding`);
* ``"identity"``: the input itself (needs :attr:`ConvGeometry.identity_fits`);
* ``"1x1_kxk"``: DBB's 1x1 conv → BN (border padded with BN(0)) → main-kernel conv (padding 0) chain;
* ``"1x1_avg"``: DBB's 1x1 conv → BN (padded) → average pool of the main kernel (needs dilation 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..ir.algebra import ConvGeometry

Pair = Tuple[int, int]


def pair(v: object) -> Pair:
    """An int or a 2-sequence of ints (a 2d conv's kernel, stride, padding …) as ``(H, W)``."""
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    assert isinstance(v, int), f"expected an int or a pair, got {v!r}"
    return (v, v)

BRANCH_KINDS = ("conv", "identity", "1x1_kxk", "1x1_avg")


@dataclass(frozen=True)
class Branch:
    """One branch added next to the main conv (kinds in the module docstring)."""

    kind: str
    kernel: Optional[Pair] = None  # "conv": the branch kernel (None: the main kernel)
    bn: bool = True
    internal_channels: Optional[int] = None  # "1x1_kxk": width after the 1x1 (default as DBB)
    name: Optional[str] = None  # key in the block's ``branches`` (default derived from kind and kernel)

    def __post_init__(self) -> None:
        if self.kind not in BRANCH_KINDS:
            raise ValueError(f"unknown branch kind {self.kind!r}; one of {BRANCH_KINDS}")


@dataclass(frozen=True)
class Plan:
    """What a scheme adds to one conv. ``post_bn``: one BatchNorm after the sum (QARepVGG) — the user's BN, if
    the conv had one, moves there and the main branch gets a new one; a conv without BN gets none (the report
    notes it).
    ``notes``: branches the scheme left out for this geometry, and why (listed in the report)."""

    branches: Tuple[Branch, ...] = ()
    post_bn: bool = False
    notes: Tuple[str, ...] = ()


class PlanBuilder:
    """Collects what a scheme adds to one conv: each branch, or — when the geometry rules it out — why not."""

    def __init__(self, branches: Sequence[Branch] = ()) -> None:
        self.branches: List[Branch] = list(branches)
        self.notes: List[str] = []

    def add(self, what: str, branch: Branch, reason: Optional[str] = None) -> None:
        """Add ``branch`` if ``reason`` is None, else note "no <what> branch: <reason>"."""
        if reason is None:
            self.branches.append(branch)
        else:
            self.notes.append(f"no {what} branch: {reason}")

    def pointwise(self, g: ConvGeometry, **branch: Any) -> None:
        """A 1x1 branch on the kxk kernel's centre tap (none for a 1x1 main conv: it would duplicate it)."""
        if not g.pointwise:
            self.add("1x1", Branch("conv", (1, 1), **branch), g.why_not_aligned((1, 1)))

    def identity(self, g: ConvGeometry, **branch: Any) -> None:
        """The identity branch, where ``in == out``, stride 1 and the conv keeps the spatial size."""
        self.add("identity", Branch("identity", **branch), g.why_no_identity())

    def plan(self, post_bn: bool = False) -> Plan:
        return Plan(tuple(self.branches), post_bn=post_bn, notes=tuple(self.notes))


SchemeFn = Callable[..., Union[Plan, Sequence[Branch]]]


@dataclass(frozen=True)
class Scheme:
    """A registered scheme: ``fn(geometry, **options)``. :meth:`with_options` binds options
    (``get_scheme("mobileone").with_options(num_conv_branches=2)``)."""

    name: str
    fn: SchemeFn
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def plan(self, geometry: ConvGeometry) -> Plan:
        """The branches for one conv (a list of :class:`Branch` is accepted as a :class:`Plan`)."""
        out = self.fn(geometry, **dict(self.options))
        if isinstance(out, Plan):
            return out
        return Plan(tuple(out))

    def with_options(self, **options: Any) -> Scheme:
        return _replace(self, options={**self.options, **options})


_SCHEMES: Dict[str, Scheme] = {}


def register_scheme(name: Optional[str] = None, *, replace: bool = False) -> Callable[[SchemeFn], Scheme]:
    """Decorator registering ``fn(geometry, **options) -> Plan`` under ``name`` (default: the function name);
    returns the :class:`Scheme`. Registering an existing name raises ``ValueError`` unless ``replace=True``."""

    def decorator(fn: SchemeFn) -> Scheme:
        scheme_name = name or fn.__name__
        if scheme_name in _SCHEMES and not replace:
            raise ValueError(f"a scheme named {scheme_name!r} is already registered (pass replace=True)")
        doc = (fn.__doc__ or "").strip().splitlines()
        scheme = Scheme(scheme_name, fn, {}, doc[0] if doc else "")
        _SCHEMES[scheme_name] = scheme
        return scheme

    return decorator


def unregister_scheme(name: str) -> None:
    """Remove a registered scheme (``KeyError`` if unknown)."""
    del _SCHEMES[name]


def registered_schemes() -> List[Scheme]:
    """All registered schemes, in registration order."""
    return list(_SCHEMES.values())


SchemeLike = Union[str, Scheme, SchemeFn]


def get_scheme(scheme: SchemeLike) -> Scheme:
    """A :class:`Scheme` from a registered name, a :class:`Scheme`, or a bare scheme function."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str):
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; registered: {', '.join(_SCHEMES)}")
        return _SCHEMES[scheme]
    if callable(scheme):
        return Scheme(getattr(scheme, "__name__", "user_scheme"), scheme)
    raise TypeError(f"scheme must be a name, a Scheme or a function, got {type(scheme).__name__}")
