"""What the readers return: a node seen as a conv (:class:`ConvRead`), a per-channel affine
(:class:`AffineRead`), a linear layer (:class:`LinearRead`), a sum (:class:`SumRead`) or a pad with values
(:class:`ValuedPad`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor, fx

from ..algebra import ChannelAffine, ConvSpec


@dataclass(frozen=True)
class ConvRead:
    """A read result, not a geometry: the node's input, the conv it computes (``node = spec(input)``; its
    hyper-parameters are ``spec.geometry``) and which op it was read from — ``kind`` is ``conv``,
    ``conv_transpose``, ``avg_pool`` or ``affine``. ``like`` is the original weight (dtype/device/layout/
    requires_grad for the rewritten module)."""

    input: fx.Node
    spec: ConvSpec
    kind: str
    like: Optional[Tensor]


@dataclass(frozen=True)
class AffineRead:
    """``node = affine(input)`` along ``axis`` (non-negative) of an ``ndim``-dim tensor."""

    input: fx.Node
    affine: ChannelAffine
    axis: int
    ndim: int
    kind: str


@dataclass(frozen=True)
class LinearRead:
    """``node = F.linear(input, weight, bias)`` (weight ``[out, in]``)."""

    input: fx.Node
    weight: Tensor
    bias: Tensor
    like: Tensor


@dataclass(frozen=True)
class SumRead:
    """``node = Σ coef·term`` over two non-constant tensors (``a + b``, ``a - b``, ``torch.add(a, b, alpha=k)``,
    ``a.add_(b)`` …); ``in_place`` when the first operand is written."""

    terms: Tuple[Tuple[float, fx.Node], ...]
    in_place: bool


@dataclass(frozen=True)
class ValuedPad:
    """``node`` = ``input`` padded by ``padding`` (per spatial axis, both sides) with the per-channel constant
    ``values`` (float64 ``[C]``): a zero pad (``pad``) whose whole border is then overwritten with ``values``
    (``out[:, :, :p, :] = v`` … on every side, functionalized to ``slice_scatter``). ``nodes``: the pad, the
    writes and the slices they read (the construct, which nothing else should use)."""

    input: fx.Node
    pad: fx.Node
    padding: Tuple[int, ...]
    values: Tensor
    nodes: Tuple[fx.Node, ...]
