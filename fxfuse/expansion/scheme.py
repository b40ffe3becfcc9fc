"""Expansion schemes as data: what a scheme sees (:class:`Geometry`), what it returns (:class:`Plan` of
:class:`Branch` es), and the registry (:func:`register_scheme`, same style as :func:`fxfuse.register_rule`).

A scheme is a function ``fn(geometry, **options) -> Plan`` (or a list of :class:`Branch`): given one conv's
geometry it names the branches to add next to it. It does not build modules or choose parameter values; the
block builder (:mod:`fxfuse.expansion.modules`) does both, the same way for every scheme::

    @fxfuse.expansion.register_scheme("mine")
    def mine(g: Geometry) -> Plan:
        if g.aligned_padding((1, 1)) is None:
            return Plan(notes=("no 1x1 branch: its tap is not on the kxk grid",))
        return Plan((Branch("conv", (1, 1)),))

Every branch reads the block input and is summed with the main branch (the user's conv and its BatchNorm).
Branch kinds (each ends in a BatchNorm unless ``bn=False``):

* ``"conv"``: a conv of kernel ``kernel`` (default: the main kernel) with the main stride, dilation and groups,
  padded so that its taps sit on the main conv's tap grid (:meth:`Geometry.aligned_padding`);
* ``"identity"``: the input itself (needs :attr:`Geometry.identity_fits`);
* ``"1x1_kxk"``: DBB's 1x1 conv → BN (border padded with BN(0)) → main-kernel conv (padding 0) chain;
* ``"1x1_avg"``: DBB's 1x1 conv → BN (padded) → average pool of the main kernel (needs dilation 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as _replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

Pair = Tuple[int, int]
BRANCH_KINDS = ("conv", "identity", "1x1_kxk", "1x1_avg")


@dataclass(frozen=True)
class Geometry:
    """One ``nn.Conv2d`` as a scheme sees it (``padding`` is zero padding, per axis ``(H, W)``)."""

    in_channels: int
    out_channels: int
    kernel_size: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    bias: bool
    has_bn: bool  # a BatchNorm2d follows the conv (and moves into the block)

    @property
    def pointwise(self) -> bool:
        """1x1 kernel."""
        return self.kernel_size == (1, 1)

    @property
    def depthwise(self) -> bool:
        """One group per input channel (``groups == in_channels > 1``)."""
        return self.groups == self.in_channels and self.groups > 1

    def aligned_padding(self, kernel: Pair) -> Optional[Pair]:
        """Zero padding that puts a ``kernel`` conv (same stride and dilation) on this conv's tap grid, or ``None``.

        Per axis the windows must share their centre (``-2p + d(k-1)``, which also makes the output sizes equal)
        and the smaller kernel's taps must be taps of the larger one: ``k' <= k``, ``k - k'`` even,
        ``p' = p - d(k - k')/2 >= 0`` (docs/patterns.md, `branch_sum`)."""
        out = []
        for k, p, d, k2 in zip(self.kernel_size, self.padding, self.dilation, kernel):
            if k2 > k or (k - k2) % 2:
                return None
            p2 = p - d * (k - k2) // 2
            if p2 < 0:
                return None
            out.append(p2)
        return (out[0], out[1])

    def why_not_aligned(self, kernel: Pair) -> Optional[str]:
        """Why a ``kernel`` branch cannot share this conv's tap grid (``None`` when it can)."""
        if self.aligned_padding(kernel) is None:
            return (f"a {kernel[0]}x{kernel[1]} kernel's taps are not on the grid of this {self.kernel_size[0]}x"
                    f"{self.kernel_size[1]} conv (padding {self.padding}, dilation {self.dilation})")
        return None

    def why_no_identity(self) -> Optional[str]:
        """Why the input itself cannot be a branch (``None`` when it can): it needs ``in == out``, stride 1, an
        odd kernel and ``padding = d(k-1)/2`` (same spatial size; the identity tap is the kernel centre)."""
        if self.in_channels != self.out_channels:
            return f"in_channels {self.in_channels} != out_channels {self.out_channels}"
        if self.stride != (1, 1):
            return f"stride {self.stride}"
        if not all(k % 2 == 1 and p == d * (k - 1) // 2
                   for k, p, d in zip(self.kernel_size, self.padding, self.dilation)):
            return (f"kernel {self.kernel_size} with padding {self.padding} and dilation {self.dilation} does not "
                    "keep the spatial size around a centre tap")
        return None

    @property
    def identity_fits(self) -> bool:
        """The input itself can be a branch (:meth:`why_no_identity`)."""
        return self.why_no_identity() is None

    @property
    def avg_pool_fits(self) -> bool:
        """An average pool of the main kernel reads the same taps: dilation 1 on every axis whose kernel > 1."""
        return all(d == 1 for d, k in zip(self.dilation, self.kernel_size) if k > 1)


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
    the conv had one, moves there and the main branch gets a new one; a conv without BN gets none.
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

    def pointwise(self, g: Geometry, **branch: Any) -> None:
        """A 1x1 branch on the kxk kernel's centre tap (none for a 1x1 main conv: it would duplicate it)."""
        if not g.pointwise:
            self.add("1x1", Branch("conv", (1, 1), **branch), g.why_not_aligned((1, 1)))

    def identity(self, g: Geometry, **branch: Any) -> None:
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

    def plan(self, geometry: Geometry) -> Plan:
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
