"""Readers: fx nodes seen as linear ops. The one place that knows how a conv, BN, pool, pad or sum is spelled
(through the op table, :mod:`fxfuse.ir.ops`).

A *reader* looks at one node and, if it computes a linear-affine function of a single tensor input with
constant parameters, returns that input plus a :class:`ConvSpec` / :class:`ChannelAffine`; otherwise it returns
``None`` or a :class:`Refusal` (the node is the right kind of op, but folding it would be wrong, with why).
Both graph spellings are read: ``call_module`` (``nn.Conv2d``, ``nn.BatchNorm2d``, …) and functional
(``F.conv2d`` / ``F.batch_norm`` with constant, ``get_attr``-rooted parameters).

The package by concept: :mod:`.reads` (what readers return), :mod:`.args` (node arguments and shapes),
:mod:`.constants` (constant sub-graphs, per-channel vectors), :mod:`.layers` (convs, linear layers, affines, sums,
pools), :mod:`.pads` (pads, crops, permutes, concatenations); :class:`Reader` is all of them at once.
"""

from __future__ import annotations

from ..algebra import Refusal
from .args import arg, arg_ints, arg_node, attr_target, call_target, shape_of
from .constants import Constants
from .layers import LayerReads
from .pads import PadReads
from .reads import AffineRead, ConvRead, LinearRead, SumRead, ValuedPad


class Reader(LayerReads, PadReads):
    """Reads nodes of one GraphModule as linear ops (see the package docstring)."""


__all__ = ["AffineRead", "Constants", "ConvRead", "LinearRead", "Reader", "Refusal", "SumRead", "ValuedPad", "arg",
           "arg_ints", "arg_node", "attr_target", "call_target", "shape_of"]
