"""Fold math: small pure tensor functions on :class:`ConvSpec` / :class:`ChannelAffine`.

No graph code lives here. Every function assumes its exactness condition holds; the ``why_not_*``
functions state those conditions and return a :class:`Refusal` (code and sentence) when one fails (``None``
when exact).
All arithmetic is done in the dtype of the inputs (the pass feeds float64).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import grad as nn_grad

from ..reasons import Reason
from .algebra import ChannelAffine, ConvSpec, Refusal


# --------------------------------------------------------------------------------------------- helpers
def _bcast(v: Tensor, ndim: int) -> Tensor:
    """``[C] -> [C, 1, ..., 1]`` so that it scales axis 0 of a tensor with ``ndim`` dims."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def input_channel_index(out_channels: int, in_per_group: int, groups: int, device=None) -> Tensor:
    """``idx[o, j]``: the global input channel that weight entry ``W[o, j]`` of a grouped conv reads.

    Output ``o`` belongs to group ``o // (C_out/g)``, whose inputs start at ``group · C_in/g``."""
    group = torch.arange(out_channels, device=device) // (out_channels // groups)
    return group[:, None] * in_per_group + torch.arange(in_per_group, device=device)[None, :]


def _on(affine: ChannelAffine, like: Tensor) -> ChannelAffine:
    """The affine's tensors on ``like``'s device and dtype."""
    return ChannelAffine(affine.scale.to(like), affine.shift.to(like))


# ------------------------------------------------------------------------------------------ BatchNorm
def batchnorm_as_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> ChannelAffine:
    """Eval BatchNorm: ``a = γ / sqrt(σ² + ε)``, ``c = β − a·μ`` (γ = 1, β = 0 when not affine)."""
    inv_std = torch.rsqrt(running_var + eps)
    scale = inv_std if weight is None else weight * inv_std
    shift = -scale * running_mean
    if bias is not None:
        shift = shift + bias
    return ChannelAffine(scale, shift)


# ---------------------------------------------------------------------- affine after / before a layer
def conv_then_affine(spec: ConvSpec, affine: ChannelAffine) -> ConvSpec:
    """``affine ∘ conv``: ``W' = a[o]·W[o]``, ``b' = a·b + c``.

    For a transposed conv the output channel of ``W[i, j]`` is ``group(i)·C_out/g + j``
    (docs/patterns.md, `conv_bn`)."""
    w = spec.weight
    affine = _on(affine, w)
    if spec.transposed:
        c_in, out_per_group = w.shape[0], w.shape[1]
        out_idx = input_channel_index(c_in, out_per_group, spec.groups, w.device)
        scale = affine.scale[out_idx].reshape(c_in, out_per_group, *([1] * spec.ndim))
        new_w = w * scale
    else:
        new_w = w * _bcast(affine.scale, w.dim())
    return spec.with_(weight=new_w, bias=affine.scale * spec.bias + affine.shift)


def affine_then_affine(inner: ChannelAffine, outer: ChannelAffine) -> ChannelAffine:
    """``outer ∘ inner`` per channel: ``a = a₂·a₁``, ``c = a₂·c₁ + c₂`` (a BN followed by a layer scale)."""
    outer = _on(outer, inner.scale)
    return ChannelAffine(outer.scale * inner.scale, outer.scale * inner.shift + outer.shift)


def linear_then_affine(weight: Tensor, bias: Tensor, affine: ChannelAffine) -> tuple[Tensor, Tensor]:
    """``affine ∘ linear``: ``W' = a[:, None]·W``, ``b' = a·b + c``."""
    affine = _on(affine, weight)
    return weight * affine.scale[:, None], affine.scale * bias + affine.shift


def affine_then_conv(affine: ChannelAffine, spec: ConvSpec) -> ConvSpec:
    """``conv ∘ affine``: ``W'[o, j] = W[o, j]·a[in(o, j)]``, ``b' = b + Σ_{j,taps} W[o, j]·c[in(o, j)]``.

    Exact only when no zero padding is read (see :func:`why_not_affine_then_conv`)."""
    w = spec.weight
    affine = _on(affine, w)
    idx = input_channel_index(w.shape[0], w.shape[1], spec.groups, w.device)
    kernel_ones = [1] * spec.ndim
    new_w = w * affine.scale[idx].reshape(*idx.shape, *kernel_ones)
    taps_sum = w.sum(dim=tuple(range(2, w.dim())))
    new_b = spec.bias + (taps_sum * affine.shift[idx]).sum(dim=1)
    return spec.with_(weight=new_w, bias=new_b)


def why_not_affine_then_conv(affine: ChannelAffine, spec: ConvSpec) -> Optional[Refusal]:
    """A per-channel affine before a conv folds exactly if the conv reads no zero padding, or if the shift is 0
    (zero padding of ``a·x`` equals ``a·`` zero padding of ``x``). A reflect / replicate / circular
    ``padding_mode`` copies values within a channel, so it commutes with the affine: exact for any shift."""
    if spec.transposed:
        return Refusal(Reason.NOT_LINEAR, "affine before a transposed conv is not folded (border outputs miss taps)")
    if spec.padding_mode != "zeros":
        return None
    if any(spec.padding) and bool((affine.shift != 0).any()):
        return Refusal(Reason.PADDING,
                       "conv has zero padding but the affine before it has a nonzero shift (borders would change)")
    return None


def affine_then_linear(affine: ChannelAffine, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``linear ∘ affine``: ``W' = W·a[None, :]``, ``b' = b + W @ c``."""
    affine = _on(affine, weight)
    return weight * affine.scale[None, :], bias + weight @ affine.shift


# ------------------------------------------------------------------------- ops expressed as a conv
def affine_as_conv(affine: ChannelAffine, ndim: int) -> ConvSpec:
    """Per-channel affine as a depthwise 1x1 conv (groups = C)."""
    c = affine.channels
    weight = affine.scale.reshape(c, 1, *([1] * ndim))
    return ConvSpec(weight, affine.shift.clone(), (1,) * ndim, (0,) * ndim, (1,) * ndim, c)


def identity_as_conv(channels: int, ndim: int, dtype: torch.dtype = torch.float64, device=None) -> ConvSpec:
    """Identity as a depthwise Dirac kernel; after :func:`regroup` to g groups it becomes
    ``W[o, o mod (C/g), centre] = 1`` (docs/patterns.md, `branch_sum`)."""
    ones = torch.ones(channels, dtype=dtype, device=device)
    return affine_as_conv(ChannelAffine(ones, torch.zeros_like(ones)), ndim)


def avg_pool_as_conv(channels: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dtype: torch.dtype = torch.float64, device=None) -> ConvSpec:
    """AvgPool with ``count_include_pad=True``, ``ceil_mode=False`` as a depthwise conv of ``1/prod(k)``."""
    ndim = len(kernel)
    weight = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=dtype, device=device)
    return ConvSpec(weight, weight.new_zeros(channels), tuple(stride), tuple(padding), (1,) * ndim,
                    channels)


def scale_conv(spec: ConvSpec, coefficient: float) -> ConvSpec:
    """``coefficient · conv``."""
    if coefficient == 1:
        return spec
    return spec.with_(weight=spec.weight * coefficient, bias=spec.bias * coefficient)


def regroup(spec: ConvSpec, groups: int) -> ConvSpec:
    """The same conv written with fewer groups (``groups`` divides ``spec.groups``): block-diagonal expansion,
    ``W'[o, (g(o) mod r)·C_in/g + j] = W[o, j]`` with ``r = spec.groups / groups``."""
    if groups == spec.groups:
        return spec
    if spec.groups % groups:
        raise ValueError(f"cannot regroup a groups={spec.groups} conv to groups={groups}")
    w = spec.weight
    c_out, in_pg = w.shape[0], w.shape[1]
    ratio = spec.groups // groups
    rows = torch.arange(c_out, device=w.device)
    group = rows // (c_out // spec.groups)
    cols = (group % ratio)[:, None] * in_pg + torch.arange(in_pg, device=w.device)[None, :]
    new_w = w.new_zeros(c_out, in_pg * ratio, *w.shape[2:])
    new_w[rows[:, None], cols] = w
    return spec.with_(weight=new_w, groups=groups)


# ------------------------------------------------------------------------------ parallel branches
def why_not_on_one_grid(specs: Sequence[ConvSpec]) -> Optional[Refusal]:
    """Branches reading one input can share a kernel iff they have equal stride and equal window centre
    (``2·(-p) + d·(k-1)`` per axis, which makes output sizes equal for every input size), zero padding,
    and are not transposed (docs/patterns.md, `branch_sum`)."""
    first = specs[0]
    for s in specs:
        if s.transposed:
            return Refusal(Reason.NOT_LINEAR, "transposed conv branch")
        if s.padding_mode != "zeros":
            return Refusal(Reason.PADDING, f"padding_mode={s.padding_mode!r} branch")
        if s.stride != first.stride:
            return Refusal(Reason.TAP_GRID, f"stride mismatch {first.stride} vs {s.stride}")
        if s.centre() != first.centre():
            return Refusal(Reason.TAP_GRID, f"taps do not align: kernel {first.kernel_size}/padding {first.padding}"
                           f"/dilation {first.dilation} vs kernel {s.kernel_size}/padding {s.padding}/dilation "
                           f"{s.dilation}")
    return None


def _grid(specs: Sequence[ConvSpec]) -> tuple[list[int], list[int], list[int]]:
    """Per axis: merged padding ``P``, dilation ``D`` (gcd of all tap-offset differences), kernel ``K``."""
    padding, dilation, kernel = [], [], []
    for axis in range(specs[0].ndim):
        offsets = [-s.padding[axis] + j * s.dilation[axis] for s in specs for j in range(s.kernel_size[axis])]
        left = min(offsets)
        d = 0
        for o in offsets:
            d = math.gcd(d, o - left)
        d = d or 1
        padding.append(-left)
        dilation.append(d)
        kernel.append((max(offsets) - left) // d + 1)
    return padding, dilation, kernel


def place_on_grid(spec: ConvSpec, padding: Sequence[int], dilation: Sequence[int], kernel: Sequence[int]) -> Tensor:
    """Zero-embed ``spec.weight`` into a ``kernel``-sized weight with the given ``padding``/``dilation``:
    branch tap ``j`` (offset ``-p + j·d``) lands at index ``(P - p + j·d) / D``."""
    w = spec.weight
    out = w.new_zeros(*w.shape[:2], *kernel)
    out[_taps_on_grid(spec, padding, dilation)] = w
    return out


def _taps_on_grid(spec: ConvSpec, padding: Sequence[int], dilation: Sequence[int]) -> tuple:
    """The index of ``spec``'s taps in a kernel on the grid ``padding`` / ``dilation``: branch tap ``j`` (offset
    ``-p + j·d``) at ``(P - p + j·d) / D``, per spatial axis (all output and input channels)."""
    index: List[Any] = [slice(None), slice(None)]
    for axis in range(spec.ndim):
        start = (padding[axis] - spec.padding[axis]) // dilation[axis]
        step = max(spec.dilation[axis] // dilation[axis], 1)
        index.append(slice(start, start + (spec.kernel_size[axis] - 1) * step + 1, step))
    return tuple(index)


def why_not_uncrop(spec: ConvSpec, cuts: Sequence[tuple[int, int]]) -> Optional[Refusal]:
    """A conv on ``x`` cropped by ``(a, b)`` per spatial axis equals a conv on ``x`` whose kernel is zero-extended
    by ``a`` taps before and ``b`` after, iff the conv reads no zero padding on a cropped axis (the crop border is
    real data, not zeros) and the cuts are multiples of the dilation."""
    if spec.transposed:
        return Refusal(Reason.NOT_LINEAR, "transposed conv after a crop")
    for axis, (a, b) in enumerate(cuts):
        if (a or b) and spec.padding[axis]:
            return Refusal(Reason.PADDING,
                           f"the conv zero-pads axis {axis + 2}, which the crop cut (the border would change)")
        if a % spec.dilation[axis] or b % spec.dilation[axis]:
            return Refusal(Reason.TAP_GRID,
                           f"crop {a, b} on axis {axis + 2} is not a multiple of the dilation {spec.dilation[axis]}")
    return None


def uncrop(spec: ConvSpec, cuts: Sequence[tuple[int, int]]) -> ConvSpec:
    """``conv(x[..., a:-b])`` as ``conv'(x)``: ``W'`` is ``W`` with ``a/d`` zero taps before and ``b/d`` after on
    each axis. Output sizes agree: ``(L - a - b - d(k-1) - 1)/s + 1`` both ways. Requires :func:`why_not_uncrop`."""
    w = spec.weight
    pads: list[int] = []
    for axis in reversed(range(spec.ndim)):  # F.pad lists the last axis first
        a, b = cuts[axis]
        pads += [a // spec.dilation[axis], b // spec.dilation[axis]]
    return spec.with_(weight=torch.nn.functional.pad(w, pads))


def sum_parallel(specs: Sequence[ConvSpec]) -> ConvSpec:
    """Σ branches reading the same input → one conv: regroup to ``gcd(groups)``, place every kernel on one tap
    grid, add weights and biases. Requires :func:`why_not_on_one_grid` to be ``None``."""
    groups = 0
    for s in specs:
        groups = math.gcd(groups, s.groups)
    specs = [regroup(s, groups) for s in specs]
    padding, dilation, kernel = _grid(specs)
    weight, bias = place_on_grid(specs[0], padding, dilation, kernel), specs[0].bias
    for s in specs[1:]:  # one running sum, not a stack of every branch's kernel (online mode runs this per step)
        weight, bias = weight + place_on_grid(s, padding, dilation, kernel), bias + s.bias
    return ConvSpec(weight, bias, specs[0].stride, tuple(padding), tuple(dilation), groups)


def sum_onto(base: ConvSpec, others: Sequence[ConvSpec]) -> Optional[ConvSpec]:
    """:func:`sum_parallel` of ``[base, *others]`` when ``base``'s kernel is the merged grid (every other branch's
    taps are taps of ``base``'s, with equal stride and window centre) and every other branch's groups are a multiple
    of ``base``'s: ``base``'s kernel is copied once and each branch is added into its slice of it (a branch with
    more groups on its block diagonal). One kernel-sized tensor, however many branches; online
    re-parameterization (fxfuse.expand.online) runs it in every training step. ``None`` where the conditions do
    not hold (then :func:`sum_parallel` is the general case)."""
    specs = [base, *others]
    if why_not_on_one_grid(specs) is not None or any(s.groups % base.groups for s in others):
        return None
    padding, dilation, kernel = _grid(specs)
    if tuple(kernel) != tuple(base.kernel_size) or tuple(padding) != tuple(base.padding) \
            or tuple(dilation) != tuple(base.dilation):
        return None
    weight = base.weight.clone()
    bias = base.bias
    c_out = weight.shape[0]
    for s in others:
        window = weight[_taps_on_grid(s, padding, dilation)]
        if s.groups == base.groups:
            window += s.weight
        else:  # W[o, (g(o) mod r)·C_in/g_s + j] += W_s[o, j] with r = g_s / g (regroup, without the zeros)
            ratio, s_in = s.groups // base.groups, s.weight.shape[1]
            rows = torch.arange(c_out, device=weight.device)
            group = rows // (c_out // s.groups)
            cols = (group % ratio)[:, None] * s_in + torch.arange(s_in, device=weight.device)[None, :]
            window[rows[:, None], cols] += s.weight
        bias = bias + s.bias
    return ConvSpec(weight, bias, base.stride, base.padding, base.dilation, base.groups)


def stack_parallel(specs: Sequence[ConvSpec]) -> ConvSpec:
    """``cat([branch(x) ...], dim=1)`` → one conv with stacked output channels (groups expanded to 1 unless only
    one branch). Requires :func:`why_not_on_one_grid` to be ``None``."""
    specs = [regroup(s, 1) for s in specs]
    padding, dilation, kernel = _grid(specs)
    weight = torch.cat([place_on_grid(s, padding, dilation, kernel) for s in specs], dim=0)
    bias = torch.cat([s.bias for s in specs])
    return ConvSpec(weight, bias, specs[0].stride, tuple(padding), tuple(dilation), 1)


# ---------------------------------------------------------------------------------- sequential
def why_not_composable(first: ConvSpec, second: ConvSpec) -> Optional[Refusal]:
    """``second(first(x))`` is one conv when both have dilation 1 (on axes with a kernel > 1) and either the second
    reads no zero padding (then any first kernel / stride / padding is exact: every intermediate position the second
    reads is a real output of the first), or the first is a bias-free 1x1 conv of any stride and padding (then the
    intermediate's zero border is what the first maps the input's zero border to) (docs/patterns.md, `sequential`).
    """
    if first.transposed or second.transposed:
        return Refusal(Reason.NOT_LINEAR, "transposed conv")
    if first.padding_mode != "zeros" or second.padding_mode != "zeros":
        return Refusal(Reason.PADDING, "non-zero padding_mode")
    if any(d != 1 for d, k in zip(first.dilation, first.kernel_size) if k > 1):
        return Refusal(Reason.TAP_GRID, f"first conv has dilation {first.dilation}")
    if any(d != 1 for d, k in zip(second.dilation, second.kernel_size) if k > 1):
        return Refusal(Reason.TAP_GRID, f"second conv has dilation {second.dilation}")
    if any(second.padding):
        if any(k != 1 for k in first.kernel_size):
            return Refusal(Reason.PADDING, "second conv zero-pads the output of a non-pointwise conv")
        if bool((first.bias != 0).any()):
            return Refusal(Reason.PADDING,
                           "second conv zero-pads an intermediate with a nonzero bias/shift (borders would change)")
    return None


def compose(first: ConvSpec, second: ConvSpec) -> ConvSpec:
    """``second ∘ first`` as one conv. With the first's stride ``s1``, second tap ``b`` and first tap ``a`` read input
    position ``s1·s2·o − (p1 + s1·p2) + s1·b + a``, so per group ``W[n, c, s1·b + a] += W2[n, m, b]·W1[m, c, a]``
    (kernel ``k1 + s1·(k2 − 1)``; for ``s1 = 1`` the full correlation of the kernels), ``b = b2 + Σ_{m,taps}
    W2[n, m]·b1[m]``; stride ``s1·s2``, padding ``p1 + s1·p2``, groups ``gcd(g1, g2)``. On an axis where the first
    kernel is 1 and the second's larger, only every ``s1``-th tap is nonzero: the result keeps kernel ``k2`` with
    dilation ``s1`` there. The output size is the second's for every input size. A 1x1 first conv takes a shorter
    path: one product per group (equal groups), or a per-channel product (a depthwise second, e.g. a pool); online
    re-parameterization (fxfuse.expansion.online) runs it in every training step."""
    s1 = tuple(first.stride)
    idx = input_channel_index(second.weight.shape[0], second.weight.shape[1], second.groups, second.weight.device)
    taps_sum = second.weight.sum(dim=tuple(range(2, second.weight.dim())))
    bias = second.bias + (taps_sum * first.bias[idx]).sum(dim=1)
    padding = tuple(a + st * b for a, b, st in zip(first.padding, second.padding, s1))
    stride = tuple(a * b for a, b in zip(s1, second.stride))
    if first.is_pointwise_kernel:  # kernel k2, dilation s1 on the axes where k2 > 1 (its taps are s1 apart)
        tap_dilation = tuple(st if k > 1 else 1 for k, st in zip(second.kernel_size, s1))
        w1 = first.weight.flatten(1)  # [M, C_in/g1]
        if second.groups == second.weight.shape[0] == w1.shape[0] and second.weight.shape[1] == 1:
            # depthwise second (one input channel per output, e.g. an average pool): W[n, c] = W2[n, 0]·W1[n, c]
            return ConvSpec(first.weight * second.weight, bias, stride, padding, tap_dilation, first.groups)
        if first.groups == second.groups:  # W[n, c] = Σ_m W2[n, m]·W1[m, c], one product per group
            g = first.groups
            w2 = second.weight.reshape(g, second.weight.shape[0] // g, second.weight.shape[1], -1)
            weight = torch.einsum("gnmt,gmc->gnct", w2, w1.reshape(g, w1.shape[0] // g, w1.shape[1]))
            weight = weight.reshape(second.weight.shape[0], w1.shape[1], *second.kernel_size)
            return ConvSpec(weight, bias, stride, padding, tap_dilation, g)
    groups = math.gcd(first.groups, second.groups)
    f, s = regroup(first, groups), regroup(second, groups)
    c_in_pg, m_pg, n_pg = f.weight.shape[1], f.weight.shape[0] // groups, s.weight.shape[0] // groups
    k1, k2 = f.kernel_size, s.kernel_size
    w1 = f.weight.reshape(groups, m_pg, c_in_pg, *k1)
    w2 = s.weight.reshape(groups, n_pg, m_pg, *k2)
    kernel = tuple(a + st * (b - 1) for a, b, st in zip(k1, k2, s1))
    out = w1.new_zeros(groups, n_pg, c_in_pg, *kernel)
    for tap in itertools.product(*(range(k) for k in k2)):
        window = (slice(None), slice(None), slice(None)) + tuple(
            slice(st * t, st * t + k) for t, k, st in zip(tap, k1, s1))
        out[window] += torch.einsum("gnm,gmc...->gnc...", w2[(slice(None),) * 3 + tap], w1)
    weight = out.reshape(groups * n_pg, c_in_pg, *kernel)
    dilation = tuple(st if a == 1 and b > 1 else 1 for a, b, st in zip(k1, k2, s1))
    if any(d > 1 for d in dilation):  # keep only the taps on the dilated grid (the others are zero)
        weight = weight[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)].contiguous()
    return ConvSpec(weight, bias, stride, padding, dilation, groups)


# ------------------------------------------------------------------------------- pads with values
PAD_VALUE_RTOL = 1e-12


def why_not_pad_values_through(spec: ConvSpec, values: Tensor) -> Optional[Refusal]:
    """A zero pad of ``f(x)`` whose border is filled with per-channel ``v`` equals ``f(zero_pad(x))`` when ``f`` is
    pointwise (1x1 kernel, stride 1, no padding: a per-channel affine or a 1x1 conv) and ``f(0) = bias = v``
    (docs/patterns.md, `pad_values`). ``v`` is usually the BN shift recomputed by the model's own code in another
    order, so the two are compared up to float64 rounding (``PAD_VALUE_RTOL`` of ``max |v|``)."""
    if not spec.is_pointwise or spec.padding_mode != "zeros":
        return Refusal(Reason.NOT_LINEAR,
                       "the padded tensor is not a pointwise (1x1, stride 1, unpadded) conv or per-channel affine")
    bias = spec.bias.to(torch.float64)
    v = values.to(bias.device, torch.float64)
    if bias.shape != v.shape:
        return Refusal(Reason.PADDING, f"pad values have {v.numel()} channels, the padded tensor {bias.numel()}")
    scale = max(float(v.abs().max()), float(bias.abs().max()), 1e-300)
    if float((bias - v).abs().max()) > PAD_VALUE_RTOL * scale:
        return Refusal(Reason.PADDING,
                       "pad values differ from the value the op before the pad takes at 0 (its bias / BN shift)")
    return None


# ------------------------------------------------------------------- linear maps across a reshape
# A linear map of the rows of a tensor (``F`` consecutive elements each, row-major) is written as a pointwise 1-D
# ConvSpec: weight ``[F_out, F_in/g, 1]``, bias ``[F_out]``, groups ``g`` (output feature ``f`` in group
# ``f // (F_out/g)`` reads input features ``group·F_in/g + j``). A Linear is one with ``g = 1``; a 1x1 conv on a
# ``[R, F, 1, 1]`` input (RepMLP's FC) keeps its groups; sums are :func:`sum_parallel`, affines after it
# :func:`conv_then_affine` with a per-feature affine (:func:`affine_on_rows`).
def linear_as_map(weight: Tensor, bias: Tensor) -> ConvSpec:
    """``F.linear(x, W, b)`` on rows of ``W.shape[1]`` features as a row map (groups 1)."""
    return ConvSpec(weight[:, :, None], bias, (1,), (0,), (1,), 1)


def why_not_conv_as_matrix(spec: ConvSpec) -> Optional[Refusal]:
    """A conv is a matrix on a fixed input size when it is not transposed and pads with zeros (the matrix of a
    reflect / circular pad exists too, but is not what :func:`conv_as_matrix` computes)."""
    if spec.transposed:
        return Refusal(Reason.NOT_LINEAR, "a transposed conv is not read as a dense matrix")
    if spec.padding_mode != "zeros":
        return Refusal(Reason.PADDING, f"padding_mode={spec.padding_mode!r}: only zero padding is read as a matrix")
    return None


CONV_AS_MATRIX_CHUNK = 1 << 22  # basis elements per conv call in conv_as_matrix (32 MiB of float64)


def conv_as_matrix(spec: ConvSpec, size: Sequence[int]) -> ConvSpec:
    """The conv on one ``[C_in, *size]`` sample as a row map (``F_in = C_in·∏size`` → ``F_out = C_out·∏out``, both
    flattened channel-major, NCHW order): column ``j`` of the matrix is the conv applied to the ``j``-th basis
    tensor, with its zero padding (RepMLP's conv→FC conversion: a conv on an identity). Per group: ``eye(F_in/g)``
    as ``F_in/g`` samples of ``C_in/g`` channels, repeated ``g`` times along the channels, so output channel ``o``
    of group ``γ`` sees its own group's basis; its responses are the ``g``-grouped matrix. Bias: ``b[o]`` at every
    output position. Requires :func:`why_not_conv_as_matrix` to be ``None``."""
    w, g = spec.weight, spec.groups
    in_per_group = w.shape[1]
    n = in_per_group * math.prod(size)
    chunk = max(1, min(n, CONV_AS_MATRIX_CHUNK // max(1, g * n)))  # basis tensors per conv call (bounded memory)
    responses = []
    for start in range(0, n, chunk):
        rows = torch.arange(min(chunk, n - start), device=w.device)
        eye = w.new_zeros(len(rows), n)
        eye[rows, start + rows] = 1
        basis = eye.reshape(len(rows), in_per_group, *size).repeat(1, g, *([1] * len(size)))
        out = torch.convolution(basis, w, None, list(spec.stride), list(spec.padding), list(spec.dilation), False,
                                [0] * len(size), g)  # [chunk, C_out, *out]
        responses.append(out.reshape(len(rows), -1))
    positions = math.prod(out.shape[2:])
    weight = torch.cat(responses).t().contiguous()[:, :, None]  # [C_out·∏out, n, 1]
    return ConvSpec(weight, spec.bias.repeat_interleave(positions), (1,), (0,), (1,), g)


def affine_on_rows(affine: ChannelAffine, shape: Sequence[int], axis: int, features: int) -> Optional[ChannelAffine]:
    """A per-channel affine along ``axis`` of a tensor of ``shape``, seen on its rows of ``features`` consecutive
    elements (row-major): element ``i``'s channel is ``(i // ∏shape[axis+1:]) mod shape[axis]``, which depends only
    on the position in the row iff ``∏shape[axis:]`` divides ``features``. Then it is a per-feature affine of the
    rows (``None`` otherwise: the channel changes from row to row)."""
    inner = math.prod(shape[axis + 1:])
    period = inner * shape[axis]
    if period == 0 or features % period:
        return None
    index = (torch.arange(features, device=affine.scale.device) // inner) % shape[axis]
    return ChannelAffine(affine.scale[index], affine.shift[index])


def linear_after_conv(conv: ConvSpec, size: Sequence[int], rows: Optional[ChannelAffine], weight: Tensor,
                      bias: Tensor) -> tuple[Tensor, Tensor]:
    """``F.linear(rows(conv(x)).flatten(1), W, b)`` as one Linear on ``x.flatten(1)`` (``x``: ``[N, C_in, *size]``;
    ``rows``: an optional per-feature affine of the conv's flattened output): ``W' = (W·diag(a))·M``,
    ``b' = W·(a·b_conv + c) + b``, with ``M`` the conv's matrix on ``size`` (:func:`conv_as_matrix`).

    ``M`` is never built (it has ``C_out·∏out × C_in·∏size`` entries: gigabytes for a conv on a 28x28 map): row
    ``r`` of ``W_a·M`` is the adjoint of the conv applied to row ``r`` of ``W_a`` seen as a ``[C_out, *out]`` map —
    one transposed conv of the ``F₂`` rows, ``F₂·C_in·∏size`` entries, the size of the result."""
    n = conv.ndim
    c_out = conv.weight.shape[0]
    conv_rows = conv.bias.to(weight).repeat_interleave(weight.shape[1] // c_out)  # the conv bias of every feature
    scaled = weight
    if rows is not None:
        rows = _on(rows, weight)
        scaled, conv_rows = weight * rows.scale, rows.scale * conv_rows + rows.shift
    grad = scaled.reshape(weight.shape[0], c_out, *conv.geometry.output_size(size))
    composed = _CONV_INPUT_GRAD[n - 1]([weight.shape[0], conv.weight.shape[1] * conv.groups, *size], conv.weight,
                                       grad, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return composed.flatten(1), weight @ conv_rows + bias


# The adjoint of a conv (its input gradient), by spatial rank: public torch.nn.grad functions.
_CONV_INPUT_GRAD = (nn_grad.conv1d_input, nn_grad.conv2d_input, nn_grad.conv3d_input)


def map_as_pointwise_conv(spec: ConvSpec, ndim: int) -> ConvSpec:
    """A row map as the 1x1 conv (``ndim`` spatial axes, stride 1, no padding, same groups) that computes it on a
    ``[R, F_in, 1, …]`` input."""
    weight = spec.weight.reshape(*spec.weight.shape[:2], *([1] * ndim))
    return ConvSpec(weight, spec.bias, (1,) * ndim, (0,) * ndim, (1,) * ndim, spec.groups)
