"""Networks written the way training-form re-parameterizable code is written in the wild: the constructs that stop
``torch.fx`` symbolic tracing — item assignment into a padded tensor (DBB's BN-and-pad layer), ``int()`` of sizes,
branches on devices or shapes, ``reshape(*x.size())``, shape-keyed caches (detection heads), in-place writes on
aliases, forward hooks — and weights generated in forward (masks × scale, ``w + identity``, kernels composed by
convolving two kernels). ``CORPUS`` maps a name to (factory, example input shape, the hand-written deploy form's
(convs, BatchNorms, Linears) executed): the structure ``fxfuse.reparametrize`` must reach
(tests/test_capture_export.py; per-capture counts: ``python -m benchmarks.capture_corpus``, docs/benchmarks.md).

``DTYPE_CORPUS`` (same convention) holds networks whose forward derives a dtype from its input or its weights —
``torch.arange(n, dtype=x.dtype)`` grids cached per shape, DETR's sine position embedding, the AMP cast
``x.to(self.stem.conv.weight.dtype)``, ``torch.full`` / ``new_tensor`` / ``new_ones`` / ``zeros_like``, a float32
buffer brought in with ``type_as``, ``torch.finfo(x.dtype)`` — around RepVGG blocks that must still collapse, in
whatever dtype the model is run (tests/test_dtype_corpus.py).
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CORPUS", "DTYPE_CORPUS", "make", "conv_bn", "DBBNet", "ReshapeNet"]


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


# ------------------------------------------------------------------------------ 1. DBB, as published
class BNAndPadLayer(nn.Module):
    """DBB's BN, then pad with what the BN maps 0 to, written with slice assignment."""

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input: Tensor) -> Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1x1 conv initialized at identity: the weight used is ``self.weight + id_tensor``."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = id_value.type_as(self.weight)
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, input: Tensor) -> Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.dbb_origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = DiverseBranchBlock(3, 8, 3, 1, 1)
        self.b2 = DiverseBranchBlock(8, 8, 3, 2, 1, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


# ----------------------------------------------------------- 2. weights stored flat, viewed with int()
class FlatWeightConvBN(nn.Module):
    """The weight is kept flat and viewed in forward with ``.size()`` unpacking and ``int()``."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin // groups * k * k) * 0.2)
        self.k, self.groups = k, groups
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        o, n = self.weight.size()
        i = int(n / (self.k * self.k))
        w = self.weight.view(o, i, self.k, self.k)
        return F.relu(self.bn(F.conv2d(x, w, None, 1, self.k // 2, 1, self.groups)))


class FlatWeightNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(FlatWeightConvBN(3, 8, 3), FlatWeightConvBN(8, 8, 3, groups=4))


# --------------------------------------------------------------------- 3. ECBSR's edge-oriented block
class SeqConv3x3(nn.Module):
    """ECBSR: a 1x1 conv, its output padded with its own bias, then a 3x3 conv (dense, or depthwise with a fixed
    Sobel / Laplacian mask times a learnable scale)."""

    def __init__(self, seq_type: str, inp: int, out: int, depth_multiplier: float = 2.0) -> None:
        super().__init__()
        self.type, self.out_planes = seq_type, out
        if seq_type == "conv1x1-conv3x3":
            self.mid_planes = int(out * depth_multiplier)
            conv0, conv1 = nn.Conv2d(inp, self.mid_planes, 1), nn.Conv2d(self.mid_planes, out, 3)
            self.k0, self.b0, self.k1, self.b1 = conv0.weight, conv0.bias, conv1.weight, conv1.bias
            return
        conv0 = nn.Conv2d(inp, out, 1)
        self.k0, self.b0 = conv0.weight, conv0.bias
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
        device = self.k0.get_device()
        if device < 0:
            device = None
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
        (k1, b1), (k2, b2), (k3, b3) = (b.rep_params() for b in (self.conv1x1_3x3, self.conv1x1_sbx,
                                                                   self.conv1x1_lpl))
        rk, rb = k0 + k1 + k2 + k3, b0 + b1 + b2 + b3
        if self.with_idt:
            device = rk.get_device()
            if device < 0:
                device = None
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


# ------------------------------------------------------------------------ 4. reshape(*x.size())
class RepBlockReshape(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense, self.one, self.idn = conv_bn(c, c, 3, 1, 1), conv_bn(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dense(x) + self.one(x) + self.idn(x)
        return F.relu(y.reshape(*x.size()))


class ReshapeNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(conv_bn(3, 8, 3, 1, 1), RepBlockReshape(8), RepBlockReshape(8))


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
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class Detect(nn.Module):
    """YOLOv5's head: a grid cached per feature-map shape, box centres written in place with ``y[..., 0:2] = …``."""

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


# --------------------------------------------------------------- 6. MobileOne, branch on channel count
class MobileOneBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 2) -> None:
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity_out = 0
        if self.rbr_skip is not None and x.shape[1] == self.rbr_skip.num_features:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.activation(out)


class MobileOneNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(MobileOneBlock(3, 8, 3, 2), MobileOneBlock(8, 8, 3, groups=8),
                         MobileOneBlock(8, 16, 1), MobileOneBlock(16, 16, 3, 2, groups=16))


# ------------------------------------------------------------------ 7. in-place add on an alias
class AliasedInplaceAdd(nn.Module):
    """``y = x; y += conv(x)``: ``x`` is written too, so ``x * 2`` reads the sum (symbolic tracing records an
    out-of-place add and gets it wrong; export functionalizes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 6, 3, 1, 1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.body(x)
        y = x
        y += self.conv(x)
        return y, x * 2


# -------------------------------------------------------------------- 8. a forward hook scales a conv
def hooked_conv_bn() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
    model[0].register_forward_hook(lambda m, i, o: o * 3.0)
    return model


# ---------------------------------------------- 9. large kernel with a small one padded in, in forward
class LargeKernelGenerated(nn.Module):
    """RepLKNet-like: the small kernel is zero-padded into the large one in forward, then conv + BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.large = nn.Parameter(torch.randn(c, 1, 5, 5) * 0.2)
        self.small = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.2)
        self.bn = nn.BatchNorm2d(c)
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.large + F.pad(self.small, [1, 1, 1, 1])
        return self.bn(F.conv2d(x, kernel, None, 1, 2, 1, self.c))


# -------------------------------------------- 10. Inception-style concat + transposed-conv decoder, dict out
class CatDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 4, 3, 1, 1), conv_bn(3, 6, 1)
        self.up = nn.ConvTranspose2d(10, 5, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(5)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feat = torch.cat([self.a(x), self.b(x)], dim=1)
        return {"feat": feat, "out": self.up_bn(self.up(F.relu(feat)))}


# ---------------------------------------------- 11. Linear → BatchNorm1d over flattened tokens
class TokenMLP(nn.Module):
    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(c, 2 * c), nn.BatchNorm1d(2 * c), nn.Linear(2 * c, c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        b, t, c = y.size()
        y = self.bn(y.view(b * t, c)).view(b, t, c)
        return self.out(F.gelu(y))


# ================================================================ the dtype corpus (DTYPE_CORPUS below)
# Each forward derives a dtype from its input or its weights at run time. A capture made in one dtype freezes it
# (torch.export records ``dtype=torch.float64`` as a constant); the result must still run in the model's dtype.
class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv-BN + 1x1 conv-BN (+ a BN identity branch where the shapes allow),
    summed, then ReLU. Deploy form: one 3x3 conv with bias + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0)
        self.nonlinearity = nn.ReLU()

    def forward(self, inputs: Tensor) -> Tensor:
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


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
        x = x.to(self.stem.conv.weight.dtype)
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


# ------------------------------------------------------------------------------------------ the table
# name -> (factory, example input shape, deploy form's (convs, batch_norms, linears)).
CORPUS = {
    # 2 DBB blocks -> one kxk conv each; the Linear head stays.
    "dbb_bn_and_pad": (DBBNet, (1, 3, 8, 8), (2, 0, 1)),
    # conv-BN-ReLU x2 with generated weights -> 2 convs.
    "flat_weight_int_size": (FlatWeightNet, (2, 3, 6, 6), (2, 0, 0)),
    # ECB training form: 4 branches (+ identity) per block, bias-valued pads -> one 3x3 conv per block.
    "ecb_train_form": (lambda: ECBNet(rebuild_in_eval=False), (1, 3, 6, 6), (2, 0, 0)),
    # ECB eval path: the deploy kernel rebuilt every call (get_device() branch) -> one conv per block.
    "ecb_eval_rebuild": (lambda: ECBNet(rebuild_in_eval=True), (1, 3, 6, 6), (2, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks (3x3 + 1x1 + identity BN), reshape(*x.size()) -> 3 convs.
    "reshape_star_size": (ReshapeNet, (2, 3, 6, 6), (3, 0, 0)),
    # stem, RepConv, down-sampling conv (each conv-BN) + 2 head convs -> 5 convs.
    "yolo_detect_head": (TinyYolo, (1, 3, 16, 16), (5, 0, 0)),
    # 4 MobileOne blocks -> one conv each.
    "mobileone_shape_branch": (MobileOneNet, (2, 3, 8, 8), (4, 0, 0)),
    # body conv-BN -> 1 conv; conv(x) + x -> 1 conv (identity merged).
    "aliased_inplace_add": (AliasedInplaceAdd, (2, 3, 5, 5), (2, 0, 0)),
    # conv·3 → BN → ReLU → 1x1 conv → BN -> 2 convs.
    "forward_hook": (hooked_conv_bn, (1, 3, 6, 6), (2, 0, 0)),
    # depthwise 5x5 from large + padded small kernel, BN -> 1 conv.
    "large_kernel_generated": (lambda: LargeKernelGenerated(4), (2, 4, 7, 7), (1, 0, 0)),
    # cat of two conv-BNs on x -> 1 conv; ConvTranspose + BN -> 1 transposed conv.
    "cat_decoder_dict_out": (CatDecoder, (2, 3, 5, 5), (2, 0, 0)),
    # Linear -> view -> BatchNorm1d -> view back -> 1 Linear, + the output Linear.
    "token_mlp_bn1d": (TokenMLP, (2, 5, 6), (0, 0, 2)),
}
# Forward-time dtype derivations around RepVGG blocks; same convention. Every block -> one conv, every BN folded.
DTYPE_CORPUS = {
    # stem conv-BN + 2 RepVGG blocks + head (conv-BN, 1x1 regression) -> 5 convs; the cached grid is an add.
    "grid_cache_arange": (GridHeadNet, (2, 3, 12, 12), (5, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks + input_proj conv-BN -> 4 convs; the sine embedding is elementwise.
    "detr_sine_position": (SinePositionNet, (2, 3, 8, 8), (4, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks (the first strided, no identity) -> 3 convs; the Linear head stays.
    "amp_cast_to_weight": (CastToWeightNet, (2, 3, 10, 10), (3, 0, 1)),
    # stem conv-BN + 2 RepVGG blocks -> 3 convs; the forward-built affine between them stays elementwise.
    "forward_constants": (ForwardConstantsNet, (2, 3, 8, 8), (3, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks -> 3 convs; the buffer scales stay elementwise.
    "type_as_buffer": (TypeAsBufferNet, (2, 3, 12, 12), (3, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks + cls and bbox convs -> 5 convs.
    "fcos_scale_finfo": (FCOSHeadNet, (2, 3, 8, 8), (5, 0, 0)),
}
# Built with a fixed seed: the factories draw random weights.
SEED = 0


def make(name: str) -> Tuple[nn.Module, Tensor]:
    """``(model, example input)`` for a name of :data:`CORPUS` or :data:`DTYPE_CORPUS`, built with a fixed seed
    (float32; the caller casts both to another dtype)."""
    factory, shape, _ = CORPUS[name] if name in CORPUS else DTYPE_CORPUS[name]
    torch.manual_seed(SEED)
    model = factory()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1))
