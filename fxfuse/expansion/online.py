"""Online re-parameterization (OREPA, Hu et al., arXiv 2204.00826): train an expanded block as ONE conv.

An offline block (:class:`~fxfuse.expansion.modules.ExpandedConv2d`) runs every branch on the feature map, so a
training step costs what all branches cost. A BatchNorm inside a branch normalizes with batch statistics in
training, which is not a linear map of the block input, so the branches cannot be summed before the data
arrives. :func:`make_online` makes every block linear during training:

* each branch BatchNorm becomes a :class:`ChannelScale` (a learnable per-channel scale; plus a learnable shift
  only where the block has no BatchNorm after it: with one, a per-channel constant is removed by that BN — it
  would get an exactly-zero gradient in training and only move the running mean);
* DBB's BN-and-pad becomes :class:`ScaleAndPad` (scale, pad with the shift, i.e. the value the linear map takes
  at 0, exactly what DBB's border holds);
* the user's BatchNorm (the one the conv had) moves after the sum: the block's one normalization, an ordinary
  ``nn.BatchNorm2d`` that :func:`fxfuse.reparametrize` folds later. The main conv gets a scale too (start 1), so
  every branch has a learnable per-channel weight, as in OREPA. A conv without BatchNorm gets no normalization
  (expand never adds one to a path that had none).

:class:`OnlineConv2d` (a subclass of ``ExpandedConv2d`` with the same module tree) then computes in every forward
the block's equivalent kernel and bias from the branch parameters (:func:`equivalent_conv`, using the fold math of
:mod:`fxfuse.ir.folds`: kernel-sized tensors only) and runs one conv plus that BatchNorm. Gradients reach every
branch parameter through the kernel arithmetic.

The *offline twin* of an online block is the same module with ``online = False``: the same parameters, evaluated
branch by branch on the feature map (``ExpandedConv2d.forward``). The two compute the same function and the same
gradients (tests/test_expand_online.py, float64). Under ``torch.fx`` symbolic tracing (what
:func:`fxfuse.reparametrize` captures) the block traces as its twin, so the collapse is done and verified by the
ordinary rules, independently of :func:`equivalent_conv`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..ir.algebra import ChannelAffine, ConvGeometry, ConvSpec, Refusal
from ..ir.folds import (
    affine_as_conv,
    avg_pool_as_conv,
    compose,
    conv_then_affine,
    identity_as_conv,
    sum_onto,
    sum_parallel,
    why_not_composable,
    why_not_on_one_grid,
)
from ..reasons import Reason
from .modules import BNAndPad, ExpandedConv2d, submodule
from .scheme import Pair, pair


class ChannelScale(nn.Module):
    """A linearized BatchNorm: ``y = scale[c]·x (+ shift[c])`` with learnable ``scale`` (and ``shift``)."""

    def __init__(self, scale: Tensor, shift: Optional[Tensor]) -> None:
        super().__init__()
        self.reads_input = False  # first layer of a branch: traced as a depthwise 1x1 conv (after a conv: x·s + t)
        self.channels = int(scale.numel())
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = None if shift is None else nn.Parameter(shift.detach().clone())

    def affine(self) -> ChannelAffine:
        shift = self.shift if self.shift is not None else torch.zeros_like(self.scale)
        return ChannelAffine(self.scale, shift)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, fx.Proxy) and self.reads_input:  # identity branch: traced as a depthwise 1x1 conv
            return F.conv2d(x, self.scale.reshape(-1, 1, 1, 1), self.shift, groups=self.channels)
        y = x * self.scale.reshape(1, -1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{self.channels}, shift={self.shift is not None}"


class ScaleAndPad(ChannelScale):
    """DBB's BN-and-pad, linearized: ``scale·x + shift`` with a border of ``padding`` holding ``shift`` (the map's
    value at 0; zero without a shift)."""

    def __init__(self, scale: Tensor, shift: Optional[Tensor], padding: Pair) -> None:
        super().__init__(scale, shift)
        self.padding = (int(padding[0]), int(padding[1]))

    def forward(self, x: Tensor) -> Tensor:
        # Pad first, then the affine: DBB's eval spelling of BN-and-pad (``bn(zero_pad(x))``), which the ordinary
        # rules fold (the pad into the 1x1 conv before it, the affine into a conv); traced as a padded depthwise
        # conv instead, the 1x1 → pad → avg-pool chain would not compose.
        ph, pw = self.padding
        y = F.pad(x, (pw, pw, ph, ph)) * self.scale.reshape(1, -1, 1, 1)
        if self.shift is not None:
            y = y + self.shift.reshape(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding={self.padding}"


class OnlineConv2d(ExpandedConv2d):
    """An expanded block trained as one conv: ``post(conv(x; W_eq, b_eq))`` with ``(W_eq, b_eq) =``
    :func:`equivalent_conv` of the branch parameters, recomputed in every forward. ``online = False`` gives the
    offline twin (``post(main(x) + Σ branches(x))``, same parameters).

    ``merge = "auto"`` (the default): a branch of two convs (DBB's 1x1 → kxk) whose kernel composition costs more
    multiply-adds than running it on this forward's feature map (wide layers on small maps:
    ``C_out·C_mid·C_in·k²`` against ``N·H·W·(C_mid·C_in + C_out·C_mid·k²)``) runs on the map beside the one conv
    instead; the sum is the same linear map either way. ``merge = "all"``: every branch in the kernel."""

    online: bool = True
    merge: str = "auto"

    def equivalent_conv(self, on_map: Sequence[str] = ()) -> Tuple[Tensor, Tensor]:
        """The block's kernel and bias before ``post``, without the branches named in ``on_map``
        (differentiable in every branch parameter)."""
        return equivalent_conv(self, on_map)

    def map_branches(self, x: Tensor) -> List[str]:
        """The branches this forward runs on the feature map (``merge = "auto"``), by multiply-add count."""
        if self.merge == "all":
            return []
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_pixels = n * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        chosen = []
        for name, branch in self.branches.items():
            convs = [m for m in branch.children() if isinstance(m, nn.Conv2d)] if isinstance(branch, nn.Sequential) \
                else []
            if len(convs) != 2:
                continue
            first, second = convs
            compose = second.weight.numel() * first.weight.shape[1]
            run = n * h * w * first.weight.numel() + out_pixels * second.weight.numel()
            if compose > run:
                chosen.append(name)
        return chosen

    def forward(self, x: Tensor) -> Tensor:
        if not self.online or isinstance(x, fx.Proxy):
            return super().forward(x)  # the twin; traced, the rules collapse it independently
        on_map = self.map_branches(x)
        weight, bias = self.equivalent_conv(on_map)
        out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        for name in on_map:
            out = out + self.branches[name](x)
        if self.post is not None:
            out = self.post(out)
        return out

    def extra_repr(self) -> str:
        return f"online={self.online}, merge={self.merge!r}, " + super().extra_repr()


# ------------------------------------------------------------------------------------- kernel arithmetic
def _conv_spec(conv: nn.Conv2d) -> ConvSpec:
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    geometry = ConvGeometry.of(conv)  # (expand only takes a symmetric padding="same")
    return ConvSpec(conv.weight, bias, geometry.stride, geometry.padding, geometry.dilation, conv.groups)


def _then(spec: Optional[ConvSpec], nxt: ConvSpec) -> ConvSpec:
    return nxt if spec is None else compose(spec, nxt)


def _branch_spec(branch: nn.Module, channels: int, like: Tensor) -> Tuple[Optional[ConvSpec], Optional[Refusal]]:
    """One branch (``nn.Identity`` or an ``nn.Sequential`` of convs, scales, scale-and-pads, average pools) as a
    conv spec, or why it is not linear."""
    if isinstance(branch, nn.Identity):
        return identity_as_conv(channels, 2, like.dtype, like.device), None
    spec: Optional[ConvSpec] = None
    for layer in branch.children() if isinstance(branch, nn.Sequential) else [branch]:
        if isinstance(layer, ScaleAndPad):
            if spec is None or not spec.is_pointwise:
                return None, Refusal(Reason.NOT_LINEAR, "a scale-and-pad after a non-pointwise map")
            # the padded border holds the shift = the value of (1x1 conv, scale, shift) at 0: padding the 1x1
            spec = conv_then_affine(spec, layer.affine()).with_(padding=layer.padding)
        elif isinstance(layer, ChannelScale):
            spec = (affine_as_conv(layer.affine(), 2) if spec is None else conv_then_affine(spec, layer.affine()))
        elif isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
            nxt = _conv_spec(layer)
            if spec is not None:
                refusal = why_not_composable(spec, nxt)
                if refusal is not None:
                    return None, refusal
            spec = _then(spec, nxt)
        elif isinstance(layer, nn.AvgPool2d) and _pool_is_linear(layer) and spec is not None:
            k, s, p = (pair(v) for v in (layer.kernel_size, layer.stride, layer.padding))
            pool = avg_pool_as_conv(spec.out_channels, k, s, p, like.dtype, like.device)
            refusal = why_not_composable(spec, pool)
            if refusal is not None:
                return None, refusal
            spec = _then(spec, pool)
        else:
            return None, Refusal(Reason.NOT_LINEAR, f"{type(layer).__name__} is not a linear layer expand knows")
    if spec is None:
        return None, Refusal(Reason.NOT_LINEAR, "an empty branch")
    return spec, None


def _pool_is_linear(pool: nn.AvgPool2d) -> bool:
    return pool.count_include_pad and not pool.ceil_mode and pool.divisor_override is None


def branch_specs(block: ExpandedConv2d, skip: Sequence[str] = ()) -> Tuple[List[ConvSpec], Optional[str]]:
    """Every branch of ``block`` (main first) but those named in ``skip`` as a conv spec, or ``([], why not)``."""
    like = submodule(block.main, "conv", nn.Conv2d).weight
    specs: List[ConvSpec] = []
    for name, branch in [("main", block.main), *block.branches.items()]:
        if name in skip:
            continue
        spec, refusal = _branch_spec(branch, block.in_channels, like)
        if refusal is not None or spec is None:
            return [], f"branch {name}: {refusal.reason if refusal else 'not linear'}"
        specs.append(spec)
    refusal = why_not_on_one_grid(specs)
    if refusal is not None:
        return [], refusal.reason
    return specs, None


def equivalent_conv(block: ExpandedConv2d, skip: Sequence[str] = ()) -> Tuple[Tensor, Tensor]:
    """The kernel and bias of ``main(x) + Σ branches(x)`` (without the branches named in ``skip``) for a block
    whose branches are linear (after :func:`make_online`), on the main conv's geometry; computed outside autocast
    in the parameters' dtype."""
    device_type = submodule(block.main, "conv", nn.Conv2d).weight.device.type
    with torch.autocast(device_type, enabled=False):
        specs, why = branch_specs(block, skip)
        if why is not None:
            raise ValueError(f"block is not linear: {why}")
        merged = sum_onto(specs[0], specs[1:]) or sum_parallel(specs)  # one kernel-sized tensor per step
    return merged.weight, merged.bias


# ----------------------------------------------------------------------------------------- conversion
def make_online(block: ExpandedConv2d) -> Tuple[Optional[OnlineConv2d], Tuple[str, ...], Optional[str]]:
    """The online form of a freshly built offline block: ``(block, notes on what was linearized, None)``, or
    ``(None, (), why not)``. Each branch BatchNorm becomes a :class:`ChannelScale` / :class:`ScaleAndPad` holding
    its eval affine (``a = γ/√(σ²+ε)``, ``c = β − a·μ``: ``γ`` and ``β`` up to ``1/√(1+ε)`` for a fresh BN; exactly 0
    for a zero-γ one, so ``init="preserve"`` still gives the original function); the main branch's BN (the user's)
    becomes the normalization after the block (QARepVGG: the user's BN is already there and the main branch's new
    BN becomes a scale of exactly 1). This is a new parameterization, not the offline block's function: the
    block's BN now normalizes the sum."""
    notes: List[str] = []
    main = OrderedDict(block.main.named_children())
    post = block.post
    if post is None and "bn" in main:  # the user's BN moves after the block
        post = main.pop("bn")
        notes.append("user's BatchNorm moved after the block (its one normalization)")
    elif post is not None:
        notes.append("BatchNorm after the block kept")
    keep_shift = post is None
    if post is None:
        notes.append("no BatchNorm after the block (the conv had none; expand adds none)")
    linearized: List[str] = []

    def lin(bn: nn.Module, name: str) -> nn.Module:
        if isinstance(bn, BNAndPad):
            a, c = _affine_of(bn.bn)
            linearized.append(name)
            return ScaleAndPad(a, c if keep_shift else None, bn.padding)
        if isinstance(bn, nn.BatchNorm2d):
            a, c = _affine_of(bn)
            linearized.append(name)
            return ChannelScale(a, c if keep_shift else None)
        return bn

    if post is not None:
        if "bn" in main:
            main["bn"] = lin(main["bn"], "main.bn")
        else:
            conv = submodule(block.main, "conv", nn.Conv2d)
            main["bn"] = ChannelScale(torch.ones_like(conv.weight[:, 0, 0, 0]).detach(), None)
            notes.append("main conv got a per-channel scale (start 1)")
    branches: OrderedDict[str, nn.Module] = OrderedDict()
    for key, branch in block.branches.items():
        if isinstance(branch, nn.Sequential):
            seq = nn.Sequential(OrderedDict((n, lin(m, f"{key}.{n}")) for n, m in branch.named_children()))
            branches[key] = seq
            first = seq[0]
            if isinstance(first, ChannelScale):
                first.reads_input = True
        else:
            branches[key] = branch
    geometry = _geometry_of(block)
    online = OnlineConv2d(nn.Sequential(main), branches, post, geometry, block.scheme)
    with torch.no_grad():
        specs, why = branch_specs(online)
    if why is not None:
        return None, (), why
    merged = sum_parallel(specs)
    expected = (block.out_channels, block.in_channels // block.groups, *block.kernel_size)
    if tuple(merged.weight.shape) != expected or merged.groups != block.groups:
        return None, (), (f"the branches sum to a {tuple(merged.weight.shape)} kernel with groups {merged.groups}, "
                          f"not the main conv's {expected} with groups {block.groups}")
    notes.append("kernel per step: " + ", ".join(f"{k} ({_kernel_kind(b)})" for k, b in online.branches.items()))
    if linearized:
        notes.insert(0, "BatchNorm → per-channel " + ("scale + shift" if keep_shift else "scale") + ": "
                     + ", ".join(linearized))
    return online.train(block.training), tuple(notes), None


def _kernel_kind(branch: nn.Module) -> str:
    layers = list(branch.children()) if isinstance(branch, nn.Sequential) else [branch]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    if not convs:
        return "Dirac kernel"
    if any(isinstance(m, nn.AvgPool2d) for m in layers):
        return "1x1 times the pool's constant depthwise kernel"
    if len(convs) == 2:
        return "1x1 composed into the kxk, or run on the feature map where that costs fewer multiply-adds"
    return "zero-padded onto the main kernel's taps"


def _affine_of(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval affine of a BN: ``a = γ/√(σ²+ε)``, ``c = β − a·μ`` (a zero-γ BN gives ``a = c = 0`` exactly)."""
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        w = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
        b = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        a = w * torch.rsqrt(bn.running_var + bn.eps)
        return a, b - a * bn.running_mean


def _geometry_of(block: ExpandedConv2d) -> ConvGeometry:
    conv = submodule(block.main, "conv", nn.Conv2d)
    return ConvGeometry(block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding,
                        block.dilation, block.groups, conv.bias is not None)
