"""Representation: every linear-affine op of a conv net as a convolution.

Two value types carry the algebra between graph readers (``_graph``) and the fold math (``_kernels``):

* :class:`ConvSpec` — ``y = conv_nd(x, W, b; stride, padding, dilation, groups)``, zero padding,
  ``W: [C_out, C_in/groups, *kernel]``. Identity, BatchNorm, AvgPool and per-channel constants are all
  expressible as one.
* :class:`ChannelAffine` — ``y = scale * x + shift`` along one channel axis (eval BatchNorm, ``x * c + d``).

When a fold would not be exact, readers and the ``why_not_*`` conditions say so with a :class:`Refusal` (a stable
:class:`fxfuse.reasons.Reason` code and a sentence).

Tensors inside are float64 while the pass computes; the graph surgery casts them back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple

import torch
from torch import Tensor

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
class ConvSpec:
    """A (cross-correlation) convolution with zero padding, or a transposed one.

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
