"""fxfuse.expand(online=True) (OREPA): every block computes its equivalent kernel per forward and runs one conv.

The reference is the block's *offline twin*: the same module with ``online = False``, i.e. the same parameters
evaluated branch by branch on the feature map (docs/expand.md, "Online mode"). Checked in float64: same outputs and
same gradients for every parameter (train and eval mode) over random geometry, groups, strides, dilation and every
scheme; ``fxfuse.reparametrize`` of a trained online model gives the plain net's convs with no BatchNorm left."""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_expand import SCHEMES, blocks, check_expanded, conv_geometries_of, max_rel_error, run, small_cnns, tiny_net
from torch import nn

import fxfuse
from fxfuse.expansion.online import ChannelScale, OnlineConv2d, ScaleAndPad
from fxfuse.models import randomize_batchnorm_

RTOL = 1e-10


def set_online(model: nn.Module, online: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, OnlineConv2d):
            m.online = online
    return model


@torch.no_grad()
def randomize_scales_(model: nn.Module, seed: int) -> nn.Module:
    """Every linearized BN's scale (and shift) random and nonzero: a zero scale would hide a branch."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, ChannelScale):
            m.scale.copy_(torch.randn(m.scale.shape, generator=gen, dtype=m.scale.dtype))
            if m.shift is not None:
                m.shift.copy_(torch.randn(m.shift.shape, generator=gen, dtype=m.shift.dtype))
    return model


def outputs_and_grads(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    model.zero_grad()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(actual: Dict[str, torch.Tensor], reference: Dict[str, torch.Tensor]) -> None:
    """Per parameter ``max|Δ| ≤ RTOL · max|g|``. A gradient that is 0 in exact arithmetic (a conv bias before a
    train-mode BN) is rounding noise on both sides: below 1e-9 of the largest gradient, both must be."""
    noise = 1e-9 * max(float(g.abs().max()) for g in reference.values())
    for name, g in reference.items():
        if float(g.abs().max()) <= noise:
            assert float(actual[name].abs().max()) <= noise, name
        else:
            assert float((actual[name] - g).abs().max()) <= RTOL * float(g.abs().max()), name


def online_model(model: nn.Module, x: torch.Tensor, scheme: str, seed: int = 0) -> nn.Module:
    expanded = fxfuse.expand(model, x, scheme=scheme, init="paper", online=True)
    report = expanded.fxfuse_expand_report
    assert report.online and all(e.online and e.offline_reason is None for e in report.expanded)
    assert all(type(b) is OnlineConv2d for b in blocks(expanded).values())
    return randomize_scales_(randomize_batchnorm_(expanded, seed), seed).double()


def assert_twin_equal(model: nn.Module, x: torch.Tensor, train: bool) -> None:
    twin = set_online(copy.deepcopy(model), False)
    model.train(train)
    twin.train(train)
    y_on, g_on = outputs_and_grads(model, x)
    y_off, g_off = outputs_and_grads(twin, x)
    assert max_rel_error(y_on, y_off) <= RTOL
    assert set(g_on) == set(g_off) == {n for n, p in model.named_parameters()}
    assert_grads_equal(g_on, g_off)
    for (n, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):  # same BN statistics updates
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), n


# ------------------------------------------------------------------------------ online == its offline twin
@settings(max_examples=10, deadline=None)
@given(net=small_cnns(), scheme=st.sampled_from(SCHEMES), train=st.booleans())
def test_online_equals_offline_twin(net: Tuple[nn.Module, torch.Tensor], scheme: str, train: bool) -> None:
    model, x = net
    expanded = fxfuse.expand(model, x, scheme=scheme, verify=False)
    if not blocks(expanded):
        return
    online = online_model(model, x, scheme)
    check_expanded(model, online, scheme)  # the same blocks and branches as offline
    assert_twin_equal(online, x, train)


@pytest.mark.parametrize("train", [False, True])
def test_online_chain_runs_on_small_maps_and_equals_twin(train: bool) -> None:
    """A wide DBB block: on a 2x2 map composing the 1x1 → kxk kernel costs more multiply-adds than running the
    chain, so ``merge="auto"`` runs it on the map; on 16x16 it composes. Either way the twin's outputs and
    gradients, and ``merge="all"``'s."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
    online = online_model(model, torch.randn(2, 32, 4, 4), "dbb")
    block = next(iter(blocks(online).values()))
    assert isinstance(block, OnlineConv2d) and block.merge == "auto"
    small = torch.randn(2, 32, 2, 2, dtype=torch.float64)
    assert block.map_branches(small) == ["conv1x1_kxk"]
    assert block.map_branches(torch.randn(2, 32, 16, 16, dtype=torch.float64)) == []
    assert_twin_equal(online, small, train)
    merged_all = copy.deepcopy(online)
    next(iter(blocks(merged_all).values())).merge = "all"
    assert_twin_equal(merged_all, small, train)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_online_equals_twin_tiny_net(scheme: str) -> None:
    """groups, depthwise with stride 2, a 1x1 conv, convs with and without BN, in train and eval mode."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    online = online_model(tiny_net().double(), x, scheme)
    for train in (True, False):
        assert_twin_equal(online, x, train)


def test_linearized_modules_and_report() -> None:
    x = torch.randn(2, 3, 8, 8)
    online = fxfuse.expand(tiny_net(), x, scheme="dbb", online=True)
    block = blocks(online)["3"]  # groups=2, with BN
    assert isinstance(block.post, nn.BatchNorm2d)  # the user's BN: the block's one normalization
    assert isinstance(block.main.bn, ChannelScale) and block.main.bn.shift is None
    assert isinstance(block.branches.conv1x1_kxk.bn1, ScaleAndPad) and block.branches.conv1x1_kxk.bn1.shift is None
    no_bn = blocks(online)["6"]  # depthwise conv without BN: no normalization after, scales get shifts
    assert no_bn.post is None and not hasattr(no_bn.main, "bn")
    assert all(m.shift is not None for m in no_bn.modules() if isinstance(m, ChannelScale))
    assert not any(isinstance(m, nn.BatchNorm2d) for b in blocks(online).values() for m in b.branches.modules())
    text = str(online.fxfuse_expand_report)
    assert "online=True" in text and "BatchNorm → per-channel scale: conv1x1.bn, conv1x1_kxk.bn1" in text
    assert "conv1x1_kxk (1x1 composed into the kxk, or run on the feature map" in text
    assert "no BatchNorm after the block" in text
    w, b = block.equivalent_conv()
    assert w.shape == block.main.conv.weight.shape and b.shape == (block.out_channels,)


# ------------------------------------------------------------------------------------ init and training
@pytest.mark.parametrize("scheme", SCHEMES)
def test_online_preserve_init(scheme: str) -> None:
    """init='preserve': the original function in eval and train mode (QARepVGG too: its main branch's new BN is a
    scale of exactly 1 online)."""
    model = tiny_net().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    online = fxfuse.expand(model, x, scheme=scheme, online=True)
    assert online.fxfuse_expand_report.verified is True
    assert max_rel_error(run(online.eval(), x), run(model.eval(), x)) <= 1e-12
    assert max_rel_error(online.train()(x), copy.deepcopy(model).train()(x)) <= 1e-12


@pytest.mark.parametrize("scheme", SCHEMES)
def test_online_gradient_reaches_every_branch(scheme: str) -> None:
    x = torch.randn(4, 3, 8, 8)
    online = fxfuse.expand(tiny_net(), x, scheme=scheme, online=True).train()
    opt = torch.optim.SGD(online.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        online(x).square().sum().backward()
        opt.step()
    for n, p in online.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# ------------------------------------------------------------------------------------- the round trip
def online_round_trip(model: nn.Module, x: torch.Tensor, scheme: str) -> None:
    online = fxfuse.expand(model, x, scheme=scheme, online=True)
    assert max_rel_error(run(online.eval(), x), run(model.eval(), x)) <= 1e-9
    online.train()
    opt = torch.optim.SGD(online.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        xb = torch.randn(4, *x.shape[1:], dtype=torch.float64, generator=gen)
        opt.zero_grad()
        (online(xb) - 0.5).square().mean().backward()
        opt.step()
    online.eval()
    plain = fxfuse.reparametrize(model, x)
    collapsed = fxfuse.reparametrize(online, x)
    assert conv_geometries_of(collapsed) == conv_geometries_of(plain)  # one conv per block, the original's
    after = collapsed.fxfuse_report.after
    assert (after.convs, after.batch_norms, after.adds) == (plain.fxfuse_report.after.convs, 0, 0)
    assert not collapsed.fxfuse_report.rolled_back
    x2 = torch.randn(3, *x.shape[1:], dtype=torch.float64, generator=gen)
    assert max_rel_error(run(collapsed, x2), run(online, x2)) <= 1e-9
    assert max_rel_error(run(online, x2), run(model, x2)) > 1e-6  # training changed the function


@pytest.mark.parametrize("scheme", SCHEMES)
def test_online_round_trip_tiny_net(scheme: str) -> None:
    """Every scheme's blocks collapse to one conv each after training (DBB's 1x1 → pad → avg-pool chain too)."""
    online_round_trip(tiny_net().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64), scheme)


@settings(max_examples=6, deadline=None)
@given(net=small_cnns(), scheme=st.sampled_from(SCHEMES))
def test_online_round_trip_random_cnns(net: Tuple[nn.Module, torch.Tensor], scheme: str) -> None:
    model, x = net
    if not blocks(fxfuse.expand(model, x, scheme=scheme, verify=False)):
        return
    online_round_trip(model, x, scheme)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=30, deadline=None)
@given(net=small_cnns())
def test_online_round_trip_random_cnns_sweep(scheme: str, net: Tuple[nn.Module, torch.Tensor]) -> None:
    model, x = net
    if not blocks(fxfuse.expand(model, x, scheme=scheme, verify=False)):
        return
    online_round_trip(model, x, scheme)


# ------------------------------------------------------------------------------------------- runtimes
def test_online_autocast_bfloat16() -> None:
    x = torch.randn(4, 3, 8, 8)
    online = fxfuse.expand(tiny_net(), x, scheme="dbb", online=True).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = online(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.dtype == torch.float32 for p in online.parameters())


def test_online_state_dict_loads_into_a_fresh_online_model() -> None:
    x = torch.randn(2, 3, 8, 8)
    a = randomize_scales_(fxfuse.expand(tiny_net(), x, scheme="acnet", online=True), 3).eval()
    b = fxfuse.expand(tiny_net(), x, scheme="acnet", online=True).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(run(a, x), run(b, x))


@pytest.mark.slow  # dynamo + AOTAutograd on 2 cores: ~20 s
def test_online_torch_compile_aot_eager() -> None:
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    online = randomize_scales_(fxfuse.expand(tiny_net().double(), x, scheme="dbb", online=True), 0).train()
    ref = copy.deepcopy(online)
    y, _ = outputs_and_grads(torch.compile(online, backend="aot_eager"), x)
    y_ref, g_ref = outputs_and_grads(ref, x)
    assert max_rel_error(y, y_ref) <= RTOL
    assert_grads_equal({n: p.grad for n, p in online.named_parameters() if p.grad is not None}, g_ref)
