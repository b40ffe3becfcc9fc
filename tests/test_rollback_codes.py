"""Roll back, don't refuse: a rewrite that passes the float64 check but whose returned model fails the artifact
check — run in the model's own dtype it raises, or answers beyond that dtype's tolerance — is found by bisection
and undone with its code (``report.rollbacks``), and the model is returned with the other rewrites. (Overflow,
changed output dtype and drift: tests/test_artifact.py, tests/test_lean_artifact.py.)

The faulty rewrites come from a user rule that appends a call after a conv: a function that is the identity in
float64 — where the check runs — and not in the model's own dtype."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest
import torch
from torch import Tensor, fx, nn

import fxfuse
from fxfuse import Reason, RewriteContext
from fxfuse.models import randomize_batchnorm_
from fxfuse.testing import assert_close_f64

RULE = "test_low_precision_only_bug"


def raises_below_float64(t: Tensor) -> Tensor:
    if t.dtype != torch.float64:
        raise RuntimeError("no kernel for this dtype")
    return t


def off_below_float64(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t * 1.05


@pytest.fixture
def buggy_rule(request: pytest.FixtureRequest) -> Iterator[str]:
    fn: Callable[[Tensor], Tensor] = request.param
    done = set()

    @fxfuse.register_rule(RULE, enabled=False, after="conv_bn")
    def appends(ctx: RewriteContext, node: fx.Node):
        key = (id(ctx.gm), node.name)
        if node.op != "call_module" or not str(node.target).startswith("fused") or key in done:
            return None

        def rewrite() -> None:
            done.add(key)
            with ctx.graph.inserting_after(node):
                call = ctx.graph.call_function(fn, (node,))
            node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)

        return rewrite

    yield RULE
    fxfuse.unregister_rule(RULE)


@pytest.mark.parametrize(("buggy_rule", "code"), [(raises_below_float64, Reason.ARTIFACT_RAISES),
                                                  (off_below_float64, Reason.ARTIFACT_MISMATCH)],
                         indirect=["buggy_rule"], ids=["raises", "mismatch"])
def test_artifact_failure_is_rolled_back_with_its_code(buggy_rule: str, code: Reason) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                               nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), 0).eval()
    x = torch.randn(2, 3, 6, 6)
    fused = fxfuse.reparametrize(model, x, enable=[buggy_rule])
    report = fused.fxfuse_report
    assert len(report.rollbacks) == 2 and {r.code for r in report.rollbacks} == {code}, report.rollbacks
    assert all(r.key.startswith(f"{buggy_rule}:") for r in report.rollbacks)
    assert report.fused.get("conv_bn") == 2 and report.after.batch_norms == 0
    assert not any(n.op == "call_function" and n.target in (raises_below_float64, off_below_float64)
                   for n in fused.graph.nodes)
    with torch.no_grad():
        assert_close_f64(model(x), fused(x), rtol=1e-5)
