"""Random-architecture fuzzing of ``fxfuse.reparametrize``.

A Hypothesis strategy assembles small random nets from pieces fxfuse rewrites (conv-BN of random geometry,
RepVGG/ACNet/DBB-style branch sums in every add spelling, BN after sums, 1x1→kxk chains, concats, per-channel
constant affines, BN→conv, pad→conv, Linear/BN1d heads) and pieces it must NOT rewrite (BN without running
stats, BN before a padded conv, misaligned or nonlinear branches, intermediates with extra users, in-place adds
whose target is read later, avg-pools with count_include_pad=False or ceil_mode, shared modules).

Property: the result equals the original in float64 (max|Δ| ≤ 1e-10·max|y|) on the example input and on an
input of another batch size, verification rolled nothing back (a rollback would hide a wrong built-in rule),
the input model is untouched, and the result is a fixed point (no foldable conv→BN pair or mergeable
same-geometry conv pair is left, BN without running stats are all kept, no op count grows).

``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) runs thousands of nets; the ``ci`` profile 400 (``make test-all``), of
which the default run (``make test``) draws 120.
Also here: verification with bisecting rollback of a deliberately wrong user rule.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

import fxfuse
import fxfuse.models as M
from fxfuse import FusionError, Reason, RewriteContext
from fxfuse.ir import ConvRead, Reader, Refusal, shape_of
from fxfuse.ir.ops import real_users
from fxfuse.testing import assert_close_f64, assert_reparametrizes, conv_geometries, op_counts, randomize_batchnorm_

from _helpers import budget

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# examples per property test, by profile; the default run (make test) draws 120 of the ci profile's 400 random nets,
# --runslow (make test-all, make fuzz) all of them
N_NETS = budget(120, {"ci": 400, "dev": 500, "fuzz": 6000}.get(PROFILE, 400))
N_ROLLBACK_NETS = {"ci": 40, "dev": 60, "fuzz": 500}.get(PROFILE, 40)
N_DTYPE_NETS = {"ci": 30, "dev": 60, "fuzz": 600}.get(PROFILE, 30)


STATS: Counter = Counter()  # what the random nets exercised; written to $FXFUSE_FUZZ_STATS (JSON) if set


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if os.environ.get("FXFUSE_FUZZ_STATS") and STATS:
        # under pytest-xdist each worker saw only its share of the nets: one file per worker (PATH.gw0, ...)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        with open(os.environ["FXFUSE_FUZZ_STATS"] + (f".{worker}" if worker else ""), "w") as f:
            json.dump(dict(sorted(STATS.items())), f, indent=1)


# ====================================================================================== net pieces
class Post(nn.Module):
    """What follows a conv / sum: nothing, BN (module or ``F.batch_norm``), BN without running stats, or a
    per-channel constant affine in one of several spellings (buffers ``c``, ``d``)."""

    def __init__(self, kind: str, channels: int, gen: torch.Generator, eps: float = 1e-5, affine: bool = True,
                 spelling: int = 0) -> None:
        super().__init__()
        self.kind, self.spelling = kind, spelling
        if kind in ("bn", "fbn", "bn_nostats"):
            self.bn = nn.BatchNorm2d(channels, eps=eps, affine=affine, track_running_stats=kind != "bn_nostats")
        elif kind == "frozen":  # torchvision FrozenBatchNorm2d: buffers, scale computed in forward
            self.eps = eps
            self.register_buffer("w", torch.rand(channels, generator=gen) + 0.5)
            self.register_buffer("b", torch.randn(channels, generator=gen))
            self.register_buffer("rm", torch.randn(channels, generator=gen))
            self.register_buffer("rv", torch.rand(channels, generator=gen) + 0.5)
        elif kind == "affine":
            c = (torch.rand(channels, generator=gen) + 0.5) * (torch.randint(0, 2, (channels,), generator=gen) * 2 - 1)
            d = torch.randn(channels, generator=gen)
            shape = [(1, channels, 1, 1), (channels, 1, 1)][spelling % 2]
            self.register_buffer("c", c.reshape(shape))
            self.register_buffer("d", d.reshape(shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.kind in ("bn", "bn_nostats"):
            return self.bn(x)
        if self.kind == "fbn":
            return F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                                False, 0.1, self.bn.eps)
        if self.kind == "frozen":
            scale = self.w * (self.rv + self.eps).rsqrt()
            shift = self.b - self.rm * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        if self.kind == "affine":
            s = self.spelling
            if s == 0:
                return x * self.c + self.d
            if s == 1:
                return self.c * x + self.d
            if s == 2:
                return (x - self.d) / self.c
            if s == 3:
                return torch.mul(x, self.c).add(self.d)
            if s == 4:
                return x * self.c
            return self.d + x * 0.5
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, spelling={self.spelling}"


def _conv_call(conv: nn.Module, x: Tensor, functional: bool) -> Tensor:
    if functional:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv(x)


class ConvPost(nn.Module):
    """``act(post(conv(x)))``; the conv may be ``F.conv2d`` on the module's parameters, or transposed."""

    def __init__(self, conv: nn.Module, post: Post, act: int = 0, functional: bool = False,
                 pre_relu: bool = False, noop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv, self.post, self.functional, self.pre_relu = conv, post, functional, pre_relu
        self.act = nn.ReLU(inplace=act == 2) if act else None
        self.noop = noop

    def forward(self, x: Tensor, feats: Optional[List[Tensor]] = None) -> Tensor:
        if self.pre_relu:
            x = torch.relu(x)
        y = _conv_call(self.conv, x, self.functional)
        if self.noop is not None:
            y = self.noop(y)
        y = self.post(y)
        return self.act(y) if self.act is not None else y

    def extra_repr(self) -> str:
        return f"functional={self.functional}, pre_relu={self.pre_relu}"


class Branch(nn.Module):
    """One term of a sum: ``identity``, ``post`` (BN/affine of x), ``avg`` (AvgPool then post), ``conv``
    (ConvPost, possibly nonlinear), ``chain`` (1x1 → [BN | F.pad+BN | affine] → kxk → post), ``avgchain``
    (1x1 → [F.pad+BN] → AvgPool → post), ``se`` (conv-BN times a sigmoid gate of itself)."""

    def __init__(self, kind: str, **parts: Any) -> None:
        super().__init__()
        self.kind = kind
        self.pad = parts.pop("pad", None)
        self.spelling = parts.pop("spelling", 0)
        for k, v in parts.items():
            setattr(self, k, v)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if k == "identity":
            if self.spelling == 1:
                return x.view_as(x)  # an alias of x: an in-place add on it also mutates x
            if self.spelling == 2:
                return self.ident(x)
            return x
        if k == "post":
            return self.post(x)
        if k == "avg":
            return self.post(self.pool(x))
        if k == "conv":
            return self.body(x)
        if k in ("chain", "avgchain"):
            y = self.first(x)
            if self.pad is not None:
                y = F.pad(y, self.pad)
            y = self.mid(y)
            return self.post(self.second(y))
        if k == "se":
            y = self.body(x)
            return y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        raise AssertionError(k)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, pad={self.pad}, spelling={self.spelling}"


_SPELLINGS = ("add", "radd", "iadd", "torch_add", "torch_add_alpha", "method_add", "method_iadd", "sub",
              "torch_sub", "method_sub_alpha")


def _combine(acc: Tensor, o: Tensor, spelling: str, alpha: float) -> Tensor:
    if spelling == "add":
        return acc + o
    if spelling == "radd":
        return o + acc
    if spelling == "iadd":
        acc += o
        return acc
    if spelling == "torch_add":
        return torch.add(acc, o)
    if spelling == "torch_add_alpha":
        return torch.add(acc, o, alpha=alpha)
    if spelling == "method_add":
        return acc.add(o)
    if spelling == "method_iadd":
        return acc.add_(o)
    if spelling == "sub":
        return acc - o
    if spelling == "torch_sub":
        return torch.sub(acc, o)
    return acc.sub(o, alpha=alpha)


class Branches(nn.Module):
    """``act(post(Σ branches(x)))`` with a random add spelling per step; ``keep`` returns some branch outputs as
    extra network outputs (extra users)."""

    def __init__(self, branches: Sequence[Branch], spellings: Sequence[str], alphas: Sequence[float], post: Post,
                 act: int, keep: Sequence[int], keep_input: bool = False) -> None:
        super().__init__()
        self.keep_input = keep_input
        self.branches = nn.ModuleList(branches)
        self.spellings, self.alphas, self.keep = list(spellings), list(alphas), list(keep)
        self.post = post
        self.act = nn.ReLU() if act else None

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        if self.keep_input:
            feats.append(x)
        outs = [b(x) for b in self.branches]
        feats.extend(outs[i] for i in self.keep)
        acc = outs[0]
        for o, sp, a in zip(outs[1:], self.spellings, self.alphas):
            acc = _combine(acc, o, sp, a)
        y = self.post(acc)
        return self.act(y) if self.act is not None else y

    def extra_repr(self) -> str:
        return f"spellings={self.spellings}, alphas={self.alphas}, keep={self.keep}, keep_input={self.keep_input}"


class Concat(nn.Module):
    """``post(cat([branch(x) …], dim))``."""

    def __init__(self, branches: Sequence[Branch], dim: int, post: Post) -> None:
        super().__init__()
        self.branches, self.dim, self.post = nn.ModuleList(branches), dim, post

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        return self.post(torch.cat([b(x) for b in self.branches], dim=self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Shared(nn.Module):
    """One conv instance called twice: ``sum`` → post1(conv x) + post2(conv x); ``seq`` →
    post2(conv(relu(post1(conv x)))); ``plain`` → conv(conv(x))."""

    def __init__(self, conv: nn.Module, mode: str, post1: Post, post2: Post) -> None:
        super().__init__()
        self.conv, self.mode, self.post1, self.post2 = conv, mode, post1, post2

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        if self.mode == "sum":
            return self.post1(self.conv(x)) + self.post2(self.conv(x))
        if self.mode == "seq":
            return self.post2(self.conv(torch.relu(self.post1(self.conv(x)))))
        return self.conv(self.conv(x))

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class ExtraUser(nn.Module):
    """conv → post where the conv output (or the post output) has another user: returned as an extra output,
    an SE-like gate, or only shape reads (``torch._assert`` on ``.shape``/``.dim()``, which must not block)."""

    def __init__(self, conv: nn.Module, post: Post, mode: str, fc: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv, self.post, self.mode, self.fc = conv, post, mode, fc

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        c = self.conv(x)
        y = self.post(c)
        m = self.mode
        if m == "return_conv":
            feats.append(c)
        elif m == "return_post":
            feats.append(y)
            y = torch.relu(y)
        elif m == "se_conv":
            y = y * torch.sigmoid(c.mean((2, 3), keepdim=True))
        elif m == "se_fc":
            y = y * torch.sigmoid(self.fc(y.mean((2, 3))))[:, :, None, None]
        elif m == "meta":
            torch._assert(c.shape[1] == self.conv.out_channels, "channels")
            torch._assert(c.dim() == 4, "rank")
        return y

    def extra_repr(self) -> str:
        return f"mode={self.mode}"


class PreConv(nn.Module):
    """``post2(conv(pre(x)))``: BN / affine before a (possibly padded) conv."""

    def __init__(self, pre: Post, conv: nn.Module, post2: Post, pre_relu: bool) -> None:
        super().__init__()
        self.pre, self.conv, self.post2, self.pre_relu = pre, conv, post2, pre_relu

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        y = self.pre(x)
        if self.pre_relu:
            y = torch.relu(y)
        return self.post2(self.conv(y))

    def extra_repr(self) -> str:
        return f"pre_relu={self.pre_relu}"


class PadConv(nn.Module):
    """``post(conv(F.pad(x, pads, value=value)))`` (symmetric zero pads are absorbed; others must stay)."""

    def __init__(self, pads: Sequence[int], value: float, conv: nn.Module, post: Post, module: bool = False) -> None:
        super().__init__()
        self.pads, self.value, self.conv, self.post = list(pads), value, conv, post
        self.module = (nn.ZeroPad2d(self.pads) if value == 0 else nn.ConstantPad2d(self.pads, value)) \
            if module and len(self.pads) == 4 else None

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        if self.module is not None:
            return self.post(self.conv(self.module(x)))
        return self.post(self.conv(F.pad(x, self.pads, value=self.value)))

    def extra_repr(self) -> str:
        return f"pads={self.pads}, value={self.value}"


class Pool(nn.Module):
    """``post(conv1x1?(avg_pool(x)))``; exact as a conv only with count_include_pad and no ceil_mode."""

    def __init__(self, pool: nn.Module, conv: Optional[nn.Module], post: Post, functional: bool = False) -> None:
        super().__init__()
        self.pool, self.conv, self.post, self.functional = pool, conv, post, functional

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        p = self.pool
        if self.functional:
            y = F.avg_pool2d(x, p.kernel_size, p.stride, p.padding, p.ceil_mode, p.count_include_pad)
        else:
            y = p(x)
        if self.conv is not None:
            y = self.conv(y)
        return self.post(y)


class Head(nn.Module):
    """Global pooling → [BN1d] → Linear → [BN1d | affine] → [ReLU → Linear], or a token head
    (``[B, HW, C]`` → Linear → BN1d through ``flatten(0, 1)`` / ``reshape_as``)."""

    def __init__(self, mode: str, pool: int, pre: Optional[nn.Module], fc: nn.Module, post: Optional[nn.Module],
                 post_kind: str, fc2: Optional[nn.Module], gen: torch.Generator) -> None:
        super().__init__()
        self.mode, self.pool, self.pre, self.fc, self.post, self.post_kind, self.fc2 = \
            mode, pool, pre, fc, post, post_kind, fc2
        if post_kind == "affine":
            n = fc.out_features
            self.register_buffer("c", torch.rand(n, generator=gen) + 0.5)
            self.register_buffer("d", torch.randn(n, generator=gen))

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        if self.mode == "tokens":
            t = x.flatten(2).transpose(1, 2)
            y = self.fc(t)
            return self.post(y.flatten(0, 1)).reshape_as(y) if self.post is not None else y
        if self.pool == 0:
            v = x.mean((2, 3))
        elif self.pool == 1:
            v = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        else:
            v = x.flatten(2).mean(-1)
        if self.pre is not None:
            v = self.pre(v)
        y = self.fc(v)
        if self.post_kind == "bn":
            y = self.post(y)
        elif self.post_kind == "affine":
            y = y * self.c + self.d
        if self.fc2 is not None:
            y = self.fc2(torch.relu(y))
        return y

    def extra_repr(self) -> str:
        return f"mode={self.mode}, pool={self.pool}, post_kind={self.post_kind}"


class Ref(nn.Module):
    """A reference training-form block from ``fxfuse.models`` (RepVGG, ACNet, DBB, MobileOne, BN-after-sum)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        return self.block(x)


class FuzzNet(nn.Module):
    """Blocks in sequence; extra outputs collected by blocks are returned after the main one."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Any:
        feats: List[Tensor] = []
        for blk in self.blocks:
            x = blk(x, feats)
        if feats:
            return (x, *feats)
        return x


# ==================================================================================== the strategy
@dataclass
class Case:
    net: FuzzNet
    input: Tensor
    seed: int
    verify: bool = True  # verify=False: a wrong rewrite reaches the result (and the checker) directly
    horizontal: bool = False  # also enable the optional `horizontal` rule

    def __repr__(self) -> str:
        return (f"Case(seed={self.seed}, input={tuple(self.input.shape)}, verify={self.verify}, "
                f"horizontal={self.horizontal},\nnet={self.net})")


class _Builder:
    """Draws blocks while tracking the running ``[C, H, W]`` (by a dry run of each block)."""

    def __init__(self, draw: Callable, gen: torch.Generator, c: int, h: int, w: int, verify: bool) -> None:
        self.draw, self.gen, self.verify = draw, gen, verify
        self.c, self.h, self.w = c, h, w
        self.first = True  # the next block reads the network input (never mutate it)

    # -- small draws ---------------------------------------------------------------------------
    def post(self, channels: int, kinds: Sequence[str] = ("bn", "bn", "bn", "none", "affine", "fbn", "frozen",
                                                          "bn_nostats")) -> Post:
        d = self.draw
        kind = d(st.sampled_from(list(kinds)))
        return Post(kind, channels, self.gen, eps=d(st.sampled_from([1e-5, 1e-3, 0.1])), affine=d(st.booleans()),
                    spelling=d(st.integers(0, 5)))

    def stride(self) -> int:
        return self.draw(st.sampled_from([1, 2])) if min(self.h, self.w) >= 6 else 1

    def geometry(self, cin: int, *, padding: str = "same", stride: Optional[int] = None, cout: Optional[int] = None,
                 kernels: Sequence[int] = (1, 3, 5)):
        geo = self.draw(conv_geometries(in_channels=cin, out_channels=cout, max_channels_per_group=4,
                                        max_groups=3, kernel_sizes=kernels, asymmetric=True,
                                        strides=[stride] if stride else [self.stride()], padding=padding))
        out = geo.output_size((self.h, self.w))
        if min(out) < 3 or any(m > n for m, n in zip(geo.min_input_size(), (self.h, self.w))):
            geo = type(geo)(geo.in_channels, geo.out_channels, geo.kernel_size, geo.stride,
                            tuple(d * (k - 1) // 2 for d, k in zip(geo.dilation, geo.kernel_size)), geo.dilation,
                            geo.groups, geo.bias)
        return geo

    def act(self) -> int:
        return self.draw(st.sampled_from([0, 0, 1, 2]))

    # -- blocks --------------------------------------------------------------------------------
    def conv_post(self) -> nn.Module:
        d = self.draw
        if d(st.integers(0, 6)) == 0 and max(self.h, self.w) <= 8:  # transposed conv (grouped → §2.6)
            g = d(st.sampled_from([g for g in (1, 2, 3) if self.c % g == 0]))
            cout = g * d(st.integers(1, 3))
            s, k = d(st.sampled_from([1, 2])), d(st.sampled_from([1, 2, 3]))
            dil = d(st.sampled_from([1, 2]))
            p = d(st.integers(0, dil * (k - 1) // 2))
            op = d(st.integers(0, max(s, dil) - 1)) if s > 1 else 0
            conv = nn.ConvTranspose2d(self.c, cout, k, s, p, op, g, d(st.booleans()), dil)
            return ConvPost(conv, self.post(cout, ("bn", "bn", "affine", "fbn", "none")), self.act())
        geo = self.geometry(self.c, padding="any")
        noop = d(st.sampled_from([None, None, None, nn.Identity(), nn.Dropout(0.5)]))
        return ConvPost(geo.conv(), self.post(geo.out_channels), self.act(), functional=d(st.integers(0, 4)) == 0,
                        noop=noop)

    def branch(self, kind: str, cout: int, s: int) -> Branch:
        d, c = self.draw, self.c
        if kind == "identity":
            spelling = d(st.integers(0, 2))
            return Branch("identity", spelling=spelling, ident=nn.Identity()) if spelling == 2 else \
                Branch("identity", spelling=spelling)
        if kind == "post":
            return Branch("post", post=self.post(c, ("bn", "bn", "affine", "fbn", "bn_nostats")))
        if kind == "avg":
            pool = nn.AvgPool2d(3, s, 1, count_include_pad=d(st.sampled_from([True, True, False])))
            return Branch("avg", pool=pool, post=self.post(c, ("bn", "none", "affine")))
        if kind in ("conv", "conv_relu", "conv_on_relu", "se", "offcentre"):
            if kind == "offcentre":  # stride-2 kernel-2 conv: same output size, window centre off by one
                pad = tuple(0 if n % 2 == 0 else 1 for n in (self.h, self.w))
                conv = nn.Conv2d(c, cout, 2, 2, pad, bias=d(st.booleans()))
                return Branch("conv", body=ConvPost(conv, self.post(cout, ("bn", "none"))))
            geo = self.geometry(c, cout=cout, stride=s)
            act = 1 if kind == "conv_relu" else 0
            body = ConvPost(geo.conv(), self.post(cout, ("bn", "bn", "bn", "none", "affine", "fbn", "bn_nostats")),
                            act, functional=d(st.integers(0, 5)) == 0, pre_relu=kind == "conv_on_relu")
            return Branch("se" if kind == "se" else "conv", body=body)
        if kind == "chain":
            mid_ch = d(st.integers(1, 6))
            first = nn.Conv2d(c, mid_ch, 1, bias=d(st.booleans()))
            mid_kind = d(st.sampled_from(["none", "bn", "padbn", "affine"]))
            k = d(st.sampled_from([(3, 3), (1, 3), (3, 1), (5, 5), (1, 1)]))
            centre = (k[0] // 2, k[1] // 2)
            g = d(st.sampled_from([g for g in (1, 2, 3) if mid_ch % g == 0 and cout % g == 0]))
            if mid_kind == "padbn":
                pad, second_pad = [centre[1], centre[1], centre[0], centre[0]], 0
                mid: nn.Module = self.post(mid_ch, ("bn",))
            else:
                pad, second_pad = None, centre
                mid = self.post(mid_ch, (mid_kind,)) if mid_kind != "none" else nn.Identity()
            second = nn.Conv2d(mid_ch, cout, k, s, second_pad, groups=g, bias=d(st.booleans()))
            return Branch("chain", first=first, mid=mid, second=second, pad=pad,
                          post=self.post(cout, ("bn", "bn", "none")))
        if kind == "avgchain":
            first = nn.Conv2d(c, cout, 1, bias=d(st.booleans()))
            padbn = d(st.booleans())
            pool = nn.AvgPool2d(3, s, 0 if padbn else 1)
            mid = self.post(cout, ("bn",)) if padbn else nn.Identity()
            return Branch("avgchain", first=first, mid=mid, second=pool, pad=[1, 1, 1, 1] if padbn else None,
                          post=self.post(cout, ("bn", "none")))
        raise AssertionError(kind)

    def branches(self) -> nn.Module:
        d = self.draw
        s = self.stride()
        same = d(st.booleans()) or s == 1 and d(st.booleans())
        cout = self.c if same else d(st.integers(1, 8))
        kinds = ["conv", "conv", "conv", "chain", "avgchain", "conv_relu", "conv_on_relu", "se"]
        if cout == self.c:
            kinds += ["avg"]
            if s == 1:
                kinds += ["identity", "identity", "post"]
        if s == 2:
            kinds += ["offcentre"]
        n = d(st.integers(2, 4))
        picked = [d(st.sampled_from(kinds)) for _ in range(n)]
        branches = [self.branch(k, cout, s) for k in picked]
        keep = [i for i in range(n) if picked[i] != "identity" and d(st.integers(0, 9)) == 0]
        keep_input = not self.first and d(st.integers(0, 4)) == 0
        spellings, alphas = [], []
        aliased = 0 in keep or picked[0] == "identity"  # the running sum is a tensor also read elsewhere
        for _i in range(1, n):
            options = list(_SPELLINGS)
            if aliased and picked[0] == "identity" and self.first:
                options = [o for o in options if o not in ("iadd", "method_iadd")]  # never mutate the net's input
            if aliased and not self.verify:
                # `a += b` on a tensor read elsewhere traces as an out-of-place add (torch.fx): only verification
                # can notice that the trace is unfaithful (then the model is rewritten per sub-module)
                options = [o for o in options if o != "iadd"]
            spellings.append(d(st.sampled_from(options)))
            alphas.append(d(st.sampled_from([0.5, -1.0, 2.0, 1.0])))
            aliased = aliased and spellings[-1] in ("iadd", "method_iadd")  # out-of-place adds make a new tensor
        post = self.post(cout, ("none", "none", "bn", "bn", "affine", "bn_nostats"))
        return Branches(branches, spellings, alphas, post, d(st.sampled_from([0, 1])), keep, keep_input)

    def concat(self) -> nn.Module:
        d = self.draw
        s = self.stride()
        kinds = ["conv", "conv", "conv", "conv_relu"] + (["identity"] if s == 1 else ["offcentre"])
        n = d(st.integers(2, 3))
        branches = []
        for k in (d(st.sampled_from(kinds)) for _ in range(n)):
            cout = d(st.integers(1, 4))
            if k == "conv" and d(st.booleans()):  # dense, aligned 3x3 / 1x1: the concat rule's case
                conv = nn.Conv2d(self.c, cout, d(st.sampled_from([1, 3])), s, bias=d(st.booleans()))
                conv.padding = (conv.kernel_size[0] // 2,) * 2
                branches.append(Branch("conv", body=ConvPost(conv, self.post(cout, ("bn", "none", "affine")))))
            else:
                branches.append(self.branch(k, cout, s))
        total = sum(_run_shape(b, self.c, self.h, self.w)[0] for b in branches)
        return Concat(branches, d(st.sampled_from([1, -3])),
                      self.post(total, ("none", "bn", "bn", "affine", "bn_nostats")))

    def shared(self) -> nn.Module:
        d = self.draw
        mode = d(st.sampled_from(["sum", "seq", "plain"]))
        if mode == "plain" and d(st.booleans()):
            conv = nn.Conv2d(self.c, self.c, 1, bias=d(st.booleans()))
        else:
            conv = self.geometry(self.c, cout=self.c, stride=1).conv()
        return Shared(conv, mode, self.post(self.c), self.post(self.c))

    def extra_user(self) -> nn.Module:
        d = self.draw
        geo = self.geometry(self.c, padding="any")
        mode = d(st.sampled_from(["return_conv", "return_post", "se_conv", "se_fc", "meta"]))
        fc = nn.Linear(geo.out_channels, geo.out_channels) if mode == "se_fc" else None
        return ExtraUser(geo.conv(), self.post(geo.out_channels, ("bn", "bn", "fbn", "affine")), mode, fc)

    def pre_conv(self) -> nn.Module:
        d = self.draw
        pre = self.post(self.c, ("bn", "bn", "affine", "fbn", "bn_nostats"))
        geo = self.geometry(self.c, padding=d(st.sampled_from(["any", "valid", "same"])))
        return PreConv(pre, geo.conv(), self.post(geo.out_channels, ("bn", "none")), d(st.integers(0, 4)) == 0)

    def pad_conv(self) -> nn.Module:
        d = self.draw
        p = d(st.integers(0, 2))
        q = d(st.integers(0, 2))
        pads = d(st.sampled_from([[p, p, q, q], [p, p], [p, q, q, p], [p, p, p, p]]))
        value = d(st.sampled_from([0.0, 0.0, 0.0, 1.5]))
        geo = self.geometry(self.c, padding=d(st.sampled_from(["valid", "same", "any"])), stride=1)
        return PadConv(pads, value, geo.conv(), self.post(geo.out_channels), d(st.booleans()))

    def pool(self) -> nn.Module:
        d = self.draw
        k = d(st.sampled_from([2, 3]))
        s = self.stride()
        pad = d(st.integers(0, k // 2)) if min(self.h, self.w) >= 5 else k // 2  # keep the output ≥ 3 wide
        pool = nn.AvgPool2d(k, s, pad, ceil_mode=d(st.sampled_from([False, False, True])),
                            count_include_pad=d(st.sampled_from([True, True, False])))
        conv = None
        cout = self.c
        if d(st.booleans()):
            cout = d(st.integers(1, 6))
            conv = nn.Conv2d(self.c, cout, 1, bias=d(st.booleans()))
        return Pool(pool, conv, self.post(cout, ("bn", "none", "affine")), d(st.booleans()))

    def head(self) -> nn.Module:
        d = self.draw
        mode = d(st.sampled_from(["pool", "pool", "tokens"]))
        features = d(st.integers(1, 6))
        fc = nn.Linear(self.c, features, bias=d(st.booleans()))
        if mode == "tokens":
            post = nn.BatchNorm1d(features, eps=d(st.sampled_from([1e-5, 0.1]))) if d(st.booleans()) else None
            return Head("tokens", 0, None, fc, post, "bn", None, self.gen)
        pre = nn.BatchNorm1d(self.c) if d(st.booleans()) else None
        post_kind = d(st.sampled_from(["bn", "affine", "none"]))
        post = nn.BatchNorm1d(features, affine=d(st.booleans())) if post_kind == "bn" else None
        fc2 = nn.Linear(features, d(st.integers(1, 4))) if d(st.booleans()) else None
        return Head("pool", d(st.integers(0, 2)), pre, fc, post, post_kind, fc2, self.gen)

    def reference(self) -> nn.Module:
        d, c = self.draw, self.c
        name = d(st.sampled_from(["repvgg", "acnet", "dbb", "mobileone", "bn_after_sum"]))
        s = self.stride()
        g = d(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        cout = c if d(st.booleans()) else g * d(st.integers(1, 3))
        if name == "repvgg":
            return Ref(M.RepVGGBlock(c, cout, s, g))
        if name == "acnet":
            return Ref(M.ACBlock(c, cout, d(st.sampled_from([3, 5])) if min(self.h, self.w) >= 5 else 3, s, g))
        if name == "dbb":
            k = d(st.sampled_from([1, 3, 5])) if min(self.h, self.w) >= 5 else d(st.sampled_from([1, 3]))
            return Ref(M.DBBBlock(c, cout, k, s, g, internal_channels=d(st.sampled_from([None, g, 2 * g]))))
        if name == "mobileone":
            return Ref(M.MobileOneUnit(c, cout, d(st.sampled_from([1, 3])), s, g,
                                       num_conv_branches=d(st.integers(1, 3))))
        return Ref(M.BNAfterSumBlock(c, cout, s, g))

    def add(self, blk: nn.Module) -> nn.Module:
        self.first = False
        self.c, self.h, self.w = _run_shape(blk, self.c, self.h, self.w)
        return blk


def _run_shape(blk: nn.Module, c: int, h: int, w: int) -> Tuple[int, int, int]:
    """Output ``(C, H, W)`` of ``blk`` on a ``[2, c, h, w]`` input (dry run; batch 2 for BN without stats)."""
    with torch.no_grad():
        blk.eval()
        y = blk(torch.randn(2, c, h, w), []) if not isinstance(blk, Branch) else blk(torch.randn(2, c, h, w))
    return (y.shape[1], y.shape[2], y.shape[3]) if y.dim() == 4 else (y.shape[-1], 0, 0)


BLOCKS = ("conv_post", "conv_post", "branches", "branches", "branches", "concat", "shared", "extra_user",
          "pre_conv", "pad_conv", "pool", "reference")


@st.composite
def random_nets(draw: Callable, max_blocks: int = 4) -> Case:
    """A random :class:`FuzzNet` with random weights and BN statistics, and an example input."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    c, h, w = draw(st.integers(1, 6)), draw(st.integers(3, 10)), draw(st.integers(3, 10))
    verify = draw(st.integers(0, 3)) > 0
    b = _Builder(draw, gen, c, h, w, verify)
    blocks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draw(st.integers(1, max_blocks))):
            kind = draw(st.sampled_from(BLOCKS))
            blocks.append(b.add(getattr(b, kind)()))
        if draw(st.integers(0, 3)) == 0:
            blocks.append(b.add(b.head()))
        net = FuzzNet(blocks).eval()
        randomize_batchnorm_(net, seed)
    x = torch.randn(draw(st.integers(1, 3)), c, h, w, generator=gen)
    return Case(net, x, seed, verify=verify, horizontal=draw(st.integers(0, 3)) == 0)


# ================================================================================= structure checks
def _bn_without_stats(gm: fx.GraphModule) -> int:
    """BatchNorms that normalize by batch statistics, in any spelling: a module without running statistics, and
    what ``torch.export`` makes of one (``aten.batch_norm(x, w, b, None, None, training=True)``)."""
    read = Reader(gm)
    return sum(1 for n in gm.graph.nodes
               if isinstance(bn := read.affine(n), Refusal) and bn.code is Reason.BATCH_STATISTICS)


def assert_fixed_point(original: nn.Module, fused: fx.GraphModule) -> None:
    """No op count grows, every BN without running stats survives, and no conv→BN pair with a single-use conv,
    nor a sum of two same-geometry convs on one input, is left for the rules."""
    traced = fx.symbolic_trace(copy.deepcopy(original).eval())  # (as reparametrize sees it: a BN in eval mode)
    before, after = op_counts(traced), op_counts(fused)
    for kind in ("conv", "batch_norm", "avg_pool", "linear"):
        assert after[kind] <= before[kind], f"{kind} count grew {before[kind]} -> {after[kind]}"
    assert _bn_without_stats(fused) == _bn_without_stats(traced), "a BN without running statistics was folded"
    read = Reader(fused)
    for node in fused.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        mod = read.module(node)
        is_bn = (isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats) \
            or (node.op == "call_function" and node.target is F.batch_norm)
        if is_bn and isinstance(node.args[0], fx.Node):
            conv = read.conv(node.args[0])
            linear = read.linear(node.args[0]) if conv is None else None
            shape = shape_of(node)
            if (isinstance(conv, ConvRead) or linear is not None) and len(real_users(node.args[0])) == 1 \
                    and (conv is not None or (shape is not None and len(shape) == 2)):
                raise AssertionError(f"{node.args[0].name} → {node.name} left unfolded:\n{fused.graph}")
        parsed = read.sum(node) if node.op != "call_module" else None
        if parsed is not None:
            (_, a), (_, b) = parsed.terms
            ra, rb = read.conv(a), read.conv(b)
            if (isinstance(ra, ConvRead) and isinstance(rb, ConvRead) and ra.kind == rb.kind == "conv"
                    and ra.input is rb.input and a is not b
                    and len(real_users(a)) == 1 and len(real_users(b)) == 1
                    and ra.spec.padding_mode == rb.spec.padding_mode == "zeros"
                    and (ra.spec.stride, ra.spec.padding, ra.spec.dilation, ra.spec.kernel_size, ra.spec.groups)
                    == (rb.spec.stride, rb.spec.padding, rb.spec.dilation, rb.spec.kernel_size, rb.spec.groups)):
                raise AssertionError(f"{a.name} + {b.name} (same geometry, same input) left unmerged:\n"
                                     f"{fused.graph}")


# ====================================================================================== properties
@settings(max_examples=N_NETS, suppress_health_check=list(HealthCheck))
@given(random_nets())
def test_random_nets_reparametrize_exactly(case: Case) -> None:
    # atol: outputs that are exactly 0 up to rounding (a mean over a batch-normalized map) have no relative scale
    fused = assert_reparametrizes(case.net, case.input, expect_batch_norms=None, rtol=1e-10, atol=1e-12,
                                  randomize=False,
                                  verify=case.verify, enable=["horizontal"] if case.horizontal else [])
    report = fused.fxfuse_report
    STATS["nets"] += 1
    STATS["nets with a rewrite"] += bool(report.fused)
    STATS["nets not traced whole (unfaithful trace)"] += not report.traced_whole
    STATS["nets with verify=False"] += not case.verify
    STATS.update({f"rewrites: {k}": v for k, v in report.fused.items()})
    STATS.update("left unfused: " + re.sub(r"[\w.]*[_\d][\w.]*", "<n>", u.reason.split(" (")[0])[:80]
                 for u in report.unfused)
    if report.traced_whole:
        assert isinstance(fused, fx.GraphModule)
        assert_fixed_point(case.net, fused)
    else:  # only where torch.fx cannot represent the model: `a += b` on a tensor that is also returned
        assert "traced graph itself differs" in report.submodules["<root>"], report.submodules


def check_runs_in_own_dtype(case: Case, dtype: torch.dtype, capture: str) -> None:
    """The dtype audit and artifact check (docs/patterns.md, "The returned model") on random nets cast to float32 /
    bfloat16: the returned model ran in that dtype
    (``report.artifact_check``), every tensor reachable from it (parameters, buffers, plain attributes, graph
    constants — e.g. a frozen BN's ``w·(rv+ε).rsqrt()`` left unfolded) has that dtype and no Proxy is left, its
    outputs have the original's dtypes, and each output is as close to the float64 truth as the original's in that
    dtype: ``max|out − ref| ≤ 2·max|own − ref| + 4·sens + 16·eps·max(max|ref|, 1)``. ``sens`` is how far the float64
    original moves when its weights and input are perturbed by ``eps`` relative noise (:func:`_rounding_sensitivity`):
    the scale of that dtype's rounding on this net and input, cancellations and batch-statistics normalizations
    included. The floor covers outputs that are 0 up to rounding and the accumulation order of a fused conv's one
    reduction: the fuzz profile found exact rewrites (a horizontal merge or branch sum before a BatchNorm without
    running statistics) whose float32 outputs were 5.7 and 12.9·eps·max|ref| off where the originals happened to be
    0.65–1.8·eps·max|ref| off, while the same fused weights run in float64 were 0.016–0.04·eps·max|ref| off (the
    weights are right; oneDNN's reduction order for the merged conv differs, and the batch normalization amplifies
    it); ``sens`` there was 1–3.8·eps·max|ref|. A wrong rewrite is the float64 property's to catch (1e-10); this one
    catches a returned model whose dtype handling costs accuracy beyond rounding."""
    from _reachable import floating_dtypes, wrong_dtypes

    net, x = copy.deepcopy(case.net).to(dtype), case.input.to(dtype)
    with torch.no_grad():
        own = net(x)
        ref = copy.deepcopy(case.net).double()(case.input.double())
    fused = fxfuse.reparametrize(net, x, verify=case.verify, enable=["horizontal"] if case.horizontal else [],
                                 capture=capture)
    report = fused.fxfuse_report
    name = str(dtype).replace("torch.", "")
    assert report.artifact_check is not None and report.artifact_check.startswith(f"ran in {name}"), report
    assert wrong_dtypes(fused, floating_dtypes(net), dtype) == {}, report
    with torch.no_grad():
        out = fused(x)
    eps = torch.finfo(dtype).eps
    outs, owns, refs, moved = (o if isinstance(o, tuple) else (o,)
                               for o in (out, own, ref, _rounding_sensitivity(case, eps)))
    assert len(outs) == len(owns) == len(refs) == len(moved)
    for i, (o, w, r, m) in enumerate(zip(outs, owns, refs, moved)):
        assert o.dtype == w.dtype == dtype, (i, o.dtype, w.dtype)
        err_fused, err_own = (float((t.double() - r).abs().max()) for t in (o, w))
        sens = float((m - r).abs().max())
        floor = 16 * eps * max(float(r.abs().max()), 1.0)
        assert err_fused <= 2 * err_own + 4 * sens + floor, (i, err_fused, err_own, sens, floor, str(report))


def _rounding_sensitivity(case: Case, eps: float) -> Any:
    """The float64 original's output with every floating weight, buffer and input element multiplied by
    ``1 + eps·z`` (``z`` standard normal, fixed seed)."""
    net = copy.deepcopy(case.net).double()
    gen = torch.Generator().manual_seed(0)

    def nudge(t: Tensor) -> Tensor:
        return t * (1 + eps * torch.randn(t.shape, generator=gen, dtype=t.dtype)) if t.is_floating_point() else t

    state = {k: nudge(t) for k, t in [*net.named_parameters(), *net.named_buffers()]}
    with torch.no_grad():
        return torch.func.functional_call(net, state, (nudge(case.input.double()),))


@settings(max_examples=N_DTYPE_NETS, suppress_health_check=list(HealthCheck))
@given(random_nets(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_nets_run_in_their_own_dtype(case: Case, dtype: torch.dtype) -> None:
    """Symbolic capture (and its sub-module fallback): ~0.2 s a net."""
    check_runs_in_own_dtype(case, dtype, "symbolic")


@pytest.mark.slow
@settings(max_examples=10 * N_DTYPE_NETS, suppress_health_check=list(HealthCheck))
@given(random_nets(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_random_nets_run_in_their_own_dtype_any_capture(case: Case, dtype: torch.dtype) -> None:
    """The default ``capture="auto"`` (export tried where symbolic tracing leaves work: seconds a net)."""
    check_runs_in_own_dtype(case, dtype, "auto")


# ---------------------------------------------------------------------------- rollback of bad rules
EPS_BLIND = "eps_blind_conv_bn"


@pytest.fixture
def eps_blind_rule() -> Iterator[str]:
    """A user rule with a classic bug: folds conv → BatchNorm2d with ε = 1e-5 whatever the BN's ε is. Exact for
    BNs with ε = 1e-5, wrong for the others. Registered disabled, before conv_bn, and unregistered after."""

    @fxfuse.register_rule(EPS_BLIND, enabled=False, before="conv_bn")
    def eps_blind(ctx: RewriteContext, node: fx.Node):
        mod = ctx.read.module(node)
        if not isinstance(mod, nn.BatchNorm2d) or not mod.track_running_stats:
            return None
        conv = ctx.read.conv(node.args[0])
        if not isinstance(conv, ConvRead) or conv.kind != "conv" or ctx.single_user(node.args[0]) is not node:
            return None
        mean, var = mod.running_mean.double(), mod.running_var.double()
        scale = torch.rsqrt(var + 1e-5)  # BUG: ignores mod.eps
        if mod.weight is not None:
            scale = scale * mod.weight.double()
        shift = -scale * mean + (mod.bias.double() if mod.bias is not None else 0.0)
        spec = conv.spec.with_(weight=conv.spec.weight * scale[:, None, None, None],
                               bias=scale * conv.spec.bias + shift)

        def rewrite() -> None:
            ctx.replace(node, ctx.insert_conv(spec, conv.input, before=node, like=conv.like),
                        consumed=[node.args[0]])

        return rewrite

    yield EPS_BLIND
    fxfuse.unregister_rule(EPS_BLIND)
    assert all(r.name != EPS_BLIND for r in fxfuse.registered_rules())


class RollbackNet(nn.Module):
    """stem conv-BN(ε=1e-5) → ReLU → RepVGG block [3x3-BN(ε=0.1) + 1x1-BN(ε=1e-5) + BN(ε=1e-3)] → ReLU →
    conv-BN(ε=0.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-5)
        self.b3, self.b3_bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=0.1)
        self.b1, self.b1_bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, eps=1e-5)
        self.id_bn = nn.BatchNorm2d(4, eps=1e-3)
        self.last, self.last_bn = nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2, eps=0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.b3_bn(self.b3(x)) + self.b1_bn(self.b1(x)) + self.id_bn(x))
        return self.last_bn(self.last(x))


def test_verification_rolls_back_only_the_wrong_rewrites(eps_blind_rule: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(RollbackNet(), seed=1).double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)

    unverified = fxfuse.reparametrize(model, x, enable=[eps_blind_rule], verify=False)
    with pytest.raises(AssertionError, match="max abs error"):  # the rule really is wrong
        assert_close_f64(model(x), unverified(x))

    fused = fxfuse.reparametrize(model, x, enable=[eps_blind_rule])
    report = fused.fxfuse_report
    # equal to the original, on the example and on another batch size
    for inp in (x, torch.randn(5, 3, 8, 7, dtype=torch.float64)):
        assert_close_f64(model(inp), fused(inp), rtol=1e-10)
    # exactly the folds of BNs whose ε ≠ 1e-5 were undone ...
    assert sorted(report.rolled_back) == [f"{eps_blind_rule}:b3_bn", f"{eps_blind_rule}:last_bn"]
    assert report.warnings and "rolled back" in report.warnings[-1]
    # ... the correct ones stayed applied, the denied BNs were folded by conv_bn instead, and the block merged
    assert report.fused[eps_blind_rule] == 2 and f"{eps_blind_rule}:stem_bn" in report.applied
    assert f"{eps_blind_rule}:b1_bn" in report.applied
    assert report.fused["conv_bn"] == 2 and report.fused["branch_sum"] == 1
    counts = op_counts(fused)
    assert (counts["conv"], counts["batch_norm"]) == (3, 0)
    assert report.verified and report.max_rel_error <= 1e-10
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_rollback_budget_exhausted_raises(eps_blind_rule: str) -> None:
    torch.manual_seed(0)  # (a wrong fold whose effect a ReLU zeroes on the example input is not detectable)
    model = randomize_batchnorm_(RollbackNet(), seed=1).double().eval()
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    with pytest.raises(FusionError, match="after 1 rollbacks"):  # two wrong rewrites, budget for one
        fxfuse.reparametrize(model, x, enable=[eps_blind_rule], max_rollbacks=1, capture="symbolic", fallback=False)
    # capture="auto" does not give up while another capture works (here export: the user's rule reads only the
    # symbolic spelling of a BN), and says why symbolic tracing was dropped.
    other = fxfuse.reparametrize(model, x, enable=[eps_blind_rule], max_rollbacks=1)
    report = other.fxfuse_report
    assert report.capture in ("export", "submodules") and report.verified
    assert [c.code for c in report.captures if c.capture == "symbolic"] == [Reason.REWRITE_FAILED]
    with torch.no_grad():
        assert_close_f64(model(x), other(x), rtol=1e-10)
    assert len(fxfuse.reparametrize(model, x, enable=[eps_blind_rule], max_rollbacks=2).fxfuse_report.rolled_back) == 2


def _bn_eps_by_node(model: nn.Module) -> dict:
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    return {n.name: mods[n.target].eps for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods[n.target], nn.BatchNorm2d)}


@settings(max_examples=N_ROLLBACK_NETS, suppress_health_check=list(HealthCheck))
@given(random_nets(max_blocks=3))
def test_random_nets_rollback_blames_only_wrong_rewrites(eps_blind_rule: str, case: Case) -> None:
    """With the buggy rule on, the result still equals the original on the example input, and bisection never
    blames a correct rewrite (every rolled-back fold is of a BN with ε ≠ 1e-5)."""
    model = case.net.double()
    x = case.input.double()
    fused = fxfuse.reparametrize(model, x, enable=[eps_blind_rule], max_rollbacks=64, atol=1e-12)
    assert_close_f64(model(x), fused(x), rtol=1e-9, atol=1e-12)
    report = fused.fxfuse_report
    for key in report.rolled_back:
        # "rule:node", or "path.rule:node" for a sub-module rewritten by the fallback (node named in its graph)
        where, node = key.split(":", 1)
        path, _, rule = where.rpartition(".")
        eps = _bn_eps_by_node(model.get_submodule(path) if path else model)
        assert rule == eps_blind_rule and eps[node] != 1e-5, f"correct rewrite {key} was rolled back"
    assert len(report.rolled_back) <= sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                                          and m.eps != 1e-5)


# ------------------------------------------------------------------ regressions found by the fuzzer
class _InPlaceOnLeftover(nn.Module):
    """``t0.add_(bn(conv1(x))) + bn2(x)`` where t0 (BN with batch statistics) cannot merge: the in-place node
    used to stay in the graph after the merge and add its operand a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2, track_running_stats=False)
        self.c1, self.bn1 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        t0 = self.bn0(self.c0(x))
        return t0.add_(self.bn1(self.c1(x))) + self.bn2(x)


class _InPlaceRootWithKeptTerm(nn.Module):
    """``(t0 + t1).add_(bn2(x))`` with t0 also returned: the unmerged in-place root used to stay, be matched
    again every sweep and add a conv each time (4 → 53 convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.c1, self.bn1 = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x: Tensor):
        t0 = self.bn0(self.c0(x))
        return (t0 + self.bn1(self.c1(x))).add_(self.bn2(x)), t0


class _InPlaceOnAlias(nn.Module):
    """``x.view_as(x).add_(…)`` also changes x, which the other branch and the second output read afterwards:
    the sum must not be merged (it was, and only verification caught it)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(2, 2, 1)
        self.c1, self.bn = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.c2 = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor):
        x = self.pre(x)
        y = x.view_as(x).add_(self.bn(self.c1(x)))
        return y + self.c2(x), x


@pytest.mark.parametrize("verify", [False, True])
def test_inplace_add_regressions(verify: bool) -> None:
    x = torch.randn(2, 2, 5, 4)
    assert_reparametrizes(_InPlaceOnLeftover(), x, verify=verify, expect_convs=2, expect_batch_norms=1,
                          expect_fused={"conv_bn": 1, "branch_sum": 1})
    assert_reparametrizes(_InPlaceRootWithKeptTerm(), x, verify=verify, expect_convs=2, expect_batch_norms=0,
                          expect_fused={"conv_bn": 2, "branch_sum": 1})
    fused = assert_reparametrizes(_InPlaceOnAlias(), x, verify=verify, expect_convs=3, expect_batch_norms=0,
                                  expect_fused={"conv_bn": 1, "branch_sum": 0})
    assert any(u.code is Reason.ALIASING and "may alias" in u.reason for u in fused.fxfuse_report.unfused)


class _AppendThenAdd(nn.Module):
    """Appends a tensor to a list argument, then ``+=`` on it: equal on its own return value when traced (fx
    records ``+=`` as an out-of-place add), but the list now holds a different tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv_b, self.bn_b = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        a = self.bn_a(self.conv_a(x))
        feats.append(a)
        a += self.bn_b(self.conv_b(x))
        return a


class _SideEffectNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _AppendThenAdd()
        self.head = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))

    def forward(self, x: Tensor):
        feats: List[Tensor] = []
        y = self.body(x, feats)
        return self.head(y), feats[0]


def test_fallback_undoes_submodule_rewrite_with_side_effects() -> None:
    """Found by the fuzzer: reparametrize raised FusionError although the unchanged model is an equal one."""
    fused = assert_reparametrizes(_SideEffectNet(), torch.randn(2, 2, 5, 5), expect_batch_norms=2,
                                  expect_fused={"conv_bn": 1}, capture="symbolic")  # export fuses it whole
    report = fused.fxfuse_report
    assert not report.traced_whole and report.submodules["body"].startswith("rewrite undone")
    assert report.submodules["head"].startswith("rewritten")


class _TwoPointwisePlusSeparable(nn.Module):
    """1x1-BN + 1x1-BN + grouped 1x5-BN on one input: merging all three would expand the 1x5 to a dense kernel
    (more work), but the two 1x1 branches merge for free. Found by the fixed-point check (left as 3 convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.c = nn.Sequential(nn.Conv2d(4, 4, (1, 5), padding=(0, 2), groups=4, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.c(x) - self.b(x)


def test_identical_geometry_branches_merge_when_the_full_merge_adds_work() -> None:
    fused = assert_reparametrizes(_TwoPointwisePlusSeparable(), torch.randn(2, 4, 5, 7), expect_convs=2,
                                  expect_fused={"conv_bn": 3, "branch_sum": 1})
    assert_fixed_point(_TwoPointwisePlusSeparable(), fused)
