"""Forward-time dtype derivations in the stem and between blocks: the AMP cast to the weights' dtype, constants made
in forward, a float32 buffer brought in with ``type_as``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import RepVGGBlock, conv_bn


# ================================================================ the dtype corpus (DTYPE_CORPUS below)
# Each forward derives a dtype from its input or its weights at run time. A capture made in one dtype freezes it
# (torch.export records ``dtype=torch.float64`` as a constant); the result must still run in the model's dtype.
# --------------------------------------------------- c. the AMP idiom: input cast to the weights' dtype
class CastToWeightNet(nn.Module):
    """``x = x.to(self.stem.conv.weight.dtype)`` first (half-precision deployment code): a no-op for an input
    already in the model's dtype, but the dtype is read from a weight at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 1, 1)
        self.stages = nn.Sequential(RepVGGBlock(8, 16, stride=2), RepVGGBlock(16, 16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.stem.conv.weight.dtype)  # type: ignore[union-attr,arg-type]  # nn.Sequential attribute: untyped
        x = self.stages(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------- d. constants made in forward: full, new_tensor, new_ones, zeros_like
class ForwardConstantsNet(nn.Module):
    """A fixed per-channel affine between two RepVGG blocks, built in forward from the feature: a per-image shift
    ``torch.full((batch, c, 1, 1), ..., dtype=y.dtype)`` (batch-sized, so no capture can fold it into a constant),
    gains ``y.new_tensor([...])``, an offset ``torch.zeros_like(y) + y.new_ones(...) * 0.5``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 1, 1)
        self.block1, self.block2 = RepVGGBlock(8, 8), RepVGGBlock(8, 8)
        self.gains = (0.5, 1.0, 1.5, 2.0, 0.75, 1.25, 0.25, 1.75)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block1(F.relu(self.stem(x)))
        c = y.shape[1]
        shift = torch.full((y.shape[0], c, 1, 1), 0.25, dtype=y.dtype, device=y.device)
        gain = y.new_tensor(self.gains).view(1, -1, 1, 1)
        offset = torch.zeros_like(y) + y.new_ones(1, c, 1, 1) * 0.5
        y = (y - shift) * gain + offset
        return self.block2(y)


# -------------------------------------------------------- e. a float32 buffer brought in with type_as
class TypeAsBufferNet(nn.Module):
    """Per-channel scales stored as float32 buffers (LayerScale-like, not trained) and brought to the feature's
    dtype with ``type_as`` after each block (``.to(bfloat16)`` of the model casts them too)."""

    scale1: Tensor  # buffers (register_buffer)
    scale2: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, 1)
        self.block1, self.block2 = RepVGGBlock(8, 8), RepVGGBlock(8, 8)
        self.register_buffer("scale1", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("scale2", torch.tensor([1.0, 0.5, 2.0, 0.25, 1.5, 0.75, 1.25, 3.0]))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = self.block1(x) * self.scale1.type_as(x).view(1, -1, 1, 1)
        return self.block2(x) * self.scale2.type_as(x).view(1, -1, 1, 1)
