"""Bad input gets a typed error whose message says what to do; odd-but-valid input works.

Decisions:
* not a module / not an input → ``TypeError``; an input the model cannot run → ``ValueError`` (chained to the
  model's own error); a model that does not trace with ``fallback=False`` → ``FusionError`` quoting the tracer;
  a model whose output holds no floating-point tensor (nothing to verify) → ``FusionError`` unless
  ``verify=False``.
* An empty model (``nn.Sequential()``) is not an error: the result computes the same thing (identity) with
  nothing fused, and a ``UserWarning`` says there was nothing to fuse.
* A model in training mode is not an error either: ``UserWarning``; the result is in eval mode and equals
  ``model.eval()``; the input model stays in training mode with its BN statistics untouched.
* Outputs that are dicts / tuples / lists of tensors work, and *every* leaf is verified.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Optional

import pytest
import torch
from torch import Tensor, fx, nn

import fxfuse
from fxfuse import FusionError, GraphStats
from fxfuse.ir import ConvRead
from fxfuse.ir.folds import scale_conv
from fxfuse.models import build, randomize_batchnorm_
from fxfuse.testing import assert_close_f64
from fxfuse.verify import compare


def repvgg() -> nn.Module:
    return randomize_batchnorm_(build("repvgg-tiny"), 0).eval().double()


def example(channels: int = 3) -> Tensor:
    return torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# ---------------------------------------------------------------------------------------- wrong types
@pytest.mark.parametrize("not_a_module", [lambda t: t, torch.zeros(3), nn.Conv2d, None, "resnet18"],
                         ids=["function", "tensor", "module-class", "None", "str"])
def test_not_a_module_is_a_type_error(not_a_module: Any) -> None:
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module, got"):
        fxfuse.reparametrize(not_a_module, example())


@pytest.mark.parametrize("bad_input", ["x", {"x": torch.zeros(1)}, 3.0], ids=["str", "dict", "float"])
def test_example_input_of_wrong_type(bad_input: Any) -> None:
    with pytest.raises(TypeError, match=r"example_input must be a tensor or a tuple/list"):
        fxfuse.reparametrize(repvgg(), bad_input)


def test_missing_example_input() -> None:
    """Only an ExportedProgram carries its own example inputs; a module needs one."""
    with pytest.raises(TypeError, match=r"needs an example_input"):
        fxfuse.reparametrize(repvgg(), None)


def test_input_the_model_cannot_run_is_a_value_error() -> None:
    model = repvgg()
    with pytest.raises(ValueError, match=r"cannot run on example_input.*4 channels.*Pass a tensor") as info:
        fxfuse.reparametrize(model, example(channels=4))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error is chained


def test_integer_input_for_a_float_model_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot run on example_input"):
        fxfuse.reparametrize(repvgg(), torch.ones(1, 3, 32, 32, dtype=torch.long))


def test_bad_rules_argument() -> None:
    with pytest.raises(ValueError, match="unknown rule 'no_such_rule'; registered: "):
        fxfuse.reparametrize(repvgg(), example(), rules=["no_such_rule"])
    with pytest.raises(TypeError, match="rules must be names, Rule objects or functions"):
        fxfuse.reparametrize(repvgg(), example(), rules=[42])


# ---------------------------------------------------------------------------------------- empty model
def test_empty_model_returns_an_equal_model_and_warns() -> None:
    """Decision: ``nn.Sequential()`` (the identity) is valid input. The result is the identity too, nothing is
    fused, and a UserWarning says there was nothing to fuse."""
    x = example()
    with pytest.warns(UserWarning, match="nothing to fuse"):
        fused = fxfuse.reparametrize(nn.Sequential().eval(), x)
    assert torch.equal(fused(x), x)
    report = fused.fxfuse_report
    assert report.total_fused == 0 and report.verified and not report.rolled_back
    assert not fused.training and not any(True for _ in fused.parameters())


# ----------------------------------------------------------------------------------- output structure
class NestedOutputs(nn.Module):
    """Two conv→BN paths returned as ``{"a": ..., "rest": [b, (a·b summed, b's mean)]}`` (plus non-tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Dict[str, Any]:
        a = self.b1(self.c1(x))
        b = self.b2(self.c2(x))
        return {"a": a, "rest": [b, ((a * b).sum(), b.mean(dim=(2, 3)))], "n": 4, "tag": "ok"}


def double_c2(ctx: fxfuse.RewriteContext, node: fx.Node) -> Optional[Any]:
    """A deliberately wrong rule: replaces conv ``c2`` (which only feeds the nested outputs) by ``2·c2``."""
    if node.op != "call_module" or node.target != "c2":
        return None
    read = ctx.read.conv(node)
    if not isinstance(read, ConvRead):
        return None
    return lambda: ctx.replace(node, ctx.insert_conv(scale_conv(read.spec, 2.0), read.input, before=node,
                                                    like=read.like, name="c2"))


def test_dict_tuple_list_outputs_work_and_every_leaf_is_verified() -> None:
    model = randomize_batchnorm_(NestedOutputs(), 1).eval().double()
    x = example()
    with torch.no_grad():
        want = model(x)
    fused = fxfuse.reparametrize(model, x)
    assert not fused.fxfuse_report.rolled_back
    assert_close_f64(want, fused(x), rtol=1e-9)  # same dict/list/tuple structure, equal "n" and "tag", every leaf
    s = GraphStats.of(fused)
    assert (s.convs, s.batch_norms) == (2, 0)

    # A wrong rewrite (run before conv_bn) that only shows in the nested leaves is caught and rolled back ...
    rules = [fxfuse.Rule("double_c2", double_c2), "conv_bn"]
    fused = fxfuse.reparametrize(model, x, rules=rules)
    assert fused.fxfuse_report.rolled_back == ["double_c2:c2"]
    assert fused.fxfuse_report.fused == {"conv_bn": 2}
    assert_close_f64(want, fused(x), rtol=1e-9)
    # ... which is only true because the check looks at them: unverified, it stays and is wrong.
    broken = fxfuse.reparametrize(model, x, rules=rules, verify=False)
    assert broken.fxfuse_report.fused == {"double_c2": 1, "conv_bn": 2}
    assert_close_f64(want["a"], broken(x)["a"], rtol=1e-9)
    wrong = compare(want, broken(x), rtol=1e-9)
    assert not wrong.ok and wrong.max_rel > 0.1 and "output 1" in wrong.detail  # the first "rest" leaf


class ShapeOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Any:
        y = self.bn(self.conv(x))
        return y.shape[1], "channels", y.argmax()


def test_output_without_float_tensors_is_a_fusion_error() -> None:
    """Nothing numeric to compare → fxfuse cannot prove the rewrite; it refuses unless told not to verify."""
    model = randomize_batchnorm_(ShapeOnly(), 2).eval()
    x = example().float()
    with pytest.raises(FusionError, match=r"holds no floating-point tensor.*verify=False"):
        fxfuse.reparametrize(model, x)
    fused = fxfuse.reparametrize(model, x, verify=False)
    assert fused(x)[:2] == (4, "channels") and fused.fxfuse_report.verified is None
    assert GraphStats.of(fused).batch_norms == 0


# ------------------------------------------------------------------------------------ untraceable models
class DataDependent(nn.Module):
    """Control flow on a tensor value: ``torch.fx`` cannot trace the top level; ``body`` traces fine."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: Tensor) -> Tensor:
        y = self.body(x)
        return y if y.sum() > 0 else -y


def test_untraceable_without_fallback_is_a_fusion_error_quoting_the_tracer() -> None:
    model = randomize_batchnorm_(DataDependent(), 3).eval().double()
    with pytest.raises(FusionError, match=r"does not trace with torch\.fx \(TraceError: symbolically traced "
                                          r"variables cannot be used as inputs to control flow\).*fallback=True"
                       ) as info:
        fxfuse.reparametrize(model, example(), fallback=False)
    assert type(info.value.__cause__).__name__ == "TraceError"


def test_untraceable_with_fallback_rewrites_the_traceable_parts() -> None:
    model = randomize_batchnorm_(DataDependent(), 3).eval().double()
    x = example()
    fused = fxfuse.reparametrize(model, x)
    assert not fused.fxfuse_report.traced_whole and fused.fxfuse_report.fused["conv_bn"] == 2
    assert not fused.fxfuse_report.rolled_back
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    with torch.no_grad():
        assert_close_f64(model(x), fused(x), rtol=1e-9)


# ------------------------------------------------------------------------------------------ training mode
def test_training_mode_warns_and_returns_the_eval_model() -> None:
    model = repvgg().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = example()
    with pytest.warns(UserWarning, match="training mode.*eval"):
        fused = fxfuse.reparametrize(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # running stats untouched
    assert not fused.training
    assert "training mode" in " ".join(fused.fxfuse_report.warnings) and not fused.fxfuse_report.rolled_back
    with torch.no_grad():
        assert_close_f64(copy.deepcopy(model).eval()(x), fused(x), rtol=1e-9)
    s = GraphStats.of(fused)
    assert (s.convs, s.batch_norms, s.adds) == (8, 0, 0)


def test_eval_model_gives_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fxfuse.reparametrize(repvgg(), example())
    assert fused.fxfuse_report.warnings == []
