"""The reference nets as model zoos write them: the same function, spelled the way tracing finds it in the wild.

* every ``nn.BatchNorm2d`` becomes :class:`AssertingBatchNorm2d`, a subclass that checks its input rank in
  forward (``torch._assert(x.ndim == 4, …)``) and calls ``F.batch_norm`` on its buffers — symbolic tracing inlines
  it into a functional batch norm on ``get_attr`` tensors plus a shape assertion;
* RepVGG blocks accumulate their branches from a constant ``0`` (``out = 0; out = out + identity(x); out = out +
  dense(x) …``), the spelling of an optional branch that is absent.

``build("<name>-zoo")`` returns the zoo form of any reference net; its deploy form (``plain_twin``) is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .repvgg_net import RepVGGBlock

__all__ = ["AssertingBatchNorm2d", "ZooRepVGGBlock", "zoo_form"]


class AssertingBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose forward asserts a 4-D input and calls ``F.batch_norm`` directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "AssertingBatchNorm2d expects NCHW input")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum or 0.0, self.eps)


class ZooRepVGGBlock(RepVGGBlock):
    """RepVGG block summing its branches onto a constant ``0``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = 0
        if self.identity is not None:
            out = out + self.identity(x)
        out = out + self.dense(x)
        out = out + self.pointwise(x)
        return self.act(out)


def _asserting(bn: nn.BatchNorm2d) -> AssertingBatchNorm2d:
    new = AssertingBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training)


def _zoo_block(block: RepVGGBlock) -> ZooRepVGGBlock:
    new = ZooRepVGGBlock(block.in_channels, block.out_channels, block.stride, block.groups)
    new.load_state_dict(block.state_dict())
    return new.train(block.training)


def zoo_form(model: nn.Module) -> nn.Module:
    """``model`` (modified in place and returned) with its BNs and RepVGG blocks in zoo spelling."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RepVGGBlock:
                setattr(parent, name, _zoo_block(child))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, _asserting(child))
    return model
