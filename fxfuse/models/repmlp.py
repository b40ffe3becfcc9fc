"""RepMLP (Ding et al. 2021, "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image
Recognition") in training form, and its authors' deploy conversion written out by hand.

The block cuts an ``[N, C, H, W]`` map into ``h×w`` partitions and applies, to every partition:

* the **partition perceptron** ``fc3``: an FC over the ``C·h·w`` values, written as the authors write it — a
  1x1 conv of ``groups=fc_groups`` on ``partitions.reshape(-1, C·h·w, 1, 1)``, then ``BatchNorm1d(O·h·w)``;
* the **local perceptrons**: conv ``k×k`` (padding ``k//2``, ``groups=fc_groups``) + BN on
  ``partitions.reshape(-1, C, h, w)``, for each ``k`` of ``reparam_conv_k``, summed and added to ``fc3``'s output;
* where ``H > h``, the **global perceptron**: avg-pool each partition to one value, BN, FC → ReLU → FC, and scale
  each partition's input by the result (a data-dependent gate: kept in the deploy form).

Deploy (the authors' ``switch_to_deploy``, :meth:`RepMLPBlock.deploy`): BNs folded; every local perceptron
turned into FC weights by **applying the conv to an identity tensor** (``F.conv2d(eye(C·h·w / g).repeat(1, g)
.reshape(-1, C, h, w), K, padding=k//2, groups=g)``) and added to ``fc3``; the pool BN folded into ``fc1``. Only
the FC runs in the hot path. Unlike the reference code, ``fc3_out = fc3_out + conv_out`` is out of place (the
in-place ``+=`` on a view of the BN's output computes the same)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RepMLPBlock", "RepMLPDeployBlock", "RepMLPNet", "repmlp_deploy"]


def _fuse_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.modules.batchnorm._BatchNorm
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``bn ∘ conv`` (weight ``[O, …]``): the authors' ``fuse_bn``."""
    assert bn.running_var is not None and bn.running_mean is not None
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.weight is not None else 1.0 / std
    shift = bn.bias if bn.bias is not None else torch.zeros_like(std)
    b = bias if bias is not None else torch.zeros_like(std)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift + (b - bn.running_mean) * scale


def _partitions(block: Any, inputs: torch.Tensor) -> torch.Tensor:
    """``[N, h_parts, w_parts, C, h, w]``: ``block``'s partitions of ``inputs``, gated by its global perceptron
    where it has one (``avg`` → ``fc1_fc2``; the training and the deploy block share this code, as in the paper)."""
    if block.need_global_perceptron:
        v = block.avg(inputs)
        v = v.reshape(-1, block.C * block.h_parts * block.w_parts)
        v = block.fc1_fc2(v)
        v = v.reshape(-1, block.C, block.h_parts, 1, block.w_parts, 1)
        inputs = inputs.reshape(-1, block.C, block.h_parts, block.h, block.w_parts, block.w)
        inputs = inputs * v
    else:
        inputs = inputs.view(-1, block.C, block.h_parts, block.h, block.w_parts, block.w)
    return inputs.permute(0, 2, 4, 1, 3, 5)


class RepMLPBlock(nn.Module):
    """Training-form RepMLP block (``RepMLP`` in the authors' code) on a fixed ``H×W`` input."""

    def __init__(self, in_channels: int, out_channels: int, H: int, W: int, h: int, w: int,
                 reparam_conv_k: Sequence[int] = (1, 3), globalperceptron_reduce: int = 1, fc_groups: int = 1) -> None:
        super().__init__()
        if H % h or W % w:
            raise ValueError(f"partitions {h}x{w} do not tile {H}x{W}")
        if in_channels % fc_groups or out_channels % fc_groups:
            raise ValueError(f"fc_groups={fc_groups} does not divide the channels")
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, H, W, h, w
        self.fc_groups = fc_groups
        self.h_parts, self.w_parts = H // h, W // w
        self.need_global_perceptron = (h != H) or (w != W)
        if self.need_global_perceptron:
            features = self.C * self.h_parts * self.w_parts
            internal = int(features // globalperceptron_reduce)
            self.fc1_fc2 = nn.Sequential()
            self.fc1_fc2.add_module("fc1", nn.Linear(features, internal))
            self.fc1_fc2.add_module("relu", nn.ReLU())
            self.fc1_fc2.add_module("fc2", nn.Linear(internal, features))
            self.avg = nn.Sequential()
            self.avg.add_module("avg", nn.AvgPool2d(kernel_size=(h, w)))
            self.avg.add_module("bn", nn.BatchNorm2d(self.C))
        self.fc3 = nn.Conv2d(self.C * h * w, self.O * h * w, 1, 1, 0, bias=False, groups=fc_groups)
        self.fc3_bn = nn.BatchNorm1d(self.O * h * w)
        self.reparam_conv_k = tuple(reparam_conv_k)
        for k in self.reparam_conv_k:
            branch = nn.Sequential()
            branch.add_module("conv", nn.Conv2d(self.C, self.O, k, padding=k // 2, bias=False, groups=fc_groups))
            branch.add_module("bn", nn.BatchNorm2d(self.O))
            self.add_module(f"repconv{k}", branch)

    def partitions(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[N, h_parts, w_parts, C, h, w]``: the partitions, gated by the global perceptron where there is one."""
        return _partitions(self, inputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        partitions = self.partitions(inputs)
        fc3_out = self.fc3(partitions.reshape(-1, self.C * self.h * self.w, 1, 1))
        fc3_out = self.fc3_bn(fc3_out.reshape(-1, self.O * self.h * self.w))
        fc3_out = fc3_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
        if self.reparam_conv_k:
            conv_inputs = partitions.reshape(-1, self.C, self.h, self.w)
            conv_out: Any = 0  # (the authors' spelling: an absent sum starts at 0)
            for k in self.reparam_conv_k:
                conv_out = conv_out + getattr(self, f"repconv{k}")(conv_inputs)
            fc3_out = fc3_out + conv_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(-1, self.O, self.H, self.W)

    # -- the authors' conversion -------------------------------------------------------------------------
    def _convert_conv_to_fc(self, kernel: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A local perceptron as FC weights: the conv applied to an identity tensor (the authors' code)."""
        n = self.C * self.h * self.w // self.fc_groups
        eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device).repeat(1, self.fc_groups)
        eye = eye.reshape(n, self.C, self.h, self.w)
        fc_k = F.conv2d(eye, kernel, padding=(kernel.size(2) // 2, kernel.size(3) // 2), groups=self.fc_groups)
        fc_k = fc_k.reshape(n, self.O * self.h * self.w).t()
        return fc_k, bias.repeat_interleave(self.h * self.w)

    @torch.no_grad()
    def get_equivalent_fc3(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``fc3`` with its BN and every local perceptron (conv + BN) folded in: weight ``[O·h·w, C·h·w/g, 1, 1]``."""
        fc_weight, fc_bias = _fuse_bn(self.fc3.weight, None, self.fc3_bn)
        if self.reparam_conv_k:
            largest = max(self.reparam_conv_k)
            branch = getattr(self, f"repconv{largest}")
            total_kernel, total_bias = _fuse_bn(branch.conv.weight, None, branch.bn)
            for k in self.reparam_conv_k:
                if k != largest:
                    branch = getattr(self, f"repconv{k}")
                    kernel, bias = _fuse_bn(branch.conv.weight, None, branch.bn)
                    total_kernel = total_kernel + F.pad(kernel, [(largest - k) // 2] * 4)
                    total_bias = total_bias + bias
            rep_weight, rep_bias = self._convert_conv_to_fc(total_kernel, total_bias)
            fc_weight = rep_weight.reshape_as(fc_weight) + fc_weight
            fc_bias = rep_bias + fc_bias
        return fc_weight, fc_bias

    @torch.no_grad()
    def deploy(self) -> RepMLPDeployBlock:
        """The authors' ``switch_to_deploy`` as a new module (this block is unchanged)."""
        me: Any = self  # (sub-modules reached by attribute: typed Any)
        out = RepMLPDeployBlock(self.C, self.O, self.H, self.W, self.h, self.w, self.fc_groups,
                                me.fc1_fc2.fc1.out_features if self.need_global_perceptron else 0)
        out = out.to(self.fc3.weight)
        deployed: Any = out
        if self.need_global_perceptron:
            bn = me.avg.bn
            std = (bn.running_var + bn.eps).sqrt()
            scale = bn.weight / std
            avgbias = bn.bias - bn.running_mean * scale
            fc1 = me.fc1_fc2.fc1
            times = fc1.in_features // len(avgbias)
            deployed.fc1_fc2.fc1.weight.copy_(fc1.weight * scale.repeat_interleave(times).view(1, -1))
            deployed.fc1_fc2.fc1.bias.copy_(fc1.bias + fc1.weight.matmul(avgbias.repeat_interleave(times)))
            deployed.fc1_fc2.fc2.load_state_dict(me.fc1_fc2.fc2.state_dict())
        weight, bias = self.get_equivalent_fc3()
        out.fc3.weight.copy_(weight)
        assert out.fc3.bias is not None
        out.fc3.bias.copy_(bias)
        return out.train(self.training)


class RepMLPDeployBlock(nn.Module):
    """Deploy form: avg-pool → fc1 → ReLU → fc2 gate (where ``H > h``) and one 1x1 conv FC with bias (``fc3``)."""

    def __init__(self, in_channels: int, out_channels: int, H: int, W: int, h: int, w: int, fc_groups: int = 1,
                 internal: int = 0) -> None:
        super().__init__()
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, H, W, h, w
        self.h_parts, self.w_parts = H // h, W // w
        self.need_global_perceptron = (h != H) or (w != W)
        if self.need_global_perceptron:
            features = self.C * self.h_parts * self.w_parts
            self.fc1_fc2 = nn.Sequential()
            self.fc1_fc2.add_module("fc1", nn.Linear(features, internal))
            self.fc1_fc2.add_module("relu", nn.ReLU())
            self.fc1_fc2.add_module("fc2", nn.Linear(internal, features))
            self.avg = nn.AvgPool2d(kernel_size=(h, w))
        self.fc3 = nn.Conv2d(self.C * h * w, self.O * h * w, 1, 1, 0, bias=True, groups=fc_groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        partitions = _partitions(self, inputs)
        fc3_out = self.fc3(partitions.reshape(-1, self.C * self.h * self.w, 1, 1))
        fc3_out = fc3_out.reshape(-1, self.h_parts, self.w_parts, self.O, self.h, self.w)
        fc3_out = fc3_out.permute(0, 3, 1, 4, 2, 5)
        return fc3_out.reshape(-1, self.O, self.H, self.W)


class RepMLPNet(nn.Module):
    """A small RepMLP-ResNet-style net on a fixed input size: conv stem (stride 4) + BN + ReLU, ``depth``
    residual RepMLP blocks (``x + relu(block(x))``), global average pool, Linear head."""

    def __init__(self, size: int = 64, channels: int = 32, partition: int = 8, depth: int = 2, fc_groups: int = 4,
                 reparam_conv_k: Sequence[int] = (1, 3), num_classes: int = 10) -> None:
        super().__init__()
        if size % 4:
            raise ValueError("size must be a multiple of 4")
        feat = size // 4
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(
            RepMLPBlock(channels, channels, feat, feat, partition, partition, reparam_conv_k,
                        globalperceptron_reduce=4, fc_groups=fc_groups) for _ in range(depth))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x.mean((2, 3)))


def repmlp_deploy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`RepMLPBlock` replaced by its :meth:`~RepMLPBlock.deploy` form and
    every conv → BatchNorm2d pair of ``nn.Sequential`` folded (the stem): the authors' conversion."""
    import copy

    if isinstance(model, RepMLPBlock):
        return model.deploy()
    out = copy.deepcopy(model)

    def convert(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, RepMLPBlock):
                setattr(module, name, child.deploy())
            elif isinstance(child, nn.Sequential) and len(child) >= 2 and isinstance(child[0], nn.Conv2d) \
                    and isinstance(child[1], nn.BatchNorm2d):
                conv: Any = child[0]
                weight, bias = _fuse_bn(conv.weight, conv.bias, child[1])
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  conv.dilation, conv.groups, True).to(conv.weight)
                with torch.no_grad():
                    fused.weight.copy_(weight)
                    assert fused.bias is not None
                    fused.bias.copy_(bias)
                setattr(module, name, nn.Sequential(fused, *list(child)[2:]))
            else:
                convert(child)

    convert(out)
    return out
