"""ECBSR's edge-oriented block: Sobel / Laplacian branches with bias-valued pads, the deploy kernel rebuilt in eval."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------- 3. ECBSR's edge-oriented block
def _bias(conv: nn.Conv2d) -> Tensor:
    """The bias of a conv built with one (``Optional`` in the stubs)."""
    assert conv.bias is not None
    return conv.bias


class SeqConv3x3(nn.Module):
    """ECBSR: a 1x1 conv, its output padded with its own bias, then a 3x3 conv (dense, or depthwise with a fixed
    Sobel / Laplacian mask times a learnable scale)."""

    def __init__(self, seq_type: str, inp: int, out: int, depth_multiplier: float = 2.0) -> None:
        super().__init__()
        self.type, self.out_planes = seq_type, out  # type: ignore[method-assign,assignment]  # ECBSR's name hides Module.type
        if seq_type == "conv1x1-conv3x3":
            self.mid_planes = int(out * depth_multiplier)
            conv0, conv1 = nn.Conv2d(inp, self.mid_planes, 1), nn.Conv2d(self.mid_planes, out, 3)
            self.k0, self.b0, self.k1, self.b1 = conv0.weight, _bias(conv0), conv1.weight, _bias(conv1)
            return
        conv0 = nn.Conv2d(inp, out, 1)
        self.k0, self.b0 = conv0.weight, _bias(conv0)
        self.scale = nn.Parameter(torch.randn(out, 1, 1, 1) * 0.5)
        self.bias = nn.Parameter(torch.randn(out) * 0.5)
        mask = torch.zeros(out, 1, 3, 3)
        taps = {"conv1x1-sobelx": [(0, 0, 1.0), (1, 0, 2.0), (2, 0, 1.0), (0, 2, -1.0), (1, 2, -2.0), (2, 2, -1.0)],
                "conv1x1-laplacian": [(0, 1, 1.0), (1, 0, 1.0), (1, 2, 1.0), (2, 1, 1.0), (1, 1, -4.0)]}[seq_type]
        for i in range(out):
            for r, c, v in taps:
                mask[i, 0, r, c] = v
        self.mask = nn.Parameter(mask, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y0 = F.conv2d(input=x, weight=self.k0, bias=self.b0, stride=1)
        y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)  # explicitly padding with bias
        b0_pad = self.b0.view(1, -1, 1, 1)
        y0[:, :, 0:1, :] = b0_pad
        y0[:, :, -1:, :] = b0_pad
        y0[:, :, :, 0:1] = b0_pad
        y0[:, :, :, -1:] = b0_pad
        if self.type == "conv1x1-conv3x3":
            return F.conv2d(input=y0, weight=self.k1, bias=self.b1, stride=1)
        return F.conv2d(input=y0, weight=self.scale * self.mask, bias=self.bias, stride=1, groups=self.out_planes)

    def rep_params(self) -> Tuple[Tensor, Tensor]:
        index = self.k0.get_device()
        device = index if index >= 0 else None  # get_device() is -1 on the CPU
        if self.type == "conv1x1-conv3x3":
            rk = F.conv2d(input=self.k1, weight=self.k0.permute(1, 0, 2, 3))
            rb = torch.ones(1, self.mid_planes, 3, 3, device=device) * self.b0.view(1, -1, 1, 1)
            rb = F.conv2d(input=rb, weight=self.k1).view(-1,) + self.b1
            return rk, rb
        tmp = self.scale * self.mask
        k1 = torch.zeros((self.out_planes, self.out_planes, 3, 3), device=device, dtype=tmp.dtype)
        for i in range(self.out_planes):
            k1[i, i, :, :] = tmp[i, 0, :, :]
        rk = F.conv2d(input=k1, weight=self.k0.permute(1, 0, 2, 3))
        rb = torch.ones(1, self.out_planes, 3, 3, device=device, dtype=tmp.dtype) * self.b0.view(1, -1, 1, 1)
        rb = F.conv2d(input=rb, weight=k1).view(-1,) + self.bias
        return rk, rb


class ECB(nn.Module):
    """ECBSR's edge-oriented conv block. ``rebuild_in_eval=True`` is the published code: in eval mode the forward
    rebuilds the deploy kernel from the branches on every call (with a ``get_device()`` branch)."""

    def __init__(self, inp: int, out: int, with_idt: bool = False, rebuild_in_eval: bool = True) -> None:
        super().__init__()
        self.out_planes, self.rebuild_in_eval = out, rebuild_in_eval
        self.conv3x3 = nn.Conv2d(inp, out, 3, padding=1)
        self.conv1x1_3x3 = SeqConv3x3("conv1x1-conv3x3", inp, out)
        self.conv1x1_sbx = SeqConv3x3("conv1x1-sobelx", inp, out)
        self.conv1x1_lpl = SeqConv3x3("conv1x1-laplacian", inp, out)
        self.act = nn.PReLU(num_parameters=out)
        self.with_idt = with_idt and inp == out

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.rebuild_in_eval:
            y = self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_lpl(x)
            if self.with_idt:
                y += x
        else:
            rk, rb = self.rep_params()
            y = F.conv2d(input=x, weight=rk, bias=rb, stride=1, padding=1)
        return self.act(y)

    def rep_params(self) -> Tuple[Tensor, Tensor]:
        k0, b0 = self.conv3x3.weight, self.conv3x3.bias
        assert b0 is not None  # conv3x3 is built with a bias
        (k1, b1), (k2, b2), (k3, b3) = (b.rep_params() for b in (self.conv1x1_3x3, self.conv1x1_sbx,
                                                                   self.conv1x1_lpl))
        rk, rb = k0 + k1 + k2 + k3, b0 + b1 + b2 + b3
        if self.with_idt:
            index = rk.get_device()
            device = index if index >= 0 else None  # get_device() is -1 on the CPU
            k_idt = torch.zeros(self.out_planes, self.out_planes, 3, 3, device=device, dtype=rk.dtype)
            for i in range(self.out_planes):
                k_idt[i, i, 1, 1] = 1.0
            rk, rb = rk + k_idt, rb + 0.0
        return rk, rb


class ECBNet(nn.Module):
    def __init__(self, rebuild_in_eval: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(ECB(3, 4, rebuild_in_eval=rebuild_in_eval),
                                  ECB(4, 4, with_idt=True, rebuild_in_eval=rebuild_in_eval))
        self.upsampler = nn.PixelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsampler(self.body(x))
