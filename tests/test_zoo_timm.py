"""The timm sweep harness (``benchmarks.zoo_timm``) without timm: hand-made ``nn.Module`` zoos stand in for timm
through :class:`benchmarks.zoo_timm.ModelSource` (and stand-in passes for the outcomes fxfuse should never have), so
that statuses, the isolation of each model in a child process, the cache / resume logic, the rendering and the CLI
are checked on concrete outputs. Two tests run real timm models when timm is installed."""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import time
from dataclasses import asdict

import pytest
import torch
from torch import fx, nn

import fxfuse
from benchmarks import zoo_timm
from benchmarks.zoo_timm import ModelSource, TimmRow
from benchmarks.zoo_timm.__main__ import main
from benchmarks.zoo_timm.render import header, provenance

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ stand-in zoo
class ConvBN(nn.Sequential):
    """Two conv → BN pairs: 2 convs + 2 BNs executed, 2 convs once folded. Takes no ``img_size`` (a CNN)."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Sized(ConvBN):
    """Takes ``img_size`` (like a ViT that can be built for 96²)."""

    def __init__(self, img_size: int = 224) -> None:
        super().__init__()
        self.img_size = img_size


class Fixed224(nn.Module):
    """Runs only at 224² (like a ViT with fixed position embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        assert x.shape[-1] == 224, f"input size {x.shape[-1]} != 224"
        return self.conv(x)


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1000, 1000)  # 1_001_000 parameters


class HangsInPass(ConvBN):
    def forward(self, x):
        if isinstance(x, fx.Proxy):  # only while fxfuse traces it
            time.sleep(60)
        return super().forward(x)


class DiesInPass(ConvBN):
    def forward(self, x):
        if isinstance(x, fx.Proxy):
            os._exit(7)
        return super().forward(x)


def _no_build():
    raise RuntimeError("needs a pretrained config")


FACTORIES = {"convbn": ConvBN, "sized": Sized, "fixed224": Fixed224, "big": Big, "nobuild": _no_build,
             "hangs": HangsInPass, "dies": DiesInPass}


def fake_source(names=("convbn", "sized"), deploy=lambda m: m, built=None) -> ModelSource:
    """``names`` from :data:`FACTORIES`; ``built`` collects ``(name, kwargs, device)`` of every build."""
    def create(name, **kwargs):
        if built is not None:
            built.append((name, dict(kwargs), torch.empty(0).device.type))
        return FACTORIES[name](**kwargs)

    return ModelSource(list_models=lambda: list(names), create=create, deploy=deploy,
                       versions={"timm": "fake"}, deploy_name="fake deploy")


def _fuse_deploy(model):
    """A 'timm deploy' that folds as much as fxfuse does."""
    return fxfuse.reparametrize(model, zoo_timm.example_input(96))


# ------------------------------------------------------------------------------------------------ checks
def test_select_and_parse_count() -> None:
    assert zoo_timm.select(["c2", "b", "a", "c1", "a"], "c*, a", 2) == ["a", "c1"]
    assert zoo_timm.select(["b", "a"]) == ["a", "b"]
    assert [zoo_timm.parse_count(t) for t in ("60M", "1.5G", "60e6", "2500", "3k")] == [
        60_000_000, 1_500_000_000, 60_000_000, 2500, 3000]


def test_check_model_ok_counts_and_img_size() -> None:
    built = []
    source = fake_source(built=built)
    row = zoo_timm.check_model("convbn", source)
    assert (row.status, row.reason, row.capture) == ("ok", "", "symbolic")
    assert row.params == 3 * 4 * 9 + 4 + 8 + 4 * 4 * 9 + 4 + 8
    assert row.convs == [2, 2, 2] and row.bns == [2, 0, 2]  # original, fxfuse, deploy (here: unchanged)
    assert [row.conv_bn(i) for i in range(3)] == [4, 2, 4] and not row.worse_than_deploy
    assert row.build_kwargs == {} and row.verified is True and row.pass_s > 0
    assert 0 < row.max_rel_error < 1e-5 and row.deploy_rel_error == 0.0
    assert 0 <= row.float32_noise < 1e-5 and row.tolerance == 1e-4
    assert row.violations() == [] and row.phase == "float64"
    # the model without img_size: meta build tried with it, then without; the real build without
    assert built == [("convbn", {"img_size": 96}, "meta"), ("convbn", {}, "meta"), ("convbn", {}, "cpu")]
    sized = zoo_timm.check_model("sized", source, size=64)
    assert sized.status == "ok" and sized.build_kwargs == {"img_size": 64}


def test_check_model_not_applicable() -> None:
    built = []
    source = fake_source(built=built)
    big = zoo_timm.check_model("big", source, max_params=1_000_000)
    assert (big.status, big.params) == ("n.a.", 1_001_000)
    assert big.reason == "1.0 M parameters > 1 M (counted on the meta device)"
    assert {d for _, _, d in built} == {"meta"}  # never built for real
    fixed = zoo_timm.check_model("fixed224", source)
    assert fixed.status == "n.a." and fixed.reason == "does not run at 96x96: AssertionError: input size 96 != 224"
    assert fixed.convs == [None, None, None]
    nobuild = zoo_timm.check_model("nobuild", source)
    assert nobuild.status == "n.a." and nobuild.reason == "does not build: RuntimeError: needs a pretrained config"
    assert nobuild.params is None and nobuild.notes == [] and nobuild.phase == "build"
    assert all(r.violations() == [] for r in (big, fixed, nobuild))


def test_check_model_refused_wrong_crash_and_worse_than_deploy() -> None:
    source = fake_source()

    def refuses(model, x, capture):
        raise fxfuse.FusionError("no equal model:\n  the output changed")

    row = zoo_timm.check_model("convbn", source, fuse=refuses)
    assert (row.status, row.reason) == ("FusionError", "no equal model: the output changed")
    assert row.convs == [2, None, 2]  # the deploy column is still measured
    assert row.violations() == ["FusionError: no equal model: the output changed"]

    def off(model, x, capture):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad[0].weight.mul_(1.5)
        return bad

    row = zoo_timm.check_model("convbn", source, fuse=off)
    assert row.status == "wrong" and row.max_rel_error > 1e-3
    assert row.reason.startswith(f"max relative error {row.max_rel_error:.2g} > tolerance 0.0001")

    def raises(model, x, capture):
        raise KeyError("lost a node")

    row = zoo_timm.check_model("convbn", source, fuse=raises)
    assert row.status == "crash" and row.reason.startswith("reparametrize raised KeyError: 'lost a node' [at ")

    def broken(model, x, capture):
        return nn.Linear(5, 5)

    row = zoo_timm.check_model("convbn", source, fuse=broken)
    assert row.status == "crash" and row.reason.startswith("fxfuse's result does not run: RuntimeError")

    # fxfuse unchanged (identity pass) against a deploy that folds: equal outputs, but more conv+BN than timm's
    row = zoo_timm.check_model("convbn", fake_source(deploy=_fuse_deploy), fuse=lambda m, x, capture: m)
    assert row.status == "ok" and row.worse_than_deploy and [row.conv_bn(i) for i in range(3)] == [4, 4, 2]
    assert row.violations() == ["conv+BN 4 > timm deploy 2"]


def test_classify_and_finish_dead() -> None:
    row = TimmRow("m", phase="reparametrize")
    assert zoo_timm.finish_dead(row, "timed out after 5 s").status == "crash"
    assert row.reason == "timed out after 5 s in fxfuse.reparametrize"
    row = zoo_timm.finish_dead(TimmRow("m", phase="build"), "the check's process died (SIGKILL)")
    assert (row.status, row.reason) == ("n.a.", "the check's process died (SIGKILL) building the model")
    row = TimmRow("m", phase="deploy", max_rel_error=1e-6, convs=[2, 2, None], bns=[2, 0, None])
    row = zoo_timm.finish_dead(row, "timed out after 5 s")
    assert (row.status, row.deploy_note, row.tolerance) == ("ok", "timed out after 5 s in timm's deploy conversion",
                                                            1e-4)
    noisy = zoo_timm.classify(TimmRow("m", max_rel_error=3e-4, float32_noise=1e-4))
    assert noisy.status == "ok" and math.isclose(noisy.tolerance, 1e-3)  # 10 x the model's own float32 noise
    assert zoo_timm.classify(TimmRow("m", max_rel_error=math.nan)).status == "wrong"


def test_isolated_run_times_out_and_survives_a_dead_child() -> None:
    source = fake_source(names=("hangs", "dies", "convbn"))

    def check(name):
        return lambda on_phase: zoo_timm.check_model(name, source, on_phase=on_phase)

    start = time.monotonic()
    hung = zoo_timm.run_isolated(check("hangs"), "hangs", timeout=3)
    assert time.monotonic() - start < 10
    assert (hung.status, hung.reason) == ("crash", "timed out after 3 s in fxfuse.reparametrize")
    assert hung.convs[0] == 2  # what the child reported before it hung
    dead = zoo_timm.run_isolated(check("dies"), "dies", timeout=30)
    assert (dead.status, dead.reason) == ("crash", "the check's process died (exit code 7) in fxfuse.reparametrize")
    ok = zoo_timm.run_isolated(check("convbn"), "convbn", timeout=60)
    assert ok.status == "ok" and ok.convs == [2, 2, 2] and ok.bns == [2, 0, 2] and ok.capture == "symbolic"


# ------------------------------------------------------------------------------------------- cache, sweep
def _same(a, b) -> bool:
    """Rows equal field by field (NaN equal to NaN, unlike ``==`` on the dataclasses)."""
    return [json.dumps(asdict(r)) for r in a] == [json.dumps(asdict(r)) for r in b]


def _row(name, status="ok", **kw) -> TimmRow:
    base = {"params": 1_500_000, "capture": "symbolic", "max_rel_error": 1e-7, "deploy_rel_error": 0.0,
            "float32_noise": 2e-8, "tolerance": 1e-4,
            "convs": [10, 6, 6], "bns": [10, 0, 4], "pass_s": 0.25, "date": "2026-01-02 03:04 UTC",
            "source": "fxfuse at commit abc1234", "versions": {"timm": "1.0.0", "torch": "2.9"}, "threads": 1}
    base.update(kw)
    return TimmRow(name, status=status, **base)


def test_cache_round_trip_and_cut_off_line(tmp_path) -> None:
    path = tmp_path / "c.jsonl"
    assert zoo_timm.load_cache(path) == {}
    zoo_timm.append_row(path, _row("a", max_rel_error=math.nan))
    zoo_timm.append_row(path, _row("b"))
    zoo_timm.append_row(path, _row("a", status="wrong", reason="x"))  # a later line of the same model wins
    with path.open("a") as fh:
        fh.write('{"name": "c", "status": "o')  # a run killed mid-write
    rows = zoo_timm.load_cache(path)
    assert sorted(rows) == ["a", "b"] and rows["a"].status == "wrong" and _same([rows["b"]], [_row("b")])
    assert len(path.read_text().splitlines()) == 4
    assert zoo_timm.reusable(rows["b"], 96, 60_000_000)
    assert not zoo_timm.reusable(rows["b"], 64, 60_000_000) and not zoo_timm.reusable(rows["b"], 96, 10)


def test_sweep_resumes_from_the_cache(tmp_path) -> None:
    cache = tmp_path / "c.jsonl"
    source = fake_source(names=("convbn", "fixed224"))
    calls = []

    def counting_fuse(model, x, capture):
        calls.append(capture)
        return fxfuse.reparametrize(model, x, capture=capture)

    lines = []
    kw = {"cache": cache, "timeout": 0, "fuse": counting_fuse, "log": lines.append,
          "stamp": {"date": "D", "threads": 1}}
    rows = zoo_timm.run_sweep(["convbn", "fixed224"], source, **kw)
    assert [r.status for r in rows] == ["ok", "n.a."] and calls == ["auto"]
    assert lines[0].startswith("[1/2] convbn: ok | capture symbolic | conv+BN 4 → 2 (timm deploy 4) | err ")
    assert lines[1].startswith("[2/2] fixed224: n.a. (does not run at 96x96: AssertionError: input size 96 != 224)")
    assert [json.loads(x)["name"] for x in cache.read_text().splitlines()] == ["convbn", "fixed224"]
    assert all(json.loads(x)["date"] == "D" for x in cache.read_text().splitlines())
    lines.clear()
    again = zoo_timm.run_sweep(["convbn", "fixed224"], source, **kw)
    assert calls == ["auto"] and _same(again, rows)  # nothing run again
    assert all(line.endswith("(cached)") for line in lines) and len(lines) == 2
    zoo_timm.run_sweep(["convbn"], source, **{**kw, "fresh": True})
    assert calls == ["auto", "auto"] and len(cache.read_text().splitlines()) == 3
    zoo_timm.run_sweep(["convbn"], source, **{**kw, "size": 64})  # another size: not the cached row
    assert calls == ["auto"] * 3


# -------------------------------------------------------------------------------------------------- render
def test_render_summary_violators_and_tables() -> None:
    rows = [
        _row("good"),
        _row("worse", convs=[10, 12, 6]),
        _row("bad", status="wrong", reason="max relative error 0.5 > tolerance 0.0001", max_rel_error=0.5),
        _row("refused", status="FusionError", reason="no equal | model", capture="", convs=[10, None, 6],
             bns=[10, None, 4], pass_s=math.nan, max_rel_error=math.nan),
        _row("noisy", max_rel_error=5e-3, deploy_rel_error=2e-3, float32_noise=1e-3, tolerance=1e-2),
        _row("boom", status="crash", reason="timed out after 600 s in fxfuse.reparametrize", capture="",
             float32_noise=math.nan, tolerance=math.nan,
             convs=[10, None, None], bns=[10, None, None], max_rel_error=math.nan, deploy_rel_error=math.nan,
             pass_s=math.nan),
        _row("vit_huge", status="n.a.", reason="632.0 M parameters > 60 M (counted on the meta device)",
             params=632_000_000, capture="", convs=[None] * 3, bns=[None] * 3),
    ]
    assert zoo_timm.summary_line(rows) == ("7 models: 3 ok, 1 wrong, 1 crash, 1 FusionError, 1 n.a.; fxfuse conv+BN "
                                           "> timm deploy: 1; goal NOT met: 4 violator(s)")
    assert zoo_timm.counts(rows)["worse_than_deploy"] == 1
    assert [name for name, _ in zoo_timm.violators(rows)] == ["worse", "bad", "refused", "boom"]
    text = zoo_timm.render(rows, header("python -m benchmarks.zoo_timm --limit 6", "2026-01-02", "CPU (2 cores)"),
                           provenance(rows, 3, ".zoo-timm-cache.jsonl"))
    lines = text.splitlines()
    assert lines[2] == "Generated by `python -m benchmarks.zoo_timm --limit 6` on CPU (2 cores), 2026-01-02."
    assert lines[4] == ("Rows: 3 measured by this run, 4 taken from the cache `.zoo-timm-cache.jsonl`; measured "
                        "2026-01-02 03:04 UTC; 7 with fxfuse at commit abc1234; timm 1.0.0, torch 2.9; 1 thread(s).")
    assert f"**{zoo_timm.summary_line(rows)}.**" in lines
    assert "- **worse**: conv+BN 12 > timm deploy 10" in lines
    assert ("Tolerance above 0.0001 (the model's own float32 output, at random init, is that far from its float64 "
            "one): noisy (float32 noise 1.0e-03, fxfuse 5.0e-03, timm deploy 2.0e-03).") in lines
    assert "- **refused**: FusionError: no equal \\| model" in lines
    ok_cells = "| 1.5 | symbolic | ok | 1.0e-07 | 0.0e+00 | 2.0e-08 | 20 (10+10) |"
    assert f"| good {ok_cells} 6 (6+0) | 10 (6+4) | yes | 0.25 |" in lines
    assert f"| worse {ok_cells} 12 (12+0) | 10 (6+4) | **NO** | 0.25 |" in lines
    assert ("| boom | 1.5 | — | **crash**: timed out after 600 s in fxfuse.reparametrize | — | — | — | 20 (10+10) "
            "| — | — | — | — |") in lines
    assert "| vit_huge | 632.0 | 632.0 M parameters > 60 M (counted on the meta device) |" in lines
    assert "## Not applicable (1)" in lines and not any(line.startswith("| vit_huge | 632.0 | —") for line in lines)
    assert zoo_timm.summary_line([rows[0], rows[-1]]).endswith("; goal met")
    assert zoo_timm.summary_line([]).endswith("; nothing checked")


def test_cli_runs_renders_and_re_renders(tmp_path, capsys) -> None:
    out, cache = tmp_path / "zoo-timm.md", tmp_path / "c.jsonl"
    argv = ["--filter", "conv*,fixed*", "--timeout-per-model", "0", "--cache", str(cache), "--out", str(out)]
    source = fake_source(names=("convbn", "fixed224", "big"), deploy=_fuse_deploy)
    assert main(argv, source=source) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"2 models; cache {cache}"
    assert printed[-2:] == ["2 models: 1 ok, 0 wrong, 0 crash, 0 FusionError, 1 n.a.; fxfuse conv+BN > timm "
                            "deploy: 0; goal met", f"wrote {out}"]
    text = out.read_text()
    assert text.splitlines()[2].startswith(f"Generated by `python -m benchmarks.zoo_timm {shlex.join(argv)}` on ")
    assert ", timm fake, fxfuse " in text.splitlines()[2]
    assert "Rows: 2 measured by this run, 0 taken from the cache" in text
    assert any(line.startswith("| convbn | 0.0 | symbolic | ok | ") and "| 4 (2+2) | 2 (2+0) | 2 (2+0) | yes |"
               in line for line in text.splitlines())
    # a stand-in pass that refuses: exit status 1 and the violator printed (the cache is ignored with --fresh)
    refuse = lambda m, x, capture: (_ for _ in ()).throw(fxfuse.FusionError("nope"))  # noqa: E731
    assert main([*argv, "--fresh"], source=source, fuse=refuse) == 1
    assert "  convbn: FusionError: nope" in capsys.readouterr().out.splitlines()
    # --render-only: the page again from the cache, nothing checked (no source needed)
    again = tmp_path / "again.md"
    assert main(["--render-only", "--cache", str(cache), "--out", str(again)]) == 1
    assert "| convbn | 0.0 | — | **FusionError**: nope |" in again.read_text()


# ---------------------------------------------------------------------------------------------- real timm
def test_timm_source_counts_on_meta_and_deploy_on_timm_blocks() -> None:
    """With timm installed: a 304 M model is counted on the meta device and never built; a tiny ByobNet of timm's
    own RepVGG and MobileOne blocks (built directly: a zoo model takes seconds) is checked against timm's deploy
    conversion, which fuses its branches: fxfuse must reach at least as few convs + BNs."""
    timm = pytest.importorskip("timm")
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    source = zoo_timm.timm_source()
    assert source.versions == {"timm": timm.__version__}
    big = zoo_timm.check_model("vit_large_patch16_224", source)
    assert big.status == "n.a." and big.params > 300_000_000 and big.convs == [None] * 3
    assert big.reason.endswith("M parameters > 60 M (counted on the meta device)")

    def tiny(name, **kwargs):
        cfg = ByoModelCfg(blocks=(ByoBlockCfg(type="rep", d=2, c=8, s=2, gs=0, br=1.0),
                                  ByoBlockCfg(type="one", d=1, c=16, s=2, gs=1, br=1.0,
                                              block_kwargs={"num_conv_branches": 2})),
                          stem_chs=8, stem_type="rep", stem_pool="", num_features=0)
        return ByobNet(cfg, num_classes=5, **kwargs)

    rep = ModelSource(list_models=lambda: ["tiny"], create=tiny, deploy=source.deploy)
    row = zoo_timm.check_model("tiny", rep, size=32)
    assert row.status == "ok", row.reason
    assert row.convs == [9, 4, 4] and row.bns == [10, 0, 0] and row.deploy_note == ""
    assert row.deploy_rel_error < 1e-5 and row.max_rel_error < 1e-5
