"""Shared assertions for fusion tests: the checker (float64 equality, no rollback), skip reasons, structure counts.

Every fusion test goes through :func:`fuse_and_check`, a thin layer over :func:`fxfuse.testing.assert_reparametrizes`:
BN statistics randomized, float64, outputs equal to ``rtol · max|y|`` on the example input, on another batch and on
any ``second`` input, the input model untouched, and **no rewrite rolled back by verification**. The last point is
what makes a negative test able to fail: a rule that makes exactly the wrong rewrite is undone by verification, so
the op counts alone would look unchanged; the rollback is what shows it.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Dict, Iterator, Optional, Set, Tuple

import pytest
import torch
import torchvision
from hypothesis import settings
from torch import fx, nn

from fxfuse import GraphStats, Reason, RewriteContext
from fxfuse.ir import ops
from fxfuse.models import randomize_batchnorm_
from fxfuse.testing import assert_reparametrizes

_CAPTURE: ContextVar[str] = ContextVar("fxfuse_test_capture", default="auto")

# Set from --runslow by tests/conftest.py (pytest_configure, before any test module is imported): see budget().
FULL_BUDGETS = False


def budget(default_run: int, full: Optional[int] = None) -> int:
    """``max_examples`` for a property test that samples a large space (a rule over any geometry, random nets):
    with ``--runslow`` (``make test-all``, ``make fuzz``) its full budget — ``full``, by default the Hypothesis
    profile's ``max_examples`` — and in the default run (``make test``, ``make mutants``) at most ``default_run``
    examples of the same property."""
    full = settings.default.max_examples if full is None else full
    return full if FULL_BUDGETS else min(default_run, full)


def current_capture() -> str:
    """The ``capture`` :func:`fuse_and_check` passes when the test gives none: ``"auto"``, or what the
    ``capture`` fixture of tests/rules/conftest.py set for this run of the test (``"export"``)."""
    return _CAPTURE.get()


@contextmanager
def default_capture(capture: str) -> Iterator[str]:
    """Within the block, :func:`fuse_and_check` (and :func:`assert_wrong_rewrite_caught`) default to ``capture``."""
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


def fuse_and_check(model: nn.Module, x: Any, *, seed: int = 0, rtol: float = 1e-10, second: Any = None,
                   **kwargs: Any) -> fx.GraphModule:
    """``assert_reparametrizes`` without structure expectations (the caller asserts what was fused): randomize a
    copy's BN statistics (``seed``), reparametrize it in float64, assert equal outputs on ``x``, on another batch
    and on ``second`` (another input, e.g. another spatial size), the copy untouched and ``report.rolled_back``
    empty. ``kwargs`` go to ``assert_reparametrizes`` / ``reparametrize`` (``rules=``, ``enable=``, ``expect_*`` …).
    ``capture`` defaults to :func:`current_capture`. Returns the fused model (float64)."""
    kwargs.setdefault("expect_batch_norms", None)
    kwargs.setdefault("capture", current_capture())
    if second is not None and kwargs["capture"] == "export" and "dynamic_shapes" not in kwargs:
        # Export specializes every dim but the batch: the dims in which ``second`` differs are exported dynamic,
        # so the same fused graph is checked at both sizes (as a symbolic graph is).
        dims = _varying_dims(x, second)
        if dims is not None:
            kwargs["dynamic_shapes"] = dims
    extra = () if second is None else (second,)
    return assert_reparametrizes(model, x, seed=seed, rtol=rtol, extra_inputs=extra, **kwargs)


def _varying_dims(x: Any, second: Any) -> Any:
    """``dynamic_shapes`` for one tensor input: dim 0 and every other dim whose size differs between ``x`` and
    ``second`` marked ``Dim.AUTO`` (torch.export infers the range; a dim the model pins stays static, and the check
    on ``second`` then fails); None when only the batch differs."""
    if not isinstance(x, torch.Tensor) or not isinstance(second, torch.Tensor) or x.dim() != second.dim() \
            or x.shape[1:] == second.shape[1:]:
        return None  # only the batch differs: the default capture already exports it dynamic
    return ({i: torch.export.Dim.AUTO for i in range(x.dim()) if i == 0 or x.shape[i] != second.shape[i]},)


def stats(gm: fx.GraphModule) -> GraphStats:
    """:class:`GraphStats` of ``gm``, with ``nodes`` not counting the input-shape guard an exported graph carries
    (``call_module _guards_fn``, :func:`fxfuse.ir.ops.is_input_guard`): it checks the inputs, computes nothing,
    and is there before and after fusion, so node counts mean the same under both captures."""
    s = GraphStats.of(gm)
    return dataclasses.replace(s, nodes=s.nodes - sum(ops.is_input_guard(n) for n in gm.graph.nodes))


def fused_counts(gm: nn.Module) -> Dict[str, int]:
    return dict(gm.fxfuse_report.fused)


def reasons(gm: nn.Module) -> str:
    return " | ".join(u.reason for u in gm.fxfuse_report.unfused)


def codes(gm: nn.Module) -> Set[Reason]:
    """The reason codes of every candidate left unfused."""
    return {u.code for u in gm.fxfuse_report.unfused}


def assert_skipped(gm: nn.Module, rule: str, code: Reason, *fragments: str) -> None:
    """A negative outcome: ``rule`` did not fire, reported a skip with reason code ``code`` whose sentence contains
    every fragment, and no rewrite was rolled back (a wrong rewrite undone by verification is a failure, not a
    skip). The code is what callers branch on; the fragments check that the sentence names the right thing."""
    assert isinstance(code, Reason), f"assert_skipped(gm, rule, code, *fragments): {code!r} is not a Reason"
    report = gm.fxfuse_report
    assert not report.rolled_back, f"verification rolled back {report.rolled_back}:\n{report}"
    assert report.fused.get(rule, 0) == 0, f"{rule} fired:\n{report}"
    said = [u for u in report.unfused if u.rule == rule and all(f in u.reason for f in fragments)]
    assert said, f"expected a {rule} skip mentioning {fragments}:\n{report}"
    assert any(u.code is code for u in said), \
        f"expected the {rule} skip mentioning {fragments} to have code {code!r}, got {[u.code for u in said]}"


def assert_not_fired(gm: nn.Module, rule: str) -> None:
    """A negative outcome for a candidate ``rule`` does not even recognize (so it reports no reason): the rule did
    not fire, nothing was rolled back, and the rule left no skip entry that would mean it matched."""
    report = gm.fxfuse_report
    assert not report.rolled_back, f"verification rolled back {report.rolled_back}:\n{report}"
    assert report.fused.get(rule, 0) == 0, f"{rule} fired:\n{report}"
    assert not [u for u in report.unfused if u.rule == rule], f"unexpected {rule} skip:\n{report}"


def break_rule(monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    """Make every conv / linear layer that ``rule`` builds wrong by adding 1 to its bias, as a wrong fold would
    (the other rules are left intact)."""
    conv_module, insert_linear = RewriteContext.conv_module, RewriteContext.insert_linear

    def bad_conv_module(self: RewriteContext, spec: Any, like: Any) -> nn.Module:
        return conv_module(self, spec.with_(bias=spec.bias + 1) if self.rule == rule else spec, like)

    def bad_insert_linear(self: RewriteContext, weight: torch.Tensor, bias: torch.Tensor, *args: Any,
                          **kwargs: Any) -> fx.Node:
        return insert_linear(self, weight, bias + 1 if self.rule == rule else bias, *args, **kwargs)

    monkeypatch.setattr(RewriteContext, "conv_module", bad_conv_module)
    monkeypatch.setattr(RewriteContext, "insert_linear", bad_insert_linear)


def assert_wrong_rewrite_caught(monkeypatch: pytest.MonkeyPatch, rule: str, model: nn.Module, x: Any,
                                **kwargs: Any) -> fx.GraphModule:
    """The error case of a rule test: with ``rule`` broken (:func:`break_rule`), verification rolls back every
    rewrite it made and reports each as unfused, the result is still equal, and :func:`fuse_and_check` fails."""
    break_rule(monkeypatch, rule)
    fused = fuse_and_check(model, x, allow_rollback=True, **kwargs)
    report = fused.fxfuse_report
    assert report.rolled_back and all(k.startswith(f"{rule}:") for k in report.rolled_back), report
    assert report.fused.get(rule, 0) == 0, report
    said = {u.node for u in report.unfused if u.rule == rule and u.code is Reason.ROLLED_BACK}
    assert {k.split(":", 1)[1] for k in report.rolled_back} <= said, report
    with pytest.raises(AssertionError, match="rolled back"):
        fuse_and_check(model, x, **kwargs)
    return fused


# (convs, batch_norms, adds) the fused versions of the two "realistic" models keep.
EXPECTED = {"repvgg-tiny": (8, 0, 0), "resnet18": (20, 0, 8)}


def make(name: str = "repvgg-tiny", dtype: torch.dtype = torch.float64, seed: int = 0,
         ) -> Tuple[nn.Module, torch.Tensor]:
    """The reference RepVGG (``repvgg-tiny``, 2x3x32x32) or torchvision resnet18 (1x3x64x64), BN randomized."""
    from fxfuse.models import build

    torch.manual_seed(seed)
    if name == "resnet18":
        model, shape = torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64)
    else:
        model, shape = build(name), (2, 3, 32, 32)
    randomize_batchnorm_(model, seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    return model.eval().to(dtype), x

