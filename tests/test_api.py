"""The public surface: rule selection and registration, the report, inplace semantics."""

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse import models
from fxfuse.testing import assert_close_f64

from _helpers import fuse_and_check, fused_counts, stats


def repvgg_tiny():
    return models.randomize_batchnorm_(models.build("repvgg-tiny"), 5).eval()


def test_public_names():
    assert set(fxfuse.__all__) >= {"reparametrize", "FusionError", "FusionReport", "register_rule"}
    assert issubclass(fxfuse.FusionError, RuntimeError)
    names = [r.name for r in fxfuse.registered_rules()]
    from fxfuse.rules import ORDER

    assert [n for n in names if n in ORDER] == list(ORDER)  # the built-ins run in the order table's order
    assert names.index("remove_noop") < names.index("conv_bn")  # no-ops go first, BN folds before sums and chains
    assert {"bn_conv", "branch_sum", "sequential", "concat", "horizontal"} <= set(names)
    assert names.index("conv_bn") < names.index("branch_sum") < names.index("sequential")


def test_rules_subset_only_folds_bn():
    fused = fuse_and_check(models.build("repvgg-tiny"), torch.randn(1, 3, 32, 32), rules=["conv_bn"])
    assert set(fused_counts(fused)) == {"conv_bn"} and stats(fused).adds > 0 and stats(fused).batch_norms == 3
    unfused = fused.fxfuse_report.unfused
    assert {u.rule for u in unfused} <= {"conv_bn", "residue"}  # no other rule even looked
    # the three identity-branch BNs branch_sum would have merged are still named (never silent)
    assert len({u.node for u in unfused if u.rule == "residue"}) == 3


def test_disable_branch_sum():
    fused = fuse_and_check(models.build("repvgg-tiny"), torch.randn(1, 3, 32, 32), disable=["branch_sum"])
    assert "branch_sum" not in fused_counts(fused) and stats(fused).adds > 0


def test_register_rule_rejects_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        fxfuse.register_rule("conv_bn")(lambda ctx, node: None)


def test_user_rule_runs_when_enabled_and_is_reported():
    seen = []

    @fxfuse.register_rule("count_relus", enabled=False)
    def count_relus(ctx, node):
        if node.op == "call_module" and isinstance(ctx.gm.get_submodule(node.target), nn.ReLU):
            seen.append(node.name)
        return None

    try:
        fuse_and_check(models.build("repvgg-tiny"), torch.randn(1, 3, 32, 32))
        assert not seen  # disabled by default
        fuse_and_check(models.build("repvgg-tiny"), torch.randn(1, 3, 32, 32), enable=["count_relus"])
        assert seen
    finally:
        fxfuse.unregister_rule("count_relus")


def test_report_contents():
    model = repvgg_tiny()
    fused = fxfuse.reparametrize(model, torch.randn(1, 3, 32, 32))
    report = fused.fxfuse_report
    assert isinstance(report, fxfuse.FusionReport)
    assert report.fused["conv_bn"] == report.before.batch_norms - sum(
        1 for b in model.modules() if isinstance(b, models.RepVGGBlock) and b.identity is not None)
    assert report.verified and report.verify_dtype == "float64" and report.max_rel_error < 1e-12
    assert not report.rolled_back and not report.unfused
    assert report.before.convs > report.after.convs and report.after.batch_norms == 0
    text = report.summary()
    assert "branch_sum=" in text and "verified=True" in text
    assert report.to_dict()["fused"]["branch_sum"] == report.fused["branch_sum"]


def test_input_model_untouched_and_inplace():
    model = repvgg_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    fxfuse.reparametrize(model, x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    expected = model(x)
    fused = fxfuse.reparametrize(model, x, inplace=True)
    assert not fused.fxfuse_report.rolled_back
    assert_close_f64(expected, fused(x), rtol=1e-5)  # float32 model: a float32 rounding-level difference


def test_verify_false_still_fuses():
    fused = fxfuse.reparametrize(repvgg_tiny(), torch.randn(1, 3, 32, 32), verify=False)
    assert fused.fxfuse_report.verified is None and stats(fused).batch_norms == 0


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_report_times_each_phase_of_the_pass(capture):
    """``report.phases``: every phase of the pass in order, each a non-negative time, together within the total."""
    torch.manual_seed(0)
    model = models.randomize_batchnorm_(models.build("repvgg-tiny"), 0).eval()
    rep = fxfuse.reparametrize(model, torch.randn(2, 3, 32, 32), capture=capture).fxfuse_report
    assert list(rep.phases) == ["copy", "original run", "capture", "lens", "shapes", "rules", "verify", "cast back",
                                "artifact", "total"]
    assert all(v >= 0 for v in rep.phases.values())
    assert rep.phases["total"] == rep.pass_seconds
    assert sum(v for k, v in rep.phases.items() if k != "total") <= rep.pass_seconds
