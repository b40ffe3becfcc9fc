"""Dtypes, devices and layouts: what goes in comes out.

* float16 / bfloat16 / float32 / float64 models: the fused tensors are computed in float64 from the model's own
  (rounded) values and cast back once, so ``fuse(model.to(dt))`` is *bit-identical* to
  ``fuse(model.to(dt).double()).to(dt)``; outputs stay within a few ulps of the original; every surviving
  parameter/buffer keeps its dtype and every new fused conv gets the dtype of the conv it replaces.
* device (CPU here; the ``cuda``-marked tests repeat the checks on a GPU), ``channels_last`` weights and outputs,
  ``requires_grad`` of fused parameters.
* the returned model was run by the pass in its own dtype (``report.artifact_check``; tests/test_artifact.py checks
  that check: graph constants, forward caches, float64 on purpose).

Outputs are compared with :func:`fxfuse.testing.assert_close_f64` (``max|out − ref| ≤ rtol · max|ref|`` in float64)
at tolerances stated here in units of the dtype's ``eps`` — not :func:`fxfuse.verify.default_rtol`, the pass's own
tolerance, which these tests check rather than use.

Models: the reference RepVGG (``repvgg-tiny`` at 32x32) and torchvision's resnet18 (64x64), random BN statistics.
"""

from __future__ import annotations

import copy
from typing import Dict, Iterator, Tuple

import pytest
import torch
import torchvision
from torch import Tensor, nn

import fxfuse
from fxfuse import GraphStats
from fxfuse.models import build, randomize_batchnorm_
from fxfuse.testing import assert_close_f64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (convs, batch_norms, adds) left after fusion.
EXPECTED = {"repvgg-tiny": (8, 0, 0), "resnet18": (20, 0, 8)}


def make(name: str, seed: int = 0, *, features: bool = False) -> Tuple[nn.Module, Tensor]:
    """An eval-mode float32 model with random BN statistics and an input for it."""
    torch.manual_seed(seed)
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
        if features:
            model = nn.Sequential(*list(model.children())[:-2])
        shape = (1, 3, 64, 64)
    else:
        model = build(name, num_classes=None) if features else build(name)
        shape = (1, 3, 64, 64) if features else (2, 3, 32, 32)  # features: 2x2 output, so layout is visible
    randomize_batchnorm_(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
    return model.eval(), x


def structure(fused: nn.Module) -> Tuple[int, int, int]:
    s = GraphStats.of(fused)
    return s.convs, s.batch_norms, s.adds


def run_or_skip(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)``, skipping the test where this torch build has no kernel for an op in this dtype/device."""
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, NotImplementedError) as exc:
        if "not implemented" in str(exc).lower() or isinstance(exc, NotImplementedError):
            pytest.skip(f"{x.dtype} on {x.device} unsupported by torch {torch.__version__}: {exc}")
        raise


def dtypes_by_name(module: nn.Module) -> Dict[str, torch.dtype]:
    return {k: v.dtype for k, v in module.state_dict().items()}


def check_low_precision(model: nn.Module, x: Tensor, dtype: torch.dtype, expected: Tuple[int, int, int]) -> None:
    """Fuse ``model.to(dtype)`` and check: bit-identical to the float64 fold cast once to ``dtype``; outputs within
    a few ``eps(dtype)``; dtypes of every tensor preserved; structure as expected."""
    low = copy.deepcopy(model).to(dtype)
    xl = x.to(dtype)
    y_low = run_or_skip(low, xl)
    fused = fxfuse.reparametrize(low, xl)
    # The same fold, done by hand in float64 from the very same rounded values, then cast once.
    reference = fxfuse.reparametrize(copy.deepcopy(low).double(), xl.double())

    assert structure(fused) == expected == structure(reference)
    got, want = fused.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for k in got:
        assert got[k].dtype == (dtype if want[k].is_floating_point() else want[k].dtype), k
        assert torch.equal(got[k], want[k].to(got[k].dtype)), f"{k} is not the float64 fold rounded once"
    assert {t.dtype for t in fused.parameters()} == {dtype}
    before = dtypes_by_name(low)
    after = dtypes_by_name(fused)
    assert all(after[k] == before[k] for k in after.keys() & before.keys())

    eps = torch.finfo(dtype).eps
    with torch.no_grad():
        y_fused = fused(xl)
        # Only the fused weights were rounded (to eps/2 each): run both in float64 to see just that error.
        y64_fused = copy.deepcopy(fused).double()(x.double())
        y64_orig = copy.deepcopy(low).double()(x.double())
    assert y_fused.dtype == y_low.dtype == dtype
    assert_close_f64(y64_orig, y64_fused, rtol=2 * eps)  # measured <= 0.45 eps
    # Activations are rounded too, and the conv kernels accumulate in an order that depends on the machine: measured
    # <= 0.9 eps on one 2-core Xeon, 4.4 eps on another (float32, 2026-12-03; the same on the v0.2 code).
    assert_close_f64(y_low, y_fused, rtol=8 * eps)
    assert fused.fxfuse_report.artifact_check.startswith(f"ran in {str(dtype).replace('torch.', '')}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_repvgg_low_precision(dtype: torch.dtype) -> None:
    model, x = make("repvgg-tiny")
    check_low_precision(model, x, dtype, EXPECTED["repvgg-tiny"])


def test_resnet18_float16() -> None:
    """(bfloat16 convs are slow on CPU; the repvgg test covers bfloat16.)"""
    model, x = make("resnet18")
    check_low_precision(model, x, torch.float16, EXPECTED["resnet18"])


class MixedPrecision(nn.Sequential):
    """float32 BN on the input (left unfused: the zero-padded conv after it forbids folding its shift), then
    float16 conv → float32 BN (fused into a float16 conv), ReLU, float16 conv → float16 BN."""

    def __init__(self) -> None:
        super().__init__(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self[1].half()
        self[4].half()
        self[5].half()


def test_mixed_dtypes_each_tensor_keeps_its_own() -> None:
    model = randomize_batchnorm_(MixedPrecision(), 3).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).half()
    y = run_or_skip(model, x)
    fused = fxfuse.reparametrize(model, x)
    reference = fxfuse.reparametrize(copy.deepcopy(model).double(), x.double())

    assert structure(fused) == (2, 1, 0)
    after, before = dtypes_by_name(fused), dtypes_by_name(model)
    survivors = after.keys() & before.keys()
    assert survivors == {"0.weight", "0.bias", "0.running_mean", "0.running_var", "0.num_batches_tracked"}
    assert all(after[k] == before[k] for k in survivors)
    assert after["0.num_batches_tracked"] == torch.int64
    new_convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(new_convs) == 2 and all(c.weight.dtype == c.bias.dtype == torch.float16 for c in new_convs)
    want = reference.state_dict()
    for k, v in fused.state_dict().items():
        assert torch.equal(v, want[k].to(v.dtype)), k
    with torch.no_grad():
        out = fused(x)
        y64 = copy.deepcopy(model).double()(x.double())
        out64 = copy.deepcopy(fused).double()(x.double())
    assert out.dtype == y.dtype == torch.float16
    assert_close_f64(y64, out64, rtol=2 * torch.finfo(torch.float16).eps)
    assert_close_f64(y, out, rtol=4 * torch.finfo(torch.float16).eps)
    assert fused.fxfuse_report.artifact_check.startswith("ran in float16")


def test_verify_false_folds_in_float64_too() -> None:
    """``verify=False`` skips the reference run, not the float64 arithmetic: same bits as the verified pass."""
    model = randomize_batchnorm_(MixedPrecision(), 4).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)).half()
    run_or_skip(model, x)
    verified = fxfuse.reparametrize(model, x)
    unverified = fxfuse.reparametrize(model, x, verify=False)
    assert unverified.fxfuse_report.verified is None and structure(unverified) == structure(verified) == (2, 1, 0)
    want = verified.state_dict()
    got = unverified.state_dict()
    assert list(got) == list(want)
    assert all(v.dtype == want[k].dtype and torch.equal(v, want[k]) for k, v in got.items())


# ------------------------------------------------------------------------------------------------ device
def check_device(name: str, device: str, dtype: torch.dtype) -> None:
    model, x = make(name)
    model, x = model.to(device, dtype), x.to(device, dtype)
    y = run_or_skip(model, x)
    fused = fxfuse.reparametrize(model, x)
    tensors = list(fused.state_dict().values())
    assert {t.device.type for t in tensors} == {torch.device(device).type}
    assert {t.dtype for t in fused.parameters()} == {dtype}
    assert structure(fused) == EXPECTED[name]
    with torch.no_grad():
        out = fused(x)
    assert out.device == y.device and out.dtype == y.dtype
    tol = 1e-9 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
    assert_close_f64(y, out, rtol=tol)
    if dtype != torch.float64:  # fused on `device` in float64, rounded once
        reference = fxfuse.reparametrize(copy.deepcopy(model).double(), x.double())
        want = reference.state_dict()
        for k, v in fused.state_dict().items():
            assert torch.equal(v, want[k].to(v.dtype)), k


def test_cpu_float64_device_and_dtype_preserved() -> None:
    check_device("repvgg-tiny", "cpu", torch.float64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["repvgg-tiny", "resnet18"])
def test_cuda_device_preserved(name: str, dtype: torch.dtype) -> None:
    check_device(name, "cuda", dtype)


@pytest.mark.cuda
def test_cuda_channels_last_float16() -> None:
    check_channels_last("repvgg-tiny", "cuda", torch.float16)


# ------------------------------------------------------------------------------------------ channels_last
def check_channels_last(name: str, device: str, dtype: torch.dtype) -> None:
    """A channels_last model run on channels_last input: fused conv weights and the output are channels_last;
    the input model keeps its layout."""
    model, x = make(name, features=True)
    cl = torch.channels_last
    model = model.to(device, dtype).to(memory_format=cl)
    x = x.to(device, dtype).contiguous(memory_format=cl)
    y = run_or_skip(model, x)
    assert y.is_contiguous(memory_format=cl)
    fused = fxfuse.reparametrize(model, x)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == EXPECTED[name][0]
    assert all(c.weight.is_contiguous(memory_format=cl) for c in convs)
    assert all(c.weight.dtype == dtype and c.weight.device.type == device for c in convs)
    assert all(m.weight.is_contiguous(memory_format=cl) for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        out = fused(x)
    assert out.is_contiguous(memory_format=cl) and not out.is_contiguous()
    tol = 1e-9 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
    assert_close_f64(y, out, rtol=tol)


@pytest.mark.parametrize("name", ["repvgg-tiny", "resnet18"])
def test_channels_last_stays_channels_last(name: str) -> None:
    check_channels_last(name, "cpu", torch.float64)


def test_contiguous_stays_contiguous() -> None:
    model, x = make("repvgg-tiny", features=True)
    fused = fxfuse.reparametrize(model, x)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.weight.is_contiguous() for c in convs)
    with torch.no_grad():
        assert fused(x).is_contiguous()


# ------------------------------------------------------------------------------------------ requires_grad
def test_requires_grad_follows_the_originals() -> None:
    """All trainable → fused trainable (and gradients flow); all frozen → fused frozen; a frozen block → its
    fused conv frozen, the rest trainable."""
    model, x = make("repvgg-tiny")
    fused = fxfuse.reparametrize(model, x)
    assert {p.requires_grad for p in fused.parameters()} == {True}
    fused(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fused.parameters())

    frozen = copy.deepcopy(model).requires_grad_(False)
    assert {p.requires_grad for p in fxfuse.reparametrize(frozen, x).parameters()} == {False}

    partly = copy.deepcopy(model)
    partly.stage0.requires_grad_(False)
    fused = fxfuse.reparametrize(partly, x)
    trainable = {name: p.requires_grad for name, p in fused.named_parameters()}
    frozen_names = [n for n, rg in trainable.items() if not rg]
    assert len(frozen_names) == 2  # weight and bias of the one conv the stem block became
    stem_conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert not stem_conv.weight.requires_grad and not stem_conv.bias.requires_grad
    assert stem_conv.in_channels == 3
    assert [p.requires_grad for p in partly.parameters()] == \
        [not n.startswith("stage0") for n, _ in partly.named_parameters()]
