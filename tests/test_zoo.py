"""``reparametrize`` on the torchvision model zoo (harness: ``benchmarks/zoo.py``).

Each model is built with ``weights=None``, BN statistics randomized, eval mode, float64 (RAFT: float32, its
rewritten sub-modules checked in float64). The default run covers a representative subset (small inputs); the full
``list_models()`` sweep runs with ``--runslow``. Per model, ``check_model`` asserts nothing itself; the tests do:

* numbers: outputs equal to the original's (relative ≤ 1e-9 of max-abs, float64) on the example input and on an
  input of another batch size; ``verify=True`` accepted the result;
* structure: no BatchNorm left whose input is a conv/linear with no other real user (checked on every fx graph in
  the result), the BatchNorms still executed are exactly the ones that cannot fold (``BN_LEFT``), no conv added;
* the input model's ``state_dict`` is bit-identical afterwards;
* untraceable models (detection) go through the sub-module fallback and the report says what was rewritten.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]


def _load_zoo():
    spec = importlib.util.spec_from_file_location("fxfuse_zoo_harness", ROOT / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

DEFAULT = [
    "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "googlenet", "densenet121",
    "shufflenet_v2_x0_5", "r3d_18", "convnext_tiny", "fasterrcnn_mobilenet_v3_large_320_fpn", "mobilenet_v2",
    "vgg11_bn",
]
FALLBACK = {"fasterrcnn_mobilenet_v3_large_320_fpn"}

# BatchNorms that must stay, per model: DenseNet's pre-activation BNs (BN -> ReLU -> conv; 58 dense layers' norm1,
# 3 transitions, the final norm5). Every other model of the subset keeps none.
BN_LEFT = {"densenet121": 62}


@pytest.fixture(autouse=True)
def _one_thread():
    """The float64 checks are small; one thread keeps them fast when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _undone_ill_conditioned(row) -> bool:
    """The pass undid sub-module rewrites because the whole output changed, and that output is decided by rounding
    noise (scaling every weight by 1 + 1e-15 changes it by more than 1e-9): no exact rewrite could keep it."""
    undone = any(why.startswith("rewrite undone") for why in row.submodules.values())
    return undone and row.conditioning > 1e-9


def _assert_row(row, name: str) -> None:
    assert row.passed, f"{name}: {row.failures}\n{row.detail}"
    assert row.status in ("ok", "fallback"), f"{name} was {row.status}: {row.detail}"
    assert row.unfused_conv_bn == [] or _undone_ill_conditioned(row), row.unfused_conv_bn
    if row.float32_reason:
        assert row.max_rel_error <= zoo.FLOAT32_RTOL and row.max_rel_error_f64 <= 1e-9
        assert row.submodule_checks and all(c.ok for c in row.submodule_checks.values())
    else:
        assert row.max_rel_error <= 1e-9, row.max_rel_error
    assert row.state_untouched
    assert row.convs[1] <= row.convs[0]
    assert row.batch_norms[1] <= row.batch_norms[0]


@pytest.mark.parametrize("name", DEFAULT)
def test_zoo_subset(name: str) -> None:
    row = zoo.check_model(name, speed=False)
    _assert_row(row, name)
    assert row.unfused_conv_bn == []
    assert row.batch_norms[1] == BN_LEFT.get(name, 0), (row.batch_norms, row.unfused)
    if row.batch_norms[0] > BN_LEFT.get(name, 0):
        assert row.rewrites_by_rule.get("conv_bn", 0) >= row.batch_norms[0] - BN_LEFT.get(name, 0)
    assert row.untraced_bns == []
    if name in FALLBACK:
        assert row.status == "fallback"
        assert row.submodules["<root>"].startswith("not traced")
        assert row.submodules["backbone"].startswith("rewritten")
        # every sub-module the fallback looked at is accounted for: rewritten, or why not
        assert all(why.startswith(("rewritten", "not traced", "not run", "left as is", "trace differs"))
                   for why in row.submodules.values()), row.submodules
    else:
        assert row.status == "ok"


def test_fallback_report_and_untouched_input() -> None:
    """The detection fallback: rewritten sub-modules are GraphModules in the result, the untraced parts stay the
    original classes, the report names both, and the input model is not modified."""
    case = zoo.zoo_case("fasterrcnn_mobilenet_v3_large_320_fpn")
    model = case.build().double()
    x = zoo._double(case.inputs(1))
    before = zoo.state_fingerprint(model)
    fused = __import__("fxfuse").reparametrize(model, x)
    report = fused.fxfuse_report
    assert report.traced_whole is False
    rewritten = [p for p, why in report.submodules.items() if why.startswith("rewritten")]
    assert "backbone" in rewritten
    for path in rewritten:
        assert isinstance(fused.get_submodule(path), torch.fx.GraphModule), path
    assert type(fused.roi_heads) is type(model.roi_heads)  # untraceable glue stays as it was
    assert report.before.batch_norms == 46 and report.after.batch_norms == 0
    assert zoo.unfused_conv_bn(fused) == []
    assert zoo.state_fingerprint(model) == before
    with torch.no_grad():
        assert zoo.max_rel_error(model(*x), fused(*x)) <= 1e-9


def test_harness_catches_an_unfolded_bn_and_a_wrong_output() -> None:
    """The checkers can fail: a conv -> BN left in a graph is reported; a changed output is measured."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    zoo.randomize_batchnorm_(net)
    gm = torch.fx.symbolic_trace(net.eval())
    assert zoo.unfused_conv_bn(gm) == ["<root>:_0->_1"]
    x = torch.randn(2, 3, 8, 8)
    y = gm(x)
    assert zoo.max_rel_error(y, y.clone()) == 0.0
    assert zoo.max_rel_error(y, y * (1 + 1e-6)) > 1e-9
    assert zoo.max_rel_error({"a": y}, [y]) == math.inf
    before = zoo.state_fingerprint(net)
    with torch.no_grad():  # the smallest possible change: one float32 ulp of one statistic
        v = net[1].running_var
        v[0] = torch.nextafter(v[0], v[0] + 1)
    assert zoo.state_fingerprint(net) != before


SLOW = [n for n in zoo.all_models() if n not in DEFAULT]


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_zoo_full(name: str) -> None:
    """Every other model of ``torchvision.models.list_models()``: equal and verified, or refused with a reason
    (:class:`fxfuse.FusionError`) — or, in the fallback, rewrites undone — and then only where the output is
    decided by rounding noise."""
    row = zoo.check_model(name, speed=False)
    if row.status == "refused":
        assert row.conditioning > 1e-9, f"{name} refused although well-conditioned: {row.detail}"
        return
    _assert_row(row, name)


def test_zoo_lists_every_model() -> None:
    assert set(DEFAULT + SLOW) == set(torchvision.models.list_models())
    assert len(DEFAULT) + len(SLOW) == len(torchvision.models.list_models())
