"""Tests for fxfuse.models: structure of the training-form reference nets, their plain twins,
and randomize_batchnorm_. Big configs are checked on the meta device (no memory, no compute)."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fxfuse.models as M
from fxfuse.models import (
    ACBlock,
    BNAfterSumBlock,
    DBBBlock,
    MobileOneBlock,
    MobileOneUnit,
    RepVGGBlock,
    build,
    default_input_shape,
    names,
    plain_twin,
    randomize_batchnorm_,
    reparam_blocks,
)
from fxfuse.testing import assert_close_f64

SMALL = ["acnet", "dbb", "mobileone", "bn-after-sum"]
FULL_REPVGG = ["A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g2", "B2g4", "B3", "B3g2", "B3g4"]
# Nets cheap enough to build with real weights and run on CPU.
REAL = ["repvgg-A0", "repvgg-article", "repvgg-tiny", "repvgg-tiny_g2", *SMALL]

# (stem width, stage widths) from the paper's Table 2 / official code.
WIDTHS = {
    "A0": (48, (48, 96, 192, 1280)),
    "A1": (64, (64, 128, 256, 1280)),
    "A2": (64, (96, 192, 384, 1408)),
    "B0": (64, (64, 128, 256, 1280)),
    "B1": (64, (128, 256, 512, 2048)),
    "B2": (64, (160, 320, 640, 2560)),
    "B3": (64, (192, 384, 768, 2560)),
}
# Deploy-form parameter counts (millions, truncated to 2 decimals) reported in the RepVGG paper.
PAPER_DEPLOY_PARAMS_M = {"A0": 8.30, "A1": 12.78, "A2": 25.49, "B0": 14.33, "B1": 51.82,
                         "B1g2": 41.36, "B1g4": 36.12, "B2": 80.31, "B2g4": 55.77, "B3": 110.96}
# Plain-twin conv count per net (= number of blocks, incl. stem; MobileOne blocks deploy to 2 convs).
TWIN_CONVS = {**{f"repvgg-{c}": 22 for c in ("A0", "A1", "A2")},
              **{f"repvgg-{c}": 28 for c in FULL_REPVGG if c.startswith("B")},
              "repvgg-article": 8, "repvgg-tiny": 8, "repvgg-tiny_g2": 8,
              "acnet": 6, "dbb": 6, "bn-after-sum": 6, "mobileone": 1 + 2 * 5}
EXPECTED_OUT = {**{f"repvgg-{c}": (1, 1000) for c in FULL_REPVGG},
                "repvgg-article": (1, 512, 14, 14), "repvgg-tiny": (1, 10), "repvgg-tiny_g2": (1, 10),
                **dict.fromkeys(SMALL, (1, 10))}


def _meta(name: str, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs).eval()


def _real(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm_(build(name), seed=seed).eval()


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _geometry(conv: nn.Conv2d) -> dict[str, Any]:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": tuple(conv.padding), "dilation": tuple(conv.dilation), "groups": conv.groups}


# ------------------------------------------------------------------------------------ registry


def test_names_and_unknown() -> None:
    n = names()
    assert len(n) == len(set(n)) == len(M.REPVGG_CONFIGS) + 4
    for required in ["repvgg-A0", "repvgg-A1", "repvgg-A2", "repvgg-B0", "repvgg-B1", "repvgg-B1g2",
                     "repvgg-B1g4", "repvgg-B2", "repvgg-B2g4", "repvgg-article", "repvgg-tiny",
                     "repvgg-tiny_g2", *SMALL]:
        assert required in n
    for bad in ["repvgg-A9", "resnet18", "repvgg-", ""]:
        with pytest.raises(ValueError, match="repvgg-A0"):
            build(bad)
        with pytest.raises(ValueError, match="bn-after-sum"):
            default_input_shape(bad)
    assert default_input_shape("repvgg-B1") == (1, 3, 224, 224)
    assert default_input_shape("repvgg-tiny") == (1, 3, 64, 64)
    assert set(M.__all__) <= set(dir(M))


@pytest.mark.parametrize("name", names())
def test_forward_shape_and_twin_meta(name: str) -> None:
    model = _meta(name)
    x = torch.empty(default_input_shape(name), device="meta")
    assert tuple(model(x).shape) == EXPECTED_OUT[name]
    twin = plain_twin(model)
    assert tuple(twin(x).shape) == EXPECTED_OUT[name]

    # One bias-carrying conv per deploy spec, geometry as reported, each followed by ReLU; no BN left.
    specs = [s for b in reparam_blocks(model) for s in b.deploy_conv_specs()]
    convs = _convs(twin)
    assert len(convs) == len(specs) == TWIN_CONVS[name]
    assert [_geometry(c) for c in convs] == specs
    assert all(c.bias is not None for c in convs)
    assert not any(isinstance(m, _BatchNorm) for m in twin.modules())
    plains = [m for m in twin.modules() if isinstance(m, M.PlainBlock)]
    assert len(plains) == len(reparam_blocks(model))
    for p in plains:
        assert [type(m) for m in p] == [nn.Conv2d, nn.ReLU] * (len(p) // 2)
    # The head is kept.
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in twin.modules() if isinstance(m, nn.Linear)] == \
        [(m.in_features, m.out_features) for m in lin]


@pytest.mark.parametrize("name", REAL)
def test_forward_real_and_fx(name: str) -> None:
    model = _real(name)
    shape = (2, 3, 64, 64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all() and y.abs().max() > 0
        twin = plain_twin(model).eval()
        assert twin(x).shape == y.shape
        gm = torch.fx.symbolic_trace(model)
        assert torch.equal(gm(x), y)
    # Every conv module is called exactly once in the traced graph (no shared modules).
    mods = dict(gm.named_modules())
    called = [n.target for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(mods[n.target], nn.Conv2d)]
    assert len(called) == len(set(called)) == len(_convs(model))
    # The twin is a copy: the training-form model is unchanged.
    assert len(reparam_blocks(model)) == len(reparam_blocks(build(name)))
    assert any(isinstance(m, _BatchNorm) for m in model.modules())


def test_training_mode_backward() -> None:
    model = build("repvgg-tiny_g2").train()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------- RepVGG


def _repvgg_blocks(model: M.RepVGG) -> list[RepVGGBlock]:
    out = [model.stage0] if model.stage0 is not None else []
    for stage in (model.stage1, model.stage2, model.stage3, model.stage4):
        out.extend(stage)
    return out


@pytest.mark.parametrize("config", FULL_REPVGG)
def test_repvgg_widths_and_params(config: str) -> None:
    model = _meta(f"repvgg-{config}")
    blocks = _repvgg_blocks(model)
    assert blocks == [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    depths = (2, 4, 14, 1) if config.startswith("A") else (4, 6, 16, 1)
    assert len(blocks) == 1 + sum(depths)
    stem, widths = WIDTHS[config[:2]]
    assert (blocks[0].in_channels, blocks[0].out_channels, blocks[0].stride) == (3, stem, 2)
    assert blocks[0].groups == 1
    stages = [model.stage1, model.stage2, model.stage3, model.stage4]
    assert [len(s) for s in stages] == list(depths)
    for stage, width in zip(stages, widths):
        assert [b.stride for b in stage] == [2] + [1] * (len(stage) - 1)
        assert all(b.out_channels == width for b in stage)
        assert all(b.dense.conv.out_channels == width for b in stage)
    assert model.linear.in_features == widths[-1]
    if config in PAPER_DEPLOY_PARAMS_M:
        twin_params = sum(p.numel() for p in plain_twin(model).parameters()) / 1e6
        assert int(twin_params * 100) / 100 == PAPER_DEPLOY_PARAMS_M[config]


def test_repvgg_a0_counts() -> None:
    model = _meta("repvgg-A0")
    blocks = _repvgg_blocks(model)
    assert len(blocks) == 1 + 2 + 4 + 14 + 1 == 22
    assert sum(b.identity is not None for b in blocks) == 22 - 5
    assert len(_convs(model)) == 44
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 44 + 17
    assert sum(p.numel() for p in model.parameters()) == 9_108_968  # 9.11M (paper, train form)


@pytest.mark.parametrize("name", [n for n in names() if n.startswith("repvgg-")])
def test_repvgg_identity_where_allowed(name: str) -> None:
    model = _meta(name)
    for b in _repvgg_blocks(model):
        conv3, conv1 = b.dense.conv, b.pointwise.conv
        assert conv3.kernel_size == (3, 3) and conv3.padding == (1, 1) and conv3.bias is None
        assert conv1.kernel_size == (1, 1) and conv1.padding == (0, 0) and conv1.bias is None
        assert conv3.stride == conv1.stride and conv3.groups == conv1.groups
        allowed = conv3.stride == (1, 1) and conv3.in_channels == conv3.out_channels
        assert (b.identity is not None) == allowed
        if allowed:
            assert isinstance(b.identity, nn.BatchNorm2d)
            assert b.identity.num_features == conv3.in_channels


@pytest.mark.parametrize("config", ["B1g2", "B1g4", "B2g4", "B3g2"])
def test_repvgg_groupwise_layers(config: str) -> None:
    g = int(config[-1])
    blocks = _repvgg_blocks(_meta(f"repvgg-{config}"))
    assert blocks[0].groups == 1  # stage0 is never grouped
    grouped = [i for i, b in enumerate(blocks[1:], start=1) if b.groups != 1]
    assert grouped == list(range(2, 27, 2))
    assert all(blocks[i].groups == g and blocks[i].dense.conv.groups == g for i in grouped)


def test_repvgg_tiny_and_article_layout() -> None:
    tiny = _repvgg_blocks(_meta("repvgg-tiny_g2"))
    assert [(b.in_channels, b.out_channels, b.stride, b.groups) for b in tiny] == [
        (3, 16, 2, 1), (16, 16, 2, 1), (16, 16, 1, 2), (16, 32, 2, 2), (32, 32, 1, 2),
        (32, 64, 2, 1), (64, 64, 1, 2), (64, 256, 2, 1)]
    assert [b.identity is not None for b in tiny] == [False, False, True, False, True, False, True, False]
    article = _meta("repvgg-article")
    assert article.stage0 is None and article.linear is None
    assert [(b.in_channels, b.out_channels, b.stride) for b in _repvgg_blocks(article)] == [
        (3, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1),
        (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    headless = _meta("repvgg-A0", num_classes=None)
    assert tuple(headless(torch.empty(2, 3, 64, 64, device="meta")).shape) == (2, 1280, 2, 2)
    assert headless.linear is None and headless.gap is None
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=16 and out_channels=32"):
        RepVGGBlock(16, 32, groups=3)


# ------------------------------------------------------------------------------- other blocks


def test_small_block_structure() -> None:
    ac = ACBlock(8, 16, kernel_size=5, stride=2, groups=2)
    assert [(m.kernel_size, m.padding) for m in _convs(ac)] == [((5, 5), (2, 2)), ((1, 5), (0, 2)), ((5, 1), (2, 0))]
    dbb = DBBBlock(8, 16, kernel_size=3, stride=2, groups=4)
    assert len(_convs(dbb)) == 5 and dbb.branch_1x1 is not None
    assert dbb.branch_avg.bn.pad == 1 and dbb.branch_1x1_kxk.conv2.padding == (0, 0)
    assert DBBBlock(8, 8, kernel_size=1).branch_1x1 is None
    mob = MobileOneBlock(16, 16, stride=1, num_conv_branches=3)
    assert len(mob.depthwise.convs) == len(mob.pointwise.convs) == 3
    assert mob.depthwise.scale is not None and mob.depthwise.skip is not None
    assert mob.pointwise.scale is None and mob.pointwise.skip is not None
    mob2 = MobileOneBlock(16, 32, stride=2)
    assert mob2.depthwise.skip is None and mob2.pointwise.skip is None
    assert [s["groups"] for s in mob2.deploy_conv_specs()] == [16, 1]
    assert BNAfterSumBlock(8, 8, 1, 2).has_identity and not BNAfterSumBlock(8, 8, 2).has_identity
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 4"):
        ACBlock(8, 8, kernel_size=4)
    with pytest.raises(ValueError, match="per-block sequences must have equal lengths"):
        M.ACNet(widths=(16, 32), strides=(1,))


# ------------------------------------------------- each block is exactly its reported deploy conv


def _as_conv(block: nn.Module, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Recover (weight, bias) of the affine map ``block`` (act removed) by probing with impulses."""
    cin, cout, g = spec["in_channels"], spec["out_channels"], spec["groups"]
    (kh, kw), (sh, sw), (ph, pw) = spec["kernel_size"], spec["stride"], spec["padding"]
    oh, ow = -(-ph // sh), -(-pw // sw)  # first output whose receptive field is inside the input
    size = max(oh * sh - ph + kh, ow * sw - pw + kw) + 4
    base = block(torch.zeros(1, cin, size, size, dtype=torch.float64))
    bias = base[0, :, oh, ow]
    # A conv maps zero to its bias everywhere, borders included.
    assert_close_f64(bias.view(1, -1, 1, 1).expand_as(base), base, rtol=0.0, atol=1e-12)
    probes = torch.zeros(cin, kh, kw, cin, size, size, dtype=torch.float64)
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                probes[c, i, j, c, oh * sh - ph + i, ow * sw - pw + j] = 1.0
    resp = block(probes.reshape(-1, cin, size, size))[:, :, oh, ow] - bias
    full = resp.reshape(cin, kh, kw, cout).permute(3, 0, 1, 2)
    cig, cog = cin // g, cout // g
    weight = torch.cat([full[k * cog:(k + 1) * cog, k * cig:(k + 1) * cig] for k in range(g)])
    return weight, bias, size


def _check_is_conv(block: nn.Module) -> None:
    (spec,) = block.deploy_conv_specs()
    pre = copy.deepcopy(block).double().eval()
    randomize_batchnorm_(pre, seed=7)
    for m in pre.modules():
        if hasattr(m, "act"):
            m.act = nn.Identity()
    with torch.no_grad():
        weight, bias, size = _as_conv(pre, spec)
        x = torch.randn(2, spec["in_channels"], size + 3, size + 2, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3))
        want = F.conv2d(x, weight, bias, spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
        got = pre(x)
    assert got.shape == want.shape
    assert_close_f64(want, got, rtol=1e-10)
    assert weight.abs().max() > 1e-3  # the probe saw a real kernel


STANDALONE = [
    RepVGGBlock(8, 8, 1, 4), RepVGGBlock(8, 16, 2, 2),
    ACBlock(6, 6, 5, 1, 3), ACBlock(4, 8, 3, 2, 1), ACBlock(4, 4, 1, 1, 1),
    DBBBlock(8, 8, 3, 1, 2), DBBBlock(8, 16, 5, 2, 4, internal_channels=12), DBBBlock(6, 6, 1, 1, 1),
    DBBBlock(8, 8, 3, 2, 8),
    MobileOneUnit(8, 8, 3, 2, groups=8, num_conv_branches=3), MobileOneUnit(8, 8, 5, 1, 8, 2),
    MobileOneUnit(8, 8, 1, 1, 1, 2),
    BNAfterSumBlock(8, 8, 1, 2), BNAfterSumBlock(4, 8, 2, 1),
]


@pytest.mark.parametrize("block", STANDALONE, ids=lambda b: f"{type(b).__name__}")
def test_block_is_its_deploy_conv(block: nn.Module) -> None:
    _check_is_conv(block)


@pytest.mark.parametrize("name", ["repvgg-tiny_g2", *SMALL])
def test_every_net_unit_is_its_deploy_conv(name: str) -> None:
    torch.manual_seed(0)
    units = [m for m in build(name).modules()
             if hasattr(m, "deploy_conv_specs") and len(m.deploy_conv_specs()) == 1]
    assert len(units) == TWIN_CONVS[name]
    for unit in units:
        _check_is_conv(unit)


def test_is_conv_check_can_fail() -> None:
    """A block that misreports its padding, or a DBB pad done after BN with zeros, is caught."""
    block = ACBlock(4, 4, 3)
    block.deploy_conv_spec = lambda: M.conv_spec(4, 4, 3, 1, 0, 1)  # type: ignore[method-assign]
    block.deploy_conv_specs = lambda: [block.deploy_conv_spec()]  # type: ignore[method-assign]
    with pytest.raises(AssertionError):
        _check_is_conv(block)

    class ZeroPadAfterBN(M.PadThenBN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(self.bn(x), [self.pad] * 4)

    dbb = DBBBlock(4, 4, 3)
    old = dbb.branch_1x1_kxk.bn1
    dbb.branch_1x1_kxk.bn1 = ZeroPadAfterBN(4, old.pad)
    with pytest.raises(AssertionError):
        _check_is_conv(dbb)


# ------------------------------------------------------------------------- randomize_batchnorm_


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for m in model.modules() if isinstance(m, _BatchNorm)
            for t in (m.weight, m.bias, m.running_mean, m.running_var) if t is not None]


def test_randomize_batchnorm_changes_everything_and_is_deterministic() -> None:
    fresh = build("repvgg-tiny")
    model = copy.deepcopy(fresh)
    assert randomize_batchnorm_(model, seed=5) is model
    before, after = _bn_state(fresh), _bn_state(model)
    assert len(after) == 4 * sum(isinstance(m, _BatchNorm) for m in model.modules()) > 0
    for a, b in zip(before, after):
        assert (a != b).all()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            assert ((m.running_var >= 0.5) & (m.running_var <= 2.0)).all()
            assert ((m.weight.abs() >= 0.5) & (m.weight.abs() <= 1.5)).all()
            assert m.weight.requires_grad and m.weight.grad is None and m.weight.is_leaf
    all_w = torch.cat([m.weight for m in model.modules() if isinstance(m, _BatchNorm)])
    assert (all_w > 0).any() and (all_w < 0).any()
    again = randomize_batchnorm_(copy.deepcopy(fresh), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(after, _bn_state(again)))
    other = randomize_batchnorm_(copy.deepcopy(fresh), seed=6)
    assert not any(torch.equal(a, b) for a, b in zip(after, _bn_state(other)))
    # Conv weights are untouched.
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(_convs(fresh), _convs(model)))


def test_randomize_batchnorm_kinds_flags_dtypes() -> None:
    model = nn.ModuleList([
        nn.BatchNorm1d(4), nn.BatchNorm2d(5, affine=False), nn.BatchNorm3d(6, track_running_stats=False),
        nn.SyncBatchNorm(7), nn.BatchNorm2d(3).double(), nn.BatchNorm2d(3).to(torch.bfloat16),
        nn.LayerNorm(4),
    ])
    randomize_batchnorm_(model, seed=1)
    bn1, bn2, bn3, sync, bn64, bn16, ln = model
    for bn in (bn1, sync, bn64, bn16):
        assert not torch.all(bn.weight == 1) and not torch.all(bn.bias == 0)
        assert not torch.all(bn.running_mean == 0) and not torch.all(bn.running_var == 1)
    assert bn2.weight is None and bn2.bias is None and not torch.all(bn2.running_var == 1)
    assert bn3.running_mean is None and bn3.running_var is None and not torch.all(bn3.weight == 1)
    assert bn64.weight.dtype == bn64.running_var.dtype == torch.float64
    assert bn16.weight.dtype == bn16.running_mean.dtype == torch.bfloat16
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
