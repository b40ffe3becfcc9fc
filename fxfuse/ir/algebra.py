"""Representation: every linear-affine op of a conv net as a convolution.

Two value types carry the algebra between graph readers (``_graph``) and the fold math (``_kernels``):

* :class:`ConvSpec` — ``y = conv_nd(x, W, b; stride, padding, dilation, groups)``, zero padding,
  ``W: [C_out, C_in/groups, *kernel]``. Identity, BatchNorm, AvgPool and per-channel constants are all
  expressible as one.
* :class:`ChannelAffine` — ``y = scale * x + shift`` along one channel axis (eval BatchNorm, ``x * c + d``).

:class:`ConvGeometry` is a conv's hyper-parameters without its tensors — the one geometry type of the package:
``ConvSpec.geometry``, what an expansion scheme sees (:mod:`fxfuse.expansion`), what
:func:`fxfuse.testing.conv_geometries` draws.

When a fold would not be exact, readers and the ``why_not_*`` conditions say so with a :class:`Refusal` (a stable
:class:`fxfuse.reasons.Reason` code and a sentence).

Tensors inside are float64 while the pass computes; the graph surgery casts them back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..reasons import Reason

IntTuple = Tuple[int, ...]


@dataclass(frozen=True)
class Refusal:
    """The node is a candidate, but a fold through it would not be exact: ``code`` says which exactness condition
    fails (stable, for code to branch on), ``reason`` says it in a sentence (for people; may be reworded)."""

    code: Reason
    reason: str


@dataclass(frozen=True)
class ChannelAffine:
    """Per-channel affine map ``y = scale[c] * x + shift[c]``."""

    scale: Tensor
    shift: Tensor

    @property
    def channels(self) -> int:
        return self.scale.numel()


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of one ``nn.ConvNd``: no tensors (``in_channels`` and ``out_channels`` are multiples
    of ``groups``; ``padding`` is zero padding, one int per spatial axis; ``bias``: whether the conv has one)."""

    in_channels: int
    out_channels: int
    kernel_size: IntTuple
    stride: IntTuple
    padding: IntTuple
    dilation: IntTuple
    groups: int
    bias: bool

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.kernel_size)

    @property
    def pointwise(self) -> bool:
        """1x1 kernel (stride and padding may be anything)."""
        return all(k == 1 for k in self.kernel_size)

    @property
    def depthwise(self) -> bool:
        """One group per input channel (``groups == in_channels > 1``)."""
        return self.groups == self.in_channels and self.groups > 1

    @classmethod
    def of(cls, conv: nn.modules.conv._ConvNd) -> ConvGeometry:
        """The geometry of a (not transposed) ``nn.ConvNd``; ``padding="same"`` resolved to ``d·(k-1)/2`` per axis
        (callers refuse an even receptive field first: it pads asymmetrically), ``"valid"`` to 0."""
        kernel, dilation = tuple(int(k) for k in conv.kernel_size), tuple(int(d) for d in conv.dilation)
        if conv.padding == "valid":
            padding: IntTuple = (0,) * len(kernel)
        elif conv.padding == "same":
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        else:
            padding = tuple(int(p) for p in conv.padding)
        return cls(int(conv.in_channels), int(conv.out_channels), kernel, tuple(int(v) for v in conv.stride),
                   padding, dilation, int(conv.groups), conv.bias is not None)

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``nn.ConvNd``."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "bias": self.bias}

    def conv(self, **overrides: Any) -> nn.Module:
        """A freshly initialised ``nn.Conv{ndim}d`` with this geometry (``overrides`` replace keyword args)."""
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[self.ndim - 1]
        return cls(**{**self.kwargs(), **overrides})

    def centre(self) -> IntTuple:
        """Per axis ``-2p + d(k - 1)``: branches with equal stride and centre read aligned windows
        (:meth:`ConvSpec.centre`)."""
        return tuple(-2 * p + d * (k - 1) for p, d, k in zip(self.padding, self.dilation, self.kernel_size))

    def min_input_size(self) -> IntTuple:
        """Smallest spatial size per axis for which the conv has at least one output position."""
        return tuple(max(1, d * (k - 1) + 1 - 2 * p) for p, d, k in zip(self.padding, self.dilation,
                                                                         self.kernel_size))

    def output_size(self, size: Sequence[int]) -> IntTuple:
        """``floor((n + 2p - d(k-1) - 1) / s) + 1`` per axis."""
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip(size, self.padding, self.dilation, self.kernel_size, self.stride))

    def example_input(self, batch: int = 2, size: Optional[Sequence[int]] = None, seed: int = 0) -> Tensor:
        """A random ``[batch, in_channels, *size]`` float32 input (``size`` defaults to
        ``min_input_size() + 3`` per axis, so borders and interior are both exercised)."""
        size = tuple(size) if size is not None else tuple(m + 3 for m in self.min_input_size())
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.in_channels, *size, generator=gen)

    def aligned_padding(self, kernel: Sequence[int]) -> Optional[IntTuple]:
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
        return tuple(out)

    def why_not_aligned(self, kernel: Sequence[int]) -> Optional[str]:
        """Why a ``kernel`` branch cannot share this conv's tap grid (``None`` when it can)."""
        if self.aligned_padding(kernel) is None:
            return (f"a {'x'.join(map(str, kernel))} kernel's taps are not on the grid of this "
                    f"{'x'.join(map(str, self.kernel_size))} conv (padding {self.padding}, dilation {self.dilation})")
        return None

    def why_no_identity(self) -> Optional[str]:
        """Why the input itself cannot be a branch (``None`` when it can): it needs ``in == out``, stride 1, an
        odd kernel and ``padding = d(k-1)/2`` (same spatial size; the identity tap is the kernel centre)."""
        if self.in_channels != self.out_channels:
            return f"in_channels {self.in_channels} != out_channels {self.out_channels}"
        if any(s != 1 for s in self.stride):
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
class ConvSpec:
    """A (cross-correlation) convolution with zero padding, or a transposed one: its tensors and its geometry
    (:attr:`geometry`).

    For ``transposed=True`` the weight layout is PyTorch's ``[C_in, C_out/groups, *kernel]`` and
    ``output_padding`` applies; such specs are only composed with per-channel affines.
    """

    weight: Tensor
    bias: Tensor
    stride: IntTuple
    padding: IntTuple
    dilation: IntTuple
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: IntTuple = ()

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return self.weight.dim() - 2

    @property
    def kernel_size(self) -> IntTuple:
        return tuple(self.weight.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups if self.transposed else self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1] * self.groups

    @property
    def geometry(self) -> ConvGeometry:
        """The conv's hyper-parameters (``bias``: whether the bias is nonzero); not defined for a transposed
        conv (``ValueError``)."""
        if self.transposed:
            raise ValueError("a transposed conv's geometry is not a ConvGeometry")
        return ConvGeometry(self.in_channels, self.out_channels, self.kernel_size, tuple(self.stride),
                            tuple(self.padding), tuple(self.dilation), self.groups, bool(self.bias.any()))

    @property
    def is_pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: acts on channels only."""
        return (
            not self.transposed
            and all(k == 1 for k in self.kernel_size)
            and all(s == 1 for s in self.stride)
            and all(p == 0 for p in self.padding)
        )

    @property
    def is_pointwise_kernel(self) -> bool:
        """A 1x1 kernel of a (not transposed) conv; stride and padding may be anything."""
        return not self.transposed and all(k == 1 for k in self.kernel_size)

    def centre(self) -> IntTuple:
        """Per axis, first + last tap offset relative to ``o * stride``: ``2·(-p) + d·(k-1)``.

        Branches whose centres and strides agree read windows with a common centre, so their kernels can be
        placed on one tap grid (docs/patterns.md, `branch_sum`)."""
        return tuple(
            -2 * p + d * (k - 1) for p, d, k in zip(self.padding, self.dilation, self.kernel_size)
        )

    def with_(self, **changes) -> ConvSpec:
        return replace(self, **changes)

    def macs_per_output_pixel(self) -> int:
        """Multiply-accumulates per output position: ``C_out · C_in/g · prod(kernel)``."""
        return int(self.weight.numel())


def as_tuple(value, ndim: int) -> IntTuple:
    """Normalize an int / sequence argument of a conv to an ``ndim``-tuple of ints."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) == 1 and ndim > 1:
        return value * ndim
    if len(value) != ndim:
        raise ValueError(f"expected {ndim} values, got {value}")
    return value


def float64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)
