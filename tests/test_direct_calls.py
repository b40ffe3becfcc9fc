"""The returned GraphModule calls its sub-modules through ``self._modules`` (``fxfuse.ir.graphs.direct_module_calls``):
the same function as fx's ``self.name(x)``, without ``nn.Module.__getattr__`` on every call, and always the live
sub-module."""

import copy

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.models import build, randomize_batchnorm_


@pytest.fixture(scope="module")
def fused():
    model = randomize_batchnorm_(build("mobileone-zoo"), 0).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, fxfuse.reparametrize(model, x, capture="symbolic"), x


def test_forward_reads_modules_from_the_dict(fused):
    model, gm, x = fused
    names = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert names and all(f"self._modules[{name!r}](" in gm.code for name in names)
    assert not any(f"self.{name}(" in gm.code for name in names)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_replaced_submodule_is_what_runs(fused):
    _, gm, x = fused
    gm = copy.deepcopy(gm)
    from fxfuse.ir.graphs import direct_module_calls

    assert direct_module_calls(gm)  # the deep copy regenerated fx's own code
    last = [n.target for n in gm.graph.nodes if n.op == "call_module"][-1]  # the classifier
    gm._modules[last] = _Zero()
    assert gm(x).abs().max() == 0
    setattr(gm, last, _Ones())
    assert bool((gm(x) == 1).all())


def test_recompile_and_deepcopy_restore_fx_code(fused):
    _, gm, x = fused
    copied = copy.deepcopy(gm)
    assert "self._modules[" not in copied.code
    torch.testing.assert_close(copied(x), gm(x), rtol=0, atol=0)


def test_export_capture_too():
    model = randomize_batchnorm_(build("acnet"), 0).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxfuse.reparametrize(model, x, capture="export")
    if any(n.op == "call_module" for n in gm.graph.nodes):
        assert "self._modules[" in gm.code
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 10)


class _Ones(nn.Module):
    def forward(self, x):
        return torch.ones(x.shape[0], 10)
