"""fxfuse.expand: function preserved at init, the round trip expand → train → reparametrize, trainability
(gradients, state_dict, modes, AMP, DDP, torch.compile), selection and skip reasons, user schemes.

Every fusion check compares float64 outputs computed here (not the checks inside expand / reparametrize) and
asserts the structure: which convs became blocks, and the conv geometries of the collapsed model."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxfuse
from fxfuse.expansion import Branch, ConvGeometry, ExpandedConv2d, Plan
from fxfuse.models import build, names, randomize_batchnorm_
from fxfuse.verify import compare

SCHEMES = ("repvgg", "acnet", "dbb", "mobileone", "qarepvgg")
RTOL = 1e-9


# ------------------------------------------------------------------------------------------ helpers
def conv_geometries_of(gm: nn.Module) -> List[Tuple[Any, ...]]:
    """Sorted (weight shape, stride, padding, dilation, groups) of every conv a collapsed model executes (the
    dilation of a size-1 kernel axis, which has no effect, as 1)."""
    assert isinstance(gm, fx.GraphModule)
    mods = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(mods[str(n.target)], nn.Conv2d):
            m = mods[str(n.target)]
            dilation = tuple(d if k > 1 else 1 for d, k in zip(m.dilation, m.kernel_size))  # no taps to space out
            out.append((tuple(m.weight.shape), m.stride, m.padding, dilation, m.groups))
    return sorted(out)


def max_rel_error(actual: Any, reference: Any) -> float:
    """``max|actual - reference| / max|reference|`` (fxfuse.verify.compare, float64)."""
    return compare(reference, actual).max_rel


def blocks(model: nn.Module) -> Dict[str, ExpandedConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpandedConv2d)}


def f64_eval(model: nn.Module) -> nn.Module:
    return model.double().eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def expected_branches(scheme: str, conv: nn.Conv2d) -> List[str]:
    """Branch names each built-in scheme gives a conv, written out from the papers' rules (not from the code):
    1x1 only for kernels > 1 with centre padding room, identity only for in == out, stride 1, 'same' padding."""
    k, p, d, s = conv.kernel_size, conv.padding, conv.dilation, conv.stride
    square = k[0] == k[1]
    one = k != (1, 1) and all(kk % 2 == 1 and pp >= dd * (kk - 1) // 2 for kk, pp, dd in zip(k, p, d))
    ident = (conv.in_channels == conv.out_channels and s == (1, 1)
             and all(kk % 2 == 1 and pp == dd * (kk - 1) // 2 for kk, pp, dd in zip(k, p, d)))
    if scheme == "repvgg":
        return ["conv1x1"] * one + ["identity"] * ident
    if scheme == "acnet":
        return [f"conv1x{k[1]}", f"conv{k[0]}x1"] if square and k[0] > 1 and one else []
    if scheme == "dbb":
        undilated = d == (1, 1) or k == (1, 1)
        return ["conv1x1"] * one + ["conv1x1_kxk"] * undilated + ["conv1x1_avg"] * (undilated and k != (1, 1))
    if scheme == "mobileone":
        return [f"conv_kxk_{i}" for i in (1, 2, 3)] + ["conv1x1"] * one + ["identity"] * ident
    assert scheme == "qarepvgg"
    return ["conv1x1"] + ["identity"] * ident if one else []


def check_expanded(original: nn.Module, expanded: nn.Module, scheme: str) -> None:
    """Every conv the scheme gives a branch became a block with exactly those branches; the rest did not."""
    convs = {n: m for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    got = blocks(expanded)
    want = {n: expected_branches(scheme, m) for n, m in convs.items()}
    assert set(got) == {n for n, b in want.items() if b}
    for name, block in got.items():
        assert list(block.branches) == want[name], name
    report = expanded.fxfuse_expand_report
    assert sorted(report.expanded_names) == sorted(got)
    assert sorted(report.expanded_names + [s.name for s in report.skipped]) == sorted(convs)


# --------------------------------------------------------------------------- function preserved at init
def vgg11_bn() -> nn.Module:
    model = torchvision.models.vgg11_bn(num_classes=10)
    model.classifier = nn.Linear(512 * 7 * 7, 10)  # the convs are what expand touches; 120M head params are not
    return model


TORCHVISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35),
    "vgg11_bn": vgg11_bn,
}


def sweep(models: List[str], default: List[Tuple[str, str]]) -> List[Any]:
    """Every (model, scheme) pair; those not in ``default`` only with --runslow (each scheme and each model is
    in the default run at least once)."""
    return [pytest.param(m, s, marks=() if (m, s) in default else pytest.mark.slow) for m in models for s in SCHEMES]


@pytest.mark.parametrize(("name", "scheme"), sweep(sorted(TORCHVISION), [
    ("resnet18", "dbb"), ("resnet18", "qarepvgg"), ("mobilenet_v2", "mobileone"), ("mobilenet_v2", "repvgg"),
    ("vgg11_bn", "acnet")]))
def test_preserve_torchvision(name: str, scheme: str) -> None:
    torch.manual_seed(0)
    model = f64_eval(randomize_batchnorm_(TORCHVISION[name](), 0))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme=scheme, verify=False)
    check_expanded(model, expanded, scheme)
    assert blocks(expanded) and not blocks(model)  # the input model is untouched
    assert max_rel_error(run(expanded.eval(), x), run(model, x)) <= RTOL


REFERENCE = [n for n in names() if not n.startswith("repvgg-") or n == "repvgg-tiny"]


@pytest.mark.parametrize(("name", "scheme"), sweep(REFERENCE, [
    ("repvgg-tiny", "dbb"), ("acnet", "repvgg"), ("dbb", "acnet"), ("mobileone", "qarepvgg"),
    ("bn-after-sum", "mobileone")]))
def test_preserve_reference_nets(name: str, scheme: str) -> None:
    torch.manual_seed(0)
    model = f64_eval(randomize_batchnorm_(build(name), 0))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme=scheme)
    assert blocks(expanded)
    assert expanded.fxfuse_expand_report.verified is True
    assert max_rel_error(run(expanded.eval(), x), run(model, x)) <= RTOL


# ------------------------------------------------------------------------- the round trip, property-tested
@st.composite
def small_cnns(draw: Any) -> Tuple[nn.Module, torch.Tensor]:
    """Conv[-BN]-ReLU stacks: kernels 1/3/5, stride 1/2, dilation 1/2, any padding, groups, depthwise (also with a
    channel multiplier), bias on/off, BN on/off."""
    cin = c0 = draw(st.sampled_from([2, 3, 4]))
    size = 9
    layers: List[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        k, s, d = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 1, 2]))
        same = d * (k - 1) // 2
        p = draw(st.sampled_from([same, same, 0, draw(st.integers(0, same + 1))]))
        if (size + 2 * p - d * (k - 1) - 1) // s + 1 < 2:
            p = same
        if draw(st.booleans()) and cin > 1:
            groups, cout = cin, cin * draw(st.sampled_from([1, 1, 2]))  # depthwise
        else:
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0]))
            cout = groups * draw(st.integers(1, 3))
        layers.append(nn.Conv2d(cin, cout, k, s, p, d, groups, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU())
        size = (size + 2 * p - d * (k - 1) - 1) // s + 1
        cin = cout
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = f64_eval(randomize_batchnorm_(nn.Sequential(*layers[:-1]), seed))  # no ReLU last: gradients flow
    return model, torch.randn(2, c0, 9, 9, dtype=torch.float64)


def round_trip(model: nn.Module, x: torch.Tensor, scheme: str) -> None:
    expanded = fxfuse.expand(model, x, scheme=scheme, verify=False)
    check_expanded(model, expanded, scheme)
    assert max_rel_error(run(expanded.eval(), x), run(model, x)) <= RTOL

    plain = fxfuse.reparametrize(model, x)
    collapsed = fxfuse.reparametrize(expanded.eval(), x)
    assert conv_geometries_of(collapsed) == conv_geometries_of(plain)
    assert (collapsed.fxfuse_report.after.convs, collapsed.fxfuse_report.after.batch_norms,
            collapsed.fxfuse_report.after.adds) == (plain.fxfuse_report.after.convs, 0, 0)
    assert max_rel_error(run(collapsed, x), run(plain, x)) <= RTOL

    # a few SGD steps in train mode (BN statistics move), then collapse the trained model
    expanded.train()
    opt = torch.optim.SGD(expanded.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        xb = torch.randn(4, *x.shape[1:], dtype=torch.float64, generator=gen)
        loss = (expanded(xb) - 0.5).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    expanded.eval()
    trained = fxfuse.reparametrize(expanded, x)
    assert conv_geometries_of(trained) == conv_geometries_of(plain)
    assert not trained.fxfuse_report.rolled_back
    x2 = torch.randn(3, *x.shape[1:], dtype=torch.float64, generator=gen)
    assert max_rel_error(run(trained, x2), run(expanded, x2)) <= RTOL
    assert max_rel_error(run(expanded, x2), run(model, x2)) > 1e-6  # training changed the function


@settings(max_examples=8, deadline=None)
@given(net=small_cnns(), scheme=st.sampled_from(SCHEMES))
def test_round_trip_random_cnns(net: Tuple[nn.Module, torch.Tensor], scheme: str) -> None:
    round_trip(*net, scheme)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=40, deadline=None)
@given(net=small_cnns())
def test_round_trip_random_cnns_sweep(scheme: str, net: Tuple[nn.Module, torch.Tensor]) -> None:
    round_trip(*net, scheme)


@pytest.mark.parametrize("scheme", [pytest.param(s, marks=() if s == "repvgg" else pytest.mark.slow) for s in SCHEMES])
def test_round_trip_resnet18(scheme: str) -> None:
    torch.manual_seed(0)
    model = f64_eval(randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), 0))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    expanded = randomize_batchnorm_(fxfuse.expand(model, x, scheme=scheme), 1).eval()  # every branch nonzero
    plain, collapsed = fxfuse.reparametrize(model, x), fxfuse.reparametrize(expanded, x)
    assert conv_geometries_of(collapsed) == conv_geometries_of(plain)
    assert collapsed.fxfuse_report.after.batch_norms == 0
    assert max_rel_error(run(collapsed, x), run(expanded, x)) <= RTOL


# ------------------------------------------------------------------------------------------ trainability
def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return randomize_batchnorm_(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), nn.ReLU(),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)), 0)


def grads(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradient_reaches_every_branch(scheme: str) -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme=scheme).train()
    new = [n for n in dict(expanded.named_parameters()) if ".branches." in n or ".main.bn." in n]
    assert new
    g0 = grads(expanded, x)
    # step 0: the last layer of every branch learns (a zero-γ BN's γ and β; a BN-free branch's conv); the layers
    # before a zero-γ BN get zero gradients at this step only
    for block in blocks(expanded).values():
        for key, branch in block.branches.items():
            last = list(branch.parameters())[-2:] if isinstance(branch, nn.Sequential) else []
            assert all(p.grad.abs().sum() > 0 for p in last), key
    with torch.no_grad():
        for n, p in expanded.named_parameters():
            p -= 0.05 * g0[n]
    g1 = grads(expanded, x)
    for n, g in g1.items():  # after one step every parameter of every branch gets a gradient
        assert g.abs().sum() > 0, n


def test_paper_init_gradients_flow_at_step_0() -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="dbb", init="paper").train()
    assert expanded.fxfuse_expand_report.verified is None  # not function preserving: nothing to check
    for n, g in grads(expanded, x).items():
        assert g.abs().sum() > 0, n
    block = blocks(expanded)["0"]
    eye = torch.zeros_like(block.branches.conv1x1_kxk.conv1.weight)
    nn.init.dirac_(eye)
    assert torch.equal(block.branches.conv1x1_kxk.conv1.weight.detach(), eye)  # DBB's identity 1x1
    assert torch.equal(block.branches.conv1x1.bn.weight.detach(), torch.ones(6))


@pytest.mark.parametrize("scheme", ["repvgg", "acnet", "dbb", "mobileone"])
def test_preserve_holds_in_train_mode_too(scheme: str) -> None:
    model = tiny_net().double().train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme=scheme).train()
    assert max_rel_error(expanded(x), copy.deepcopy(model)(x)) <= 1e-12  # batch statistics, same output


def test_train_eval_modes_and_state_dict_round_trip() -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="dbb")
    expanded.train()
    assert all(m.training for m in expanded.modules())
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        expanded(x).square().mean().backward()
        opt.step()
    expanded.eval()
    assert not any(m.training for m in expanded.modules())
    fresh = fxfuse.expand(tiny_net(), x, scheme="dbb").eval()
    assert max_rel_error(run(fresh, x), run(expanded, x)) > 1e-4
    fresh.load_state_dict(expanded.state_dict())
    assert torch.equal(run(fresh, x), run(expanded, x))
    keys = expanded.state_dict().keys()
    assert "0.main.conv.weight" in keys and "0.branches.conv1x1_avg.bn.bn.running_var" in keys


def test_bn_and_pad_train_border_is_bn_of_zero() -> None:
    """Train mode: BN on the unpadded input (batch statistics), border = BN(0) from the running statistics."""
    from fxfuse.expansion import BNAndPad

    layer = BNAndPad(3, (1, 2)).double()
    randomize_batchnorm_(layer, 0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    bn = copy.deepcopy(layer.bn)
    y = layer.train()(x)
    inner = bn.train()(x)
    assert y.shape == (2, 3, 6, 9)
    torch.testing.assert_close(y[:, :, 1:-1, 2:-2], inner)
    a = layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)
    border = (layer.bn.bias - a * layer.bn.running_mean).detach()
    torch.testing.assert_close(y[:, :, 0, 0], border.expand(2, 3))
    torch.testing.assert_close(y[:, :, -1, 4], border.expand(2, 3))
    layer.eval()  # eval: exactly bn(zero_pad(x)), border = BN(0)
    torch.testing.assert_close(layer(x), layer.bn(nn.functional.pad(x, (2, 2, 1, 1))), rtol=0, atol=0)


def test_amp_bfloat16_forward_backward() -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="dbb").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = expanded(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in expanded.parameters())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_one_process(tmp_path: Any) -> None:
    import torch.distributed as dist

    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="repvgg").train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(expanded)
        before = copy.deepcopy(expanded.state_dict())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp(x).square().mean().backward()
        opt.step()
        changed = [k for k, v in expanded.state_dict().items() if not torch.equal(v, before[k])]
        assert any(".branches.identity.bn.weight" in k for k in changed)
        assert any(".branches.conv1x1.bn.running_mean" in k for k in changed)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~10-20 s on 2 cores
def test_torch_compile_smoke() -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="dbb").train()
    compiled = torch.compile(expanded, backend="aot_eager")  # dynamo + AOTAutograd, no C++ toolchain needed
    out = compiled(x)
    out.square().mean().backward()
    ref = copy.deepcopy(expanded)
    assert all(p.grad is not None for p in expanded.parameters())
    expanded.eval()
    ref.eval()
    torch.testing.assert_close(torch.compile(expanded, backend="aot_eager")(x), ref(x))


@pytest.mark.slow
def test_torch_compile_inductor() -> None:
    x = torch.randn(4, 3, 8, 8)
    expanded = fxfuse.expand(tiny_net(), x, scheme="acnet").train()
    torch.compile(expanded)(x).square().mean().backward()
    expanded.eval()
    torch.testing.assert_close(torch.compile(expanded)(x), copy.deepcopy(expanded)(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- selection and skips
def test_where_patterns_and_predicate() -> None:
    x = torch.randn(1, 3, 32, 32)
    model = torchvision.models.resnet18(num_classes=10).eval()
    only = fxfuse.expand(model, x, scheme="repvgg", where="layer1.*", verify=False)
    assert sorted(blocks(only)) == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert all(isinstance(only.get_submodule(n.replace("conv", "bn")), nn.Identity) for n in blocks(only))
    assert isinstance(only.layer2[0].bn1, nn.BatchNorm2d)
    skipped = {s.name: s.reason for s in only.fxfuse_expand_report.skipped}
    assert skipped["layer2.0.conv1"] == "not selected by `where`"
    two = fxfuse.expand(model, x, scheme="repvgg", where=["conv1", "layer4.1.*"], verify=False)
    assert sorted(blocks(two)) == ["conv1", "layer4.1.conv1", "layer4.1.conv2"]
    pred = fxfuse.expand(model, x, scheme="acnet", where=lambda name, conv: conv.stride == (2, 2), verify=False)
    want = sorted(n for n, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and m.stride == (2, 2) and m.kernel_size != (1, 1))
    assert sorted(blocks(pred)) == want
    assert fnmatch.fnmatchcase("layer1.0.conv1", "layer1.*")


class Awkward(nn.Module):
    """Convs expand must leave alone, one per reason."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.pre = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.ok = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(x))
        x = self.reflect(x)
        x = nn.functional.conv2d(x, self.weight, padding=1)
        x = self.bn(nn.functional.pad(self.pre(x), [1, 1, 1, 1]))
        return self.up(self.ok(x))


def test_skip_reasons() -> None:
    model = randomize_batchnorm_(Awkward(), 0).eval()
    x = torch.randn(1, 4, 6, 6)
    expanded = fxfuse.expand(model, x, scheme="repvgg")
    report = expanded.fxfuse_expand_report
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["shared"] == "called at 2 places (a shared module)"
    assert reasons["reflect"].startswith("padding_mode='reflect'")
    assert reasons["up"] == "ConvTranspose2d: only nn.Conv2d is expanded"
    assert reasons["conv2d"].startswith("functional convolution")
    assert reasons["pre"].startswith("its output is zero-padded next")
    assert report.expanded_names == ["ok"] and isinstance(expanded.ok, ExpandedConv2d)
    assert report.verified is True
    assert "skipped shared: called at 2 places" in str(report)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            y = y * 2
        return self.head(y)


def test_module_walk_when_the_model_does_not_trace() -> None:
    model = f64_eval(randomize_batchnorm_(Untraceable(), 0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme="repvgg")
    report = expanded.fxfuse_expand_report
    assert report.capture.startswith("module walk")
    assert [(e.name, e.batch_norm) for e in report.expanded] == [("body.0", "body.1"), ("head", None)]
    assert {s.name: s.reason for s in report.skipped} == {"unused": "not run on the example input"}
    assert isinstance(expanded.body[1], nn.Identity)
    assert max_rel_error(run(expanded, x), run(model, x)) <= RTOL


def test_inplace_and_errors() -> None:
    x = torch.randn(1, 3, 8, 8)
    model = tiny_net().eval()
    same = fxfuse.expand(model, x, scheme="acnet", inplace=True)
    assert same is model and blocks(model)
    with pytest.raises(ValueError, match="unknown scheme"):
        fxfuse.expand(tiny_net(), x, scheme="nope")
    with pytest.raises(ValueError, match="init must be one of"):
        fxfuse.expand(tiny_net(), x, scheme="dbb", init="zeros")
    with pytest.raises(TypeError):
        fxfuse.expand(lambda t: t, x, scheme="dbb")  # type: ignore[arg-type]


def test_geometry_rules() -> None:
    g = ConvGeometry(4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, False)
    assert g.aligned_padding((1, 1)) == (0, 0) and g.aligned_padding((1, 3)) == (0, 1) and g.identity_fits
    valid = ConvGeometry(4, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, False)
    assert valid.aligned_padding((1, 1)) is None and not valid.identity_fits
    dilated = ConvGeometry(4, 4, (5, 5), (1, 1), (4, 4), (2, 2), 1, False)
    assert dilated.aligned_padding((1, 1)) == (0, 0) and dilated.aligned_padding((3, 3)) == (2, 2)
    assert dilated.identity_fits and not dilated.avg_pool_fits
    even = ConvGeometry(4, 4, (2, 2), (1, 1), (1, 1), (1, 1), 1, False)
    assert even.aligned_padding((1, 1)) is None and not even.identity_fits


def test_one_geometry_type() -> None:
    """``ConvGeometry`` is one type: what schemes see, what fxfuse.testing draws, what a ConvSpec has."""
    import fxfuse.ir
    import fxfuse.testing

    assert ConvGeometry is fxfuse.ir.ConvGeometry is fxfuse.testing.ConvGeometry
    g = ConvGeometry(4, 6, (3, 5), (2, 2), (1, 2), (1, 1), 2, True)
    conv = g.conv()
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (6, 2, 3, 5)
    spec = fxfuse.ir.ConvSpec(conv.weight.detach(), torch.ones(6), conv.stride, conv.padding, conv.dilation, 2)
    assert spec.geometry == g


# -------------------------------------------------------------------------------------- a user scheme
def test_user_scheme_end_to_end() -> None:
    @fxfuse.expansion.register_scheme("test_wide_1x1")
    def wide(g: ConvGeometry, copies: int = 2) -> Plan:
        """1x1-BN branches (``copies`` of them) and a BN-free 1x1→kxk chain."""
        if g.pointwise or g.aligned_padding((1, 1)) is None:
            return Plan(notes=("no 1x1 room",))
        return Plan(tuple(Branch("conv", (1, 1), name=f"pw{i}") for i in range(copies))
                    + (Branch("1x1_kxk", bn=False, internal_channels=2 * g.in_channels),))

    try:
        assert fxfuse.expansion.get_scheme("test_wide_1x1") is wide
        with pytest.raises(ValueError, match="already registered"):
            fxfuse.expansion.register_scheme("test_wide_1x1")(lambda g: [])
        model = f64_eval(tiny_net())
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        expanded = fxfuse.expand(model, x, scheme=wide.with_options(copies=3))
        assert sorted(blocks(expanded)) == ["0", "3", "6"]
        assert list(blocks(expanded)["3"].branches) == ["pw0", "pw1", "pw2", "conv1x1_kxk"]
        assert blocks(expanded)["3"].branches.conv1x1_kxk.conv1.out_channels == 12
        assert {s.name: s.reason for s in expanded.fxfuse_expand_report.skipped} == {
            "8": "scheme 'test_wide_1x1' adds no branch here: no 1x1 room"}
        assert max_rel_error(run(expanded.eval(), x), run(model, x)) <= RTOL
        randomize_batchnorm_(expanded, 3)
        with torch.no_grad():  # the BN-free chains start at zero: give them weights
            for block in blocks(expanded).values():
                block.branches.conv1x1_kxk.conv2.weight.normal_()
        plain, collapsed = fxfuse.reparametrize(model, x), fxfuse.reparametrize(expanded.eval(), x)
        assert conv_geometries_of(collapsed) == conv_geometries_of(plain)
        assert max_rel_error(run(collapsed, x), run(expanded, x)) <= RTOL
    finally:
        fxfuse.expansion.unregister_scheme("test_wide_1x1")
    assert "test_wide_1x1" not in {s.name for s in fxfuse.expansion.registered_schemes()}


# ------------------------------------------------------------------------------ quantization readiness
def test_weight_growth_in_the_fusion_report() -> None:
    """Per fused conv: per-output-channel max-abs of the fused kernel / of the main branch's original kernel."""
    torch.manual_seed(0)
    model = f64_eval(randomize_batchnorm_(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                                        nn.BatchNorm2d(4)), 0))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme="repvgg")
    identity_bn = expanded[0].branches.identity.bn
    with torch.no_grad():  # one channel's identity branch blows up: a quantization outlier
        identity_bn.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0], dtype=torch.float64))
    fused = fxfuse.reparametrize(expanded.eval(), x)
    (growth,) = fused.fxfuse_report.weight_growth
    main, bn = model[0].weight.detach(), model[1]
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused_w = dict(fused.named_modules())[growth.module].weight.detach()
    want = fused_w.abs().flatten(1).amax(1) / main.abs().flatten(1).amax(1)
    lower_median = float(want.sort().values[1])
    assert growth.channels == 4 and 3 in growth.outliers
    assert growth.outliers == tuple(int(i) for i in torch.nonzero(want > 4 * lower_median).flatten())
    assert abs(growth.max_growth - float(want.max())) <= 1e-12
    assert abs(growth.median_growth - lower_median) <= 1e-12
    torch.testing.assert_close(want[:3], a[:3].abs().detach())  # channels 0-2: only the folded main BN scale
    assert "weight range outliers" in str(fused.fxfuse_report)


def test_explain_prints_weight_growth() -> None:
    import io

    from fxfuse.tools.cli import main

    out = io.StringIO()
    assert main(["explain", "repvgg-tiny"], stdout=out, stderr=io.StringIO()) == 0
    line = next(x for x in out.getvalue().splitlines() if x.startswith("weight range growth vs main-branch kernels"))
    assert float(line.split("max ")[1].split("x")[0]) > 1.0  # folded BN scales and branches widen the range


def test_string_padding_resolves() -> None:
    same, valid = nn.Conv2d(4, 4, (3, 5), padding="same", dilation=2), nn.Conv2d(4, 4, 3, padding="valid")
    assert ConvGeometry.of(same).padding == (2, 4) and ConvGeometry.of(valid).padding == (0, 0)


@pytest.mark.parametrize("online", [False, True])
def test_same_padding_expands_and_collapses(online: bool) -> None:
    """``padding="same"`` resolves to the numeric padding (``ConvGeometry.of``) in the blocks and the online
    kernel: the expanded model equals the original, and collapses to a conv of the same geometry."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4)),
                                 0).double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expanded = fxfuse.expand(model, x, scheme="repvgg", online=online).eval()
    assert blocks(expanded)
    with torch.no_grad():
        assert max_rel_error(expanded(x), model(x)) <= 1e-9
    collapsed = fxfuse.reparametrize(expanded, x)
    assert conv_geometries_of(collapsed) == conv_geometries_of(fxfuse.reparametrize(model, x))
