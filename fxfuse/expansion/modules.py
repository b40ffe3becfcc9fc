"""Trainable expanded blocks: the user's conv (and its BatchNorm) as the main branch, plus a scheme's branches.

``ExpandedConv2d(x) = post(main(x) + Σ_i branch_i(x))`` where ``main`` is the user's ``nn.Conv2d`` (and its
``BatchNorm2d``, if one followed it) and every branch reads ``x``. Every branch is built on the main conv's tap
grid (same stride, dilation and groups; centre-aligned padding), so in eval mode the block is one conv of the main
geometry — what :func:`fxfuse.reparametrize` collapses it to (docs/patterns.md).

Initialisation (:func:`initialize`, docs/expand.md):

* ``"preserve"``: each new branch ends in a zero: its BatchNorm's ``γ = β = 0`` (zero-γ, as for residual
  branches), or, without a BN, its last conv's weight ``= 0``. A BN-free identity (QARepVGG) is cancelled by
  a BN-free conv branch that starts at ``-I`` (exact in any dtype: its entries are 0 and ±1).
  The block then equals the original conv(-BN) exactly, in train and eval mode (QARepVGG: in eval mode).
* ``"paper"``: the papers' initialisation for the new branches (PyTorch's default conv init, BN ``γ = 1``,
  ``β = 0``; DBB's identity 1x1 in front of the kxk and, for a depthwise conv, the average pool).
Either way the main branch keeps the user's parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ir.algebra import ConvGeometry
from .scheme import Branch, Pair, Plan, pair

INITS = ("preserve", "paper")


class BNAndPad(nn.Module):
    """DBB's "BN, then pad with BN(0)": a BatchNorm whose output border of ``padding`` holds ``BN(0)``.

    Train mode (as DBB): BN with batch statistics on the unpadded input; the border value comes from the running
    statistics (detached). Eval mode: ``bn(zero_pad(x))``, which equals it exactly because eval BN is a
    per-channel affine map (and is the spelling :func:`fxfuse.reparametrize` folds)."""

    def __init__(self, num_features: int, padding: Pair, *, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.padding = (int(padding[0]), int(padding[1]))
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def _pad(self) -> Tuple[int, int, int, int]:
        ph, pw = self.padding
        return (pw, pw, ph, ph)  # F.pad: last axis first

    def forward(self, x: Tensor) -> Tensor:
        if not any(self.padding):
            return self.bn(x)
        if not self.training:
            return self.bn(F.pad(x, self._pad()))
        y = self.bn(x)
        bn = self.bn
        with torch.no_grad():
            assert bn.running_mean is not None and bn.running_var is not None  # a stock BatchNorm2d's buffers
            border = -bn.running_mean * torch.rsqrt(bn.running_var + bn.eps)  # BN(0) from the running stats
            if bn.affine:
                border = border * bn.weight + bn.bias
        border = border.to(y.dtype).reshape(1, -1, 1, 1)
        return F.pad(y - border, self._pad()) + border

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


class ExpandedConv2d(nn.Module):
    """``post(main(x) + Σ branches(x))``; ``main`` is the user's conv (+ BN). Geometry attributes
    (``in_channels`` … ``groups``) are the main conv's, i.e. those of the conv it collapses to."""

    def __init__(self, main: nn.Sequential, branches: OrderedDict[str, nn.Module], post: Optional[nn.Module],
                 geometry: ConvGeometry, scheme: str) -> None:
        super().__init__()
        self.main = main
        self.branches = nn.ModuleDict(branches)
        self.post = post
        self.scheme = scheme
        self.in_channels, self.out_channels = geometry.in_channels, geometry.out_channels
        self.kernel_size, self.stride = geometry.kernel_size, geometry.stride
        self.padding, self.dilation, self.groups = geometry.padding, geometry.dilation, geometry.groups

    def forward(self, x: Tensor) -> Tensor:
        out = self.main(x)
        for branch in self.branches.values():
            out = out + branch(x)
        if self.post is not None:
            out = self.post(out)
        return out

    def extra_repr(self) -> str:
        return (f"scheme={self.scheme!r}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


# ------------------------------------------------------------------------------------------- building
_M = TypeVar("_M", bound=nn.Module)


def submodule(parent: nn.Module, name: str, cls: Type[_M]) -> _M:
    """``parent.<name>``, a ``cls`` (the block builder made it one: a ``TypeError`` says otherwise). Plain
    attribute access: online blocks call it in every forward (also under ``torch.compile``)."""
    mod = getattr(parent, name)
    if not isinstance(mod, cls):
        raise TypeError(f"{name}: expected a {cls.__name__}, found a {type(mod).__name__}")
    return mod


def _default_name(branch: Branch, g: ConvGeometry) -> str:
    if branch.kind == "conv":
        k = branch.kernel or g.kernel_size
        return f"conv{k[0]}x{k[1]}"
    return {"identity": "identity", "1x1_kxk": "conv1x1_kxk", "1x1_avg": "conv1x1_avg"}[branch.kind]


def internal_channels(branch: Branch, g: ConvGeometry) -> int:
    """Width of a ``1x1_kxk`` chain: as DBB, ``in_channels``, or twice that for a depthwise conv."""
    if branch.internal_channels is not None:
        return branch.internal_channels
    return g.in_channels if g.groups < g.out_channels else 2 * g.in_channels


class _Factory:
    """Builds a branch's layers on the main conv's device and dtype, BNs with the user's BN eps / momentum."""

    def __init__(self, like: Tensor, bn: Optional[nn.BatchNorm2d]) -> None:
        self.kw: Dict[str, Any] = {"device": like.device, "dtype": like.dtype}
        self.eps = bn.eps if bn is not None else 1e-5
        self.momentum = bn.momentum if bn is not None else 0.1

    def bn(self, channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum, **self.kw)

    def bn_pad(self, channels: int, padding: Sequence[int]) -> BNAndPad:
        return BNAndPad(channels, pair(padding), eps=self.eps, momentum=self.momentum, **self.kw)

    def conv(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1),
             padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1) -> nn.Conv2d:
        k = pair(kernel)
        d = (dilation[0] if k[0] > 1 else 1, dilation[1] if k[1] > 1 else 1)
        return nn.Conv2d(cin, cout, k, pair(stride), pair(padding), d, groups, bias=False, **self.kw)


def _branch_module(branch: Branch, g: ConvGeometry, make: _Factory, scheme: str) -> nn.Module:
    layers: List[Tuple[str, nn.Module]] = []
    if branch.kind == "conv":
        kernel = branch.kernel or g.kernel_size
        padding = g.aligned_padding(kernel)
        if padding is None:
            raise ValueError(f"scheme {scheme!r}: {g.why_not_aligned(kernel)}")
        layers.append(("conv", make.conv(g.in_channels, g.out_channels, kernel, g.stride, padding, g.dilation,
                                         g.groups)))
    elif branch.kind == "identity":
        reason = g.why_no_identity()
        if reason is not None:
            raise ValueError(f"scheme {scheme!r}: no identity branch possible: {reason}")
        if not branch.bn:
            return nn.Identity()
    elif branch.kind == "1x1_kxk":
        width = internal_channels(branch, g)
        if width % g.groups:
            raise ValueError(f"scheme {scheme!r}: internal_channels {width} not divisible by groups {g.groups}")
        layers += [("conv1", make.conv(g.in_channels, width, (1, 1), groups=g.groups)),
                   ("bn1", make.bn_pad(width, g.padding)),
                   ("conv2", make.conv(width, g.out_channels, g.kernel_size, g.stride, (0, 0), g.dilation,
                                       g.groups))]
    else:  # "1x1_avg"
        if not g.avg_pool_fits:
            raise ValueError(f"scheme {scheme!r}: an average pool has no dilation (conv dilation {g.dilation})")
        layers += [("conv", make.conv(g.in_channels, g.out_channels, (1, 1), groups=g.groups)),
                   ("bn", make.bn_pad(g.out_channels, g.padding)),
                   ("avg", nn.AvgPool2d(pair(g.kernel_size), pair(g.stride), 0))]
    if branch.bn:
        name = {"conv": "bn", "identity": "bn", "1x1_kxk": "bn2", "1x1_avg": "avgbn"}[branch.kind]
        layers.append((name, make.bn(g.out_channels)))
    return nn.Sequential(OrderedDict(layers))


def build_block(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], plan: Plan, g: ConvGeometry, init: str,
                scheme: str) -> ExpandedConv2d:
    """The expanded block for ``conv`` (and the ``bn`` after it), initialised by :func:`initialize`."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    make = _Factory(conv.weight, bn)
    main: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
    post: Optional[nn.Module] = None
    new_main_bn = False
    if bn is not None:
        if plan.post_bn:
            main["bn"], post, new_main_bn = make.bn(g.out_channels), bn, True
        else:
            main["bn"] = bn
    branches: OrderedDict[str, nn.Module] = OrderedDict()
    for branch in plan.branches:
        name, i = branch.name or _default_name(branch, g), 2
        key = name
        while key in branches:
            key, i = f"{name}_{i}", i + 1
        branches[key] = _branch_module(branch, g, make, scheme)
    block = ExpandedConv2d(nn.Sequential(main), branches, post, g, scheme)
    initialize(block, plan, g, init, new_main_bn)
    return block.train(conv.training)


# ----------------------------------------------------------------------------------------- initialising
def _dirac(weight: Tensor, groups: int, sign: float = 1.0) -> None:
    """Add ``sign·I`` (per group: ``W[o, o mod C_in/g, centre] += sign``) to a kernel whose centre is a tap."""
    eye = torch.zeros_like(weight)
    nn.init.dirac_(eye, groups)
    weight.add_(eye, alpha=sign)


def _eval_identity_(bn: nn.BatchNorm2d) -> None:
    """Make an eval-mode BN exactly the identity in its own dtype and in float64: ``μ = 0, γ = 1, β = 0`` and
    ``σ² = v``, the largest value of the BN's dtype ≤ ``1 - eps``, with ``eps`` nudged to ``1 - v`` (exact, so
    ``σ² + eps = 1`` with no rounding)."""
    assert bn.running_mean is not None and bn.running_var is not None  # a stock BatchNorm2d's buffers
    v = torch.tensor(1.0 - bn.eps, dtype=torch.float64).to(bn.running_var.dtype)
    if float(v) > 1.0 - bn.eps:
        v = torch.nextafter(v, torch.zeros_like(v))
    bn.running_mean.zero_()
    bn.running_var.fill_(float(v))
    bn.eps = 1.0 - float(v)
    if bn.affine:
        bn.weight.fill_(1.0)
        bn.bias.zero_()


@torch.no_grad()
def initialize(block: ExpandedConv2d, plan: Plan, g: ConvGeometry, init: str, new_main_bn: bool) -> None:
    """Initialise the new parts of ``block`` (module docstring); the user's conv and BN are left as they are,
    except that a BN-free identity is subtracted from the main kernel when nothing else can cancel it."""
    keys = list(block.branches)
    for key, branch in zip(keys, plan.branches):
        mod = block.branches[key]
        if branch.kind == "1x1_kxk" and internal_channels(branch, g) == g.in_channels:
            conv1 = submodule(mod, "conv1", nn.Conv2d)
            conv1.weight.zero_()
            _dirac(conv1.weight, g.groups)  # DBB's identity-based 1x1
        if branch.kind == "1x1_avg" and g.depthwise and g.in_channels == g.out_channels:
            conv = submodule(mod, "conv", nn.Conv2d)
            conv.weight.zero_()
            _dirac(conv.weight, g.groups)  # DBB's depthwise average branch is the pool alone
    if new_main_bn and init == "preserve":
        _eval_identity_(submodule(block.main, "bn", nn.BatchNorm2d))
    if init == "paper":
        return
    identities = 0
    for key, branch in zip(keys, plan.branches):
        mod = block.branches[key]
        if branch.bn:
            last = list(mod.children())[-1]
            assert isinstance(last, nn.BatchNorm2d), "a branch with bn=True ends in its BatchNorm2d"
            last.weight.zero_()
            last.bias.zero_()
        elif branch.kind == "identity":
            identities += 1
        else:
            name = {"conv": "conv", "1x1_kxk": "conv2", "1x1_avg": "conv"}[branch.kind]
            submodule(mod, name, nn.Conv2d).weight.zero_()
    if not identities:
        return
    cancel = next((block.branches[k] for k, b in zip(keys, plan.branches) if b.kind == "conv" and not b.bn), None)
    if cancel is None:
        raise ValueError(f"scheme {block.scheme!r}: init='preserve' needs a BN-free conv branch to cancel a BN-free "
                         "identity branch (it starts at -I); give the identity a BN or add such a branch")
    _dirac(submodule(cancel, "conv", nn.Conv2d).weight, g.groups, -identities)
