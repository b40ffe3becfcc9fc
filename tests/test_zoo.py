"""``reparametrize`` on the torchvision model zoo (harness: the ``benchmarks.zoo`` package).

Each model is built with ``weights=None``, BN statistics randomized, eval mode, float64 (RAFT: float32, its
rewritten sub-modules checked in float64). The default run covers a representative subset (small inputs); the full
``list_models()`` sweep runs with ``--runslow``. Per model, ``check_model`` asserts nothing itself; the tests do:

* numbers: outputs equal to the original's (relative ≤ 1e-9 of max-abs, float64) on the example input and on an
  input of another batch size; ``verify=True`` accepted the result;
* structure: no BatchNorm left whose input is a conv/linear with no other real user (checked on every fx graph in
  the result), the BatchNorms still executed are exactly the ones that cannot fold (``BN_LEFT``), no conv added;
* the input model's ``state_dict`` is bit-identical afterwards;
* untraceable models (detection) go through the sub-module fallback and the report says what was rewritten;
* capture: every row records ``report.capture`` (symbolic / export / submodules) and why; a fallback row says why
  torch.export failed and where in the model's code, and the table, the capture notes and the JSON rows show it.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

from benchmarks import zoo
from benchmarks.zoo.render import STATIC_EXPORT
from fxfuse.models import randomize_batchnorm_

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
        assert row.capture == "submodules", (row.capture, row.capture_reason)
        # capture="auto" tried torch.export too; the row says why it failed: NMS branches on the number of boxes
        export_why = row.export_error or row.capture_reason
        assert "GuardOnDataDependentSymNode" in export_why and "torchvision/ops/boxes.py" in export_why, export_why
        assert zoo.export_failure_kind(export_why) == zoo.DATA_DEPENDENT
        assert row.submodules["<root>"].startswith("not traced")
        assert row.submodules["backbone"].startswith("rewritten")
        # every sub-module the fallback looked at is accounted for: rewritten, or why not
        assert all(why.startswith(("rewritten", "not traced", "not run", "left as is", "trace differs"))
                   for why in row.submodules.values()), row.submodules
    else:
        assert row.status == "ok"
        assert row.capture == "symbolic" and row.capture_reason.startswith("traced whole by torch.fx"), \
            (row.capture, row.capture_reason)
        assert row.export_error == ""


def test_fallback_report_and_untouched_input() -> None:
    """The detection fallback: rewritten sub-modules are GraphModules in the result, the untraced parts stay the
    original classes, the report names both, and the input model is not modified."""
    case = zoo.zoo_case("fasterrcnn_mobilenet_v3_large_320_fpn")
    model = case.build().double()
    x = zoo.cast_floats(case.inputs(1), torch.float64)
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
    randomize_batchnorm_(net)
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


class _ConvBNReshape(torch.nn.Module):
    """conv -> BN whose conv output is also the *template* of ``reshape_as`` (reads only its shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y).reshape_as(y)


def test_harness_uses_the_pass_metadata_rule() -> None:
    """A shape-only use of the conv output (template of ``reshape_as``) does not block the fold: the harness
    flags the pair exactly as :func:`fxfuse.ir.ops.is_metadata_user` says, and the pass folds it."""
    net = randomize_batchnorm_(_ConvBNReshape()).eval()
    gm = torch.fx.symbolic_trace(net)
    assert zoo.unfused_conv_bn(gm) == ["<root>:conv->bn"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused = __import__("fxfuse").reparametrize(net.double(), x)
    assert zoo.unfused_conv_bn(fused) == [] and fused.fxfuse_report.fused.get("conv_bn") == 1


def test_op_counter_counts_modules_and_functions() -> None:
    """Run-time counts cover module calls and functional calls (classified by fxfuse.ir.ops.function_kind)."""

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.w = torch.nn.Parameter(torch.randn(4, 4, 1, 1))

        def forward(self, x):
            y = self.bn(self.conv(x))
            y = torch.nn.functional.conv2d(y, self.w)
            y = torch.nn.functional.conv_transpose2d(y, self.w)
            return torch.nn.functional.batch_norm(y, torch.zeros(4), torch.ones(4))

    out, convs, bns = zoo.run_counted(Mixed().eval(), (torch.randn(1, 3, 5, 5),))
    assert (convs, bns) == (3, 2) and out.shape == (1, 4, 5, 5)


def test_max_rel_error_flags_a_dtype_change() -> None:
    y = torch.randn(3, dtype=torch.float64)
    assert zoo.max_rel_error(y, y.clone()) == 0.0
    assert zoo.max_rel_error(y, y.float().double()) > 0
    assert zoo.max_rel_error(y, y.float()) == math.inf
    assert zoo.max_rel_error([y, torch.arange(3)], [y, torch.arange(3) + 1]) == math.inf  # integer outputs


def test_cast_floats_keeps_structure_and_integers() -> None:
    args = ([torch.ones(2), torch.arange(2)], {"a": torch.zeros(1)}, 3)
    out = zoo.cast_floats(args, torch.float64)
    assert out[0][0].dtype == torch.float64 and out[0][1].dtype == torch.int64
    assert out[1]["a"].dtype == torch.float64 and out[2] == 3 and isinstance(out[0], list)


def test_zoo_runs_as_a_module() -> None:
    """``python -m benchmarks.zoo`` (what ``make zoo`` runs) parses its options."""
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.zoo", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--models" in proc.stdout and "--pass-speed" in proc.stdout


class _DataDependent(torch.nn.Module):
    """A branch on a value computed from the data: torch.export cannot capture it as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent
            return y
        return -y


def test_export_probe_names_the_failing_line() -> None:
    """The export probe (``reparametrize(capture="export")``) reports the innermost exception and the line of the
    model's code where torch.export stopped, and classifies a data-dependent branch as torch.export's limit and a
    failure located in fxfuse as fxfuse's; a model that export captures and fuses gives ``""``."""
    why = zoo.export_probe(_DataDependent().eval(), (torch.randn(2, 3, 4, 4),))
    assert why.startswith("GuardOnDataDependentSymNode: "), why
    assert "tests/test_zoo.py" in why and "in forward: `if y.sum() > 0:  # data-dependent`" in why, why
    assert zoo.export_failure_kind(why) == zoo.DATA_DEPENDENT
    net = randomize_batchnorm_(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))).eval()
    assert zoo.export_probe(net, (torch.randn(2, 3, 4, 4),)) == ""
    assert zoo.export_failure_kind("TypeError: unsupported input") == ""
    fx_side = "RuntimeError: dtype mismatch [at fxfuse/capture/shapes.py:42 in call_module: `return f(x)`]"
    assert zoo.export_failure_kind(fx_side) == zoo.IN_FXFUSE


def _fake_row(name: str, capture: str, reason: str, status: str = "ok", export_error: str = "") -> zoo.ZooRow:
    return zoo.ZooRow(name, "detection", "1x3x8x8", status=status, detail="1 sub-modules rewritten",
                      convs=(4, 4), batch_norms=(2, 0), rewrites=2, rewrites_by_rule={"conv_bn": 2},
                      max_rel_error=1e-16, capture=capture, capture_reason=reason, export_error=export_error)


def test_render_has_a_capture_column_and_notes() -> None:
    """The table's capture column holds report.capture per row (``—`` when refused); rows not captured
    symbolically (or where export was tried) are marked † and listed in the capture notes with their reason and,
    for a fallback, the export error and whether it is torch.export's limit; the summary counts each capture."""
    guard = "GuardOnDataDependentSymNode: Could not guard [at torchvision/ops/boxes.py:103 in f: `if n == 0:`]"
    rows = [
        _fake_row("plain", "symbolic", "traced whole by torch.fx"),
        _fake_row("tried", "symbolic", "traced whole by torch.fx; export reached no fewer convs + BatchNorms (3 vs 3)"),
        _fake_row("exported", "export", "symbolic tracing failed (TraceError: x); torch.export in 1.00 s, "
                  "static shapes: dynamic batch refused by torch.export (UserError: x)"),
        _fake_row("fellback", "submodules", "the model does not trace whole with torch.fx and torch.export failed",
                  status="fallback", export_error=guard),
        _fake_row("refusedone", "", "", status="refused"),
    ]
    text = zoo.render(rows, "# header", None)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[-2:] == ["capture", "status |"], table[0]
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[-2] for line in table[1:]}
    assert cells == {"plain": "symbolic", "tried": "symbolic †", "exported": "export †",
                     "fellback": "submodules †", "refusedone": "—"}, cells
    assert "Capture: 2 symbolic, 1 export, 1 submodules." in text
    notes = text.split("## Capture notes", 1)[1].split("\n## ", 1)[0]
    assert "**plain**" not in notes and "**refusedone**" not in notes
    assert "- **tried** (`symbolic`): traced whole by torch.fx; export reached no fewer" in notes
    assert "- **exported** (`export`): symbolic tracing failed" in notes
    assert f"  - {STATIC_EXPORT}" in notes.split("- **exported**", 1)[1].split("- **fellback**", 1)[0]
    assert notes.count(STATIC_EXPORT) == 1
    fell = notes.split("- **fellback** (`submodules`): ", 1)[1]
    assert guard.replace("|", "\\|") in fell and zoo.DATA_DEPENDENT in fell
    assert "- capture: `submodules` (the model does not trace whole" in text  # in the model's own section


def _is_git_checkout(root: Path) -> bool:
    """Whether ``root`` is the top of a git work tree (not an unpacked archive, nor a tree inside another one)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(top) and Path(top).resolve() == root.resolve()


def _source_line(line: str) -> bool:
    """The header names the fxfuse it ran: ``fxfuse at commit …`` in a checkout, the version without one."""
    import fxfuse

    root = Path(__file__).resolve().parents[1]
    if _is_git_checkout(root):
        return "fxfuse at commit " in line
    return f"fxfuse {fxfuse.__version__} from a source tree that is not a git checkout." in line


def test_zoo_cli_writes_the_capture_column(tmp_path) -> None:
    """``python -m benchmarks.zoo`` end to end on one model: the markdown table and the JSON rows carry the
    capture; ``--note`` and the fxfuse commit land in the header; ``--from-json`` re-renders and merges."""
    from benchmarks.zoo.__main__ import main

    md, js = tmp_path / "zoo.md", tmp_path / "zoo.json"
    assert main(["--models", "resnet18", "--no-speed", "--no-pass-speed", "--out", str(md), "--json", str(js),
                 "--note", "Shared machine."]) == 0
    text = md.read_text()
    line = text.splitlines()[2]
    assert line.startswith("Generated by `python -m benchmarks.zoo --models resnet18 --no-speed --no-pass-speed")
    assert line.count("Shared machine.") == 1 and "--note" not in line  # the note once, not in the command too
    # which fxfuse the sweep imported: the commit in a git checkout of this tree, else the version (unpacked sdist)
    assert _source_line(text.splitlines()[2]), line
    row = next(line for line in text.splitlines() if line.startswith("| resnet18 |"))
    assert row.split(" | ")[-2:] == ["symbolic", "ok |"], row
    (data,) = json.loads(js.read_text())
    assert data["capture"] == "symbolic" and data["capture_reason"].startswith("traced whole by torch.fx")
    assert data["export_error"] == ""
    # --from-json writes the same report again; a later run's rows replace those of the same model
    again = tmp_path / "again.md"
    assert main(["--from-json", str(js), "--out", str(again)]) == 0
    assert again.read_text() == text
    later = tmp_path / "later.json"
    later.write_text(json.dumps([dict(data, capture="export", capture_reason="requested")]))
    (tmp_path / "later.json.meta.json").write_text(json.dumps(
        dict(json.loads((tmp_path / "zoo.json.meta.json").read_text()), command="python -m benchmarks.zoo X")))
    merged = tmp_path / "merged.md"
    assert main(["--from-json", f"{js},{later}", "--out", str(merged)]) == 0
    mtext = merged.read_text()
    assert "Rows of resnet18 come from a later run: `python -m benchmarks.zoo X`" in mtext.splitlines()[2]
    row = next(line for line in mtext.splitlines() if line.startswith("| resnet18 |"))
    assert row.split(" | ")[-2:] == ["export †", "ok |"], row
    assert sum(line.startswith("| resnet18 |") for line in mtext.splitlines()) == 1


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


def test_conditioned_tolerance_follows_the_pass_policy() -> None:
    """The sweep's equality bound is the pass's own (fxfuse.verified): 1e-9, or 10·η for a model whose output moves
    by η under rounding-sized weight noise, never above 1e-6; an unmeasured η leaves 1e-9."""
    from benchmarks.zoo.checks import conditioned_tolerance

    assert conditioned_tolerance(math.nan) == 1e-9
    assert conditioned_tolerance(5e-11) == 1e-9
    assert conditioned_tolerance(7.3e-10) == pytest.approx(7.3e-9)
    assert conditioned_tolerance(1e-3) == 1e-6
    assert conditioned_tolerance(math.inf) == 1e-6
