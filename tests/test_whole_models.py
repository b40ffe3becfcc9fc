"""Whole networks: every reference net reaches the structural optimum (one conv per deploy conv, no BN, no pool,
no add inside blocks) and equals the original in float64; torchvision models lose every conv-following BN."""

import pytest
import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse import models
from fxfuse.testing import assert_close_f64

from _helpers import fuse_and_check, stats

SMALL = {"repvgg-A0": (2, 3, 64, 64), "repvgg-B1g2": (1, 3, 64, 64), "repvgg-article": (2, 3, 64, 64),
         "repvgg-tiny": (2, 3, 32, 32), "repvgg-tiny_g2": (2, 3, 32, 32)}


def deploy_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in models.plain_twin(model).modules())


@pytest.mark.parametrize("name", [
    "repvgg-A0",
    # B1g2 (grouped 3x3 every other layer, 64x64 input) is the biggest net here; repvgg-tiny_g2 is the same blocks
    # with groups 2 on identity blocks and a stride-2 opener
    pytest.param("repvgg-B1g2", marks=pytest.mark.slow),
    "repvgg-article", "repvgg-tiny", "repvgg-tiny_g2", "acnet", "dbb", "mobileone", "bn-after-sum",
])
def test_reference_net_reaches_the_optimum(name):
    model = models.build(name)
    shape = SMALL.get(name, models.default_input_shape(name))
    x = torch.randn(*shape)
    fused = fuse_and_check(model, x, rtol=1e-9, second=torch.randn(3, *shape[1:]))
    s = stats(fused)
    assert s.convs == deploy_convs(model), fused.fxfuse_report.summary()
    assert s.batch_norms == 0 and s.pools == 0 and s.adds == 0
    assert not fused.fxfuse_report.unfused


def test_repvgg_a0_one_conv_per_block():
    model = models.build("repvgg-A0")
    fused = fuse_and_check(model, torch.randn(1, 3, 64, 64), rtol=1e-9)
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert kinds.count("Conv2d") == 22 and kinds.count("Linear") == 1 and "BatchNorm2d" not in kinds


@pytest.mark.parametrize(("name", "shape"), [
    ("resnet18", (2, 3, 64, 64)), ("mobilenet_v2", (1, 3, 32, 32)),
    # vgg11_bn (its 25088x4096 classifier in float64) is also in tests/test_zoo.py's default subset
    pytest.param("vgg11_bn", (1, 3, 32, 32), marks=pytest.mark.slow),
])
def test_torchvision_models(name, shape):
    model = torchvision.models.get_model(name, weights=None)
    fused = fuse_and_check(model, torch.randn(*shape), rtol=1e-9, second=torch.randn(1, *shape[1:]))
    assert stats(fused).batch_norms == 0
    assert stats(fused).convs == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_float32_result_equals_original_within_float32_rounding():
    model = models.randomize_batchnorm_(models.build("repvgg-tiny"), 3).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = fxfuse.reparametrize(model, x)
    assert all(p.dtype == torch.float32 for p in fused.parameters())
    with torch.no_grad():
        assert_close_f64(model(x), fused(x), rtol=1e-5)  # float32 rounding of a 8-conv net: ~1e-6
    report = fused.fxfuse_report
    assert report.verify_dtype == "float64" and report.max_rel_error < 1e-12 and not report.rolled_back
