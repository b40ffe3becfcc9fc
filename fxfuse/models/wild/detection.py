"""Detection heads: a YOLO-style detector (RepConv + head), an anchor-free grid cached per shape, DETR's sine
position embedding, an FCOS head with a learnable scale and a ``torch.finfo`` fill."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import RepVGGBlock, conv_bn


# ---------------------------------------------------------------- 5. YOLO-style detector (RepConv + head)
class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class RepConv(nn.Module):
    """YOLOv7's RepConv in training form (``hasattr`` checks for the deploy conv)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(c)
        self.rbr_dense, self.rbr_1x1 = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 1)
        self.act = nn.SiLU()

    def forward(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))  # type: ignore[operator]  # set by YOLOv7's deploy step
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class Detect(nn.Module):
    """YOLOv5's head: a grid cached per feature-map shape, box centres written in place with ``y[..., 0:2] = …``."""

    anchor_grid: Tensor  # buffers (register_buffer)
    stride: Tensor

    def __init__(self, ch: Tuple[int, ...], nc: int = 2, na: int = 2) -> None:
        super().__init__()
        self.nc, self.no, self.na, self.nl = nc, nc + 5, na, len(ch)
        self.grid = [torch.zeros(1)] * self.nl
        self.register_buffer("anchor_grid", torch.rand(self.nl, 1, na, 1, 1, 2) * 4 + 1)
        self.register_buffer("stride", torch.tensor([4.0, 8.0]))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * na, 1) for c in ch)

    def forward(self, xs: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        z = []
        for i in range(self.nl):
            xs[i] = self.m[i](xs[i])
            bs, _, ny, nx = xs[i].shape
            xs[i] = xs[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.grid[i].shape[2:4] != xs[i].shape[2:4]:
                self.grid[i] = self._make_grid(nx, ny).to(xs[i].device, xs[i].dtype)
            y = xs[i].sigmoid()
            y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
            z.append(y.view(bs, -1, self.no))
        return torch.cat(z, 1), xs

    @staticmethod
    def _make_grid(nx: int, ny: int) -> Tensor:
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


class TinyYolo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.rep, self.down = ConvBNAct(3, 8, 3, 2), RepConv(8), ConvBNAct(8, 16, 3, 2)
        self.detect = Detect((8, 16))

    def forward(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        p1 = self.rep(self.stem(x))
        p2 = self.down(p1)
        return self.detect([p1, p2])


# ------------------------------------------- a. anchor-free grid in the feature's dtype, cached per shape
class PointHead(nn.Module):
    """Anchor-free box head (YOLOX / FCOS decoding): conv → BN → ReLU → 1x1 regression, decoded as
    ``(reg + grid) * stride`` with the grid of cell indices built in the feature's dtype on the feature's device
    and cached per feature-map size (``self._cache[(h, w)]``, reused while the size matches)."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.reg = nn.Conv2d(c, 2, 1)
        self.stride = stride
        self._cache: Dict[Tuple[int, int], Tensor] = {}

    def grid(self, feat: Tensor) -> Tensor:
        h, w = feat.shape[-2:]
        key = (int(h), int(w))
        if key not in self._cache:
            ys = torch.arange(h, dtype=feat.dtype, device=feat.device)
            xs = torch.arange(w, dtype=feat.dtype, device=feat.device)
            yv, xv = torch.meshgrid(ys, xs, indexing="ij")
            self._cache[key] = torch.stack((xv, yv), 0).unsqueeze(0)
        return self._cache[key]

    def forward(self, feat: Tensor) -> Tensor:
        t = F.relu(self.bn(self.conv(feat)))
        return (self.reg(t) + self.grid(feat)) * self.stride


class GridHeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, 1)
        self.blocks = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))
        self.head = PointHead(8, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(F.relu(self.stem(x))))


# ----------------------------------------------------------------- b. DETR's sine position embedding
class PositionEmbeddingSine(nn.Module):
    """DETR's sine embedding of (y, x) positions, normalized to [0, 2π], in the feature's dtype: the mask, its
    cumulative sums and ``dim_t = T ** (2 * (i // 2) / d)`` are all built with ``dtype=x.dtype``."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.scale = 2 * math.pi

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        mask = torch.zeros((b, h, w), dtype=x.dtype, device=x.device)  # no padded pixels
        not_mask = 1 - mask
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=x.dtype, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class SinePositionNet(nn.Module):
    """Backbone (stem + 2 RepVGG blocks), DETR's 1x1 ``input_proj`` (here conv-BN), plus the position embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 1, 1)
        self.body = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))
        self.input_proj = conv_bn(8, 8, 1)
        self.position_embedding = PositionEmbeddingSine(4)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.body(F.relu(self.stem(x)))
        return self.input_proj(feat) + self.position_embedding(feat)


# ------------------------------------------------ f. FCOS head: learnable Scale, torch.finfo(x.dtype) fill
class Scale(nn.Module):
    """FCOS's per-level learnable scalar."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSHeadNet(nn.Module):
    """FCOS-style: stem + RepVGG tower, class logits with padded pixels (all input channels 0) filled with
    ``torch.finfo(logits.dtype).min``, box regression ``relu(Scale(bbox_pred(t)))``; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 1, 1)
        self.tower = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8))
        self.cls_logits = nn.Conv2d(8, 3, 3, padding=1)
        self.bbox_pred = nn.Conv2d(8, 4, 3, padding=1)
        self.scale = Scale(1.5)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        t = self.tower(F.relu(self.stem(x)))
        padded = (x == 0).all(1, keepdim=True)
        logits = self.cls_logits(t).masked_fill(padded, torch.finfo(t.dtype).min)
        return logits, F.relu(self.scale(self.bbox_pred(t)))
