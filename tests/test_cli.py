"""The ``fxfuse`` command line: fuse (pt2 / state_dict / onnx round trips), explain, models, --help everywhere,
and one-line errors (non-zero exit, no traceback) for bad specs, shapes and checkpoints."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxfuse import Reason
from fxfuse.models import build, randomize_batchnorm_
from fxfuse.tools import cli
from fxfuse.verify import compare

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 32, 32)

SPEC_MODULE = textwrap.dedent('''
    """Specs for the CLI tests (imported as fxfuse_cli_test_specs:NAME)."""
    from torch import nn


    def small_convbn_net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))


    class SharedConv(nn.Module):
        """conv -> bn, but the conv output is also added to the result: the fold must be refused."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y


    class SizeAsInt(nn.Module):
        """conv -> bn, then `int(y.size(1))`: symbolic tracing cannot make an int of a Proxy; torch.export can."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y.reshape(y.size(0), int(y.size(1)) * y.size(2) * y.size(3))


    instance = small_convbn_net()
    not_a_model = 3


    def returns_int():
        return 3


    def raises():
        raise RuntimeError("boom in constructor")
''')


@pytest.fixture(autouse=True)
def spec_module(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "specmod"
    d.mkdir(exist_ok=True)
    (d / "fxfuse_cli_test_specs.py").write_text(SPEC_MODULE)
    monkeypatch.syspath_prepend(str(d))


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _assert_one_line_error(code, err, needle):
    assert code != 0
    assert err.startswith("fxfuse: error: "), err
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _rel(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|actual - reference| / max|reference|`` (the one comparison, :func:`fxfuse.verify.compare`)."""
    return compare(reference, actual).max_rel


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A repvgg-tiny with random BN statistics, saved as {'state_dict': ...}; returns (path, model)."""
    model = randomize_batchnorm_(build("repvgg-tiny"), seed=3).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 7}, path)
    return path, model


# ------------------------------------------------------------------------------------------- help
def test_python_m_help_subprocess():
    res = subprocess.run([sys.executable, "-m", "fxfuse", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("bench", "fuse", "explain", "models"):
        assert cmd in res.stdout
    assert "Traceback" not in res.stderr


def test_version_is_single_sourced(capsys):
    """``fxfuse --version`` (and so ``python -m fxfuse --version``, the same ``main``) prints ``fxfuse.__version__``;
    pyproject.toml reads the version from there instead of repeating it; CHANGELOG.md has a section for it."""
    import fxfuse

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fxfuse {fxfuse.__version__}"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fxfuse.__version__"}
    release = fxfuse.__version__.split(".dev")[0]  # 0.3.0.dev0 -> its section "## 0.3.0"
    assert f"\n## {release} " in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("cmd", [[], ["bench"], ["fuse"], ["explain"], ["models"]])
def test_help_on_every_command(cmd, capsys):
    assert cli.main(cmd + ["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fxfuse") and "--help" in text
    if cmd == ["fuse"]:
        assert "--input-shape" in text and "--weights" in text and "--format" in text
    if cmd == ["bench"]:
        for flag in ("--batch-sizes", "--dtype", "--channels-last", "--device", "--compile", "--out",
                     "--min-run-time", "--image-size"):
            assert flag in text


def test_no_command_prints_help_and_fails():
    code, out, err = _run([])
    assert code == 2 and "bench" in out


def test_models_lists_reference_names():
    code, out, err = _run(["models"])
    assert code == 0
    assert "repvgg-article   1,3,224,224" in out and "repvgg-tiny" in out and "dbb" in out


# ------------------------------------------------------------------------------------------- fuse
def test_fuse_pt2_round_trip(tiny_ckpt, tmp_path):
    ckpt, model = tiny_ckpt
    out_path = tmp_path / "fused.pt2"
    code, out, err = _run(["fuse", "repvgg-tiny", "--input-shape", "1,3,32,32", "--weights", str(ckpt),
                           "--out", str(out_path)])
    assert code == 0, err
    assert "branch_sum=8" in out and "conv_bn=16" in out and "round trip" in out
    assert "(dynamic batch)" in out
    ep = torch.export.load(str(out_path))
    for n in (1, 5):  # fused on a batch of 1, the saved program runs at any batch size
        x = torch.randn((n, *SHAPE[1:]), generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            got, ref = ep.module()(x), model(x)
        assert got.dtype == torch.float32 and _rel(got, ref) <= 1e-4
    # structure: one conv per block (8), no batch norm left in the exported graph
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("conv" in t for t in targets) == 8
    assert not any("batch_norm" in t for t in targets)


def test_fuse_state_dict_format(tiny_ckpt, tmp_path):
    """state_dict + code: the saved tensors are exactly what reparametrize produces from the checkpoint, and
    loaded into a fresh fuse of the same architecture they reproduce the original model."""
    import copy

    import fxfuse

    ckpt, model = tiny_ckpt
    out_path = tmp_path / "fused.pt"
    code, out, err = _run(["fuse", "repvgg-tiny", "--input-shape", "1,3,32,32", "--weights", str(ckpt),
                           "--out", str(out_path), "--format", "state_dict"])
    assert code == 0, err
    sd = torch.load(out_path, weights_only=True)
    code_text = (tmp_path / "fused.py").read_text()
    assert "def forward" in code_text and "fused" in code_text
    assert not any("running_mean" in k for k in sd)  # no BN left
    expected = fxfuse.reparametrize(model, torch.randn(SHAPE)).state_dict()
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], expected[k]) for k in sd)
    assert sum(1 for k in sd if k.endswith(".weight") and sd[k].dim() == 4) == 8  # one conv per block
    skeleton = fxfuse.reparametrize(build("repvgg-tiny").eval(), torch.randn(SHAPE))
    skeleton.load_state_dict(sd)
    x = torch.randn(SHAPE, dtype=torch.float64)
    with torch.no_grad():
        # float64 comparison; the fused weights are stored in float32 (one rounding each), hence 1e-6
        assert _rel(skeleton.double()(x), copy.deepcopy(model).double()(x)) <= 1e-6


def test_fuse_state_dict_code_close(tiny_ckpt, tmp_path):
    ckpt, model = tiny_ckpt
    code, out, err = _run(["fuse", "repvgg-tiny", "--input-shape", "1,3,32,32", "--weights", str(ckpt),
                           "--out", str(tmp_path / "f.py"), "--format", "state_dict"])
    assert code == 0, err
    assert (tmp_path / "f.code.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
def test_fuse_onnx(tiny_ckpt, tmp_path):
    ckpt, model = tiny_ckpt
    out_path = tmp_path / "fused.onnx"
    code, out, err = _run(["fuse", "repvgg-tiny", "--input-shape", "1,3,32,32", "--weights", str(ckpt),
                           "--out", str(out_path), "--format", "onnx"])
    assert code == 0, err
    import onnx

    graph = onnx.load(str(out_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 8 and "BatchNormalization" not in ops
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert _rel(got, model(x)) <= 1e-4


@pytest.mark.parametrize("wrap", ["raw", "model", "module_prefix"])
def test_fuse_checkpoint_layouts(wrap, tmp_path):
    model = randomize_batchnorm_(build("repvgg-tiny"), seed=4).eval()
    sd = model.state_dict()
    obj = {"raw": sd, "model": {"model": sd, "optimizer": {}},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "c.pth")
    out_path = tmp_path / "f.pt2"
    code, out, err = _run(["fuse", "repvgg-tiny", "--input-shape", "1,3,32,32", "--weights",
                           str(tmp_path / "c.pth"), "--out", str(out_path)])
    assert code == 0, err
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert _rel(torch.export.load(str(out_path)).module()(x), model(x)) <= 1e-4


def test_fuse_callable_spec_default_shape_required(tmp_path):
    code, out, err = _run(["fuse", "fxfuse_cli_test_specs:small_convbn_net", "--out", str(tmp_path / "f.pt2")])
    _assert_one_line_error(code, err, "--input-shape")
    code, out, err = _run(["fuse", "fxfuse_cli_test_specs:small_convbn_net", "--input-shape", "2,3,16,16",
                           "--out", str(tmp_path / "f.pt2")])
    assert code == 0, err
    assert "conv_bn=2" in out
    assert "no --weights" in err


# ---------------------------------------------------------------------------------------- explain
def test_explain_lists_fused_counts_and_stats():
    code, out, err = _run(["explain", "repvgg-tiny", "--input-shape", "1,3,32,32", "--randomize-bn"])
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.split() == ["branch_sum", "8"] for line in lines)
    assert any(line.split() == ["conv_bn", "16"] for line in lines)
    assert any(line.split() == ["convs", "16", "8"] for line in lines)
    assert any(line.split() == ["batch_norms", "19", "0"] for line in lines)
    params = next(line.split() for line in lines if line.startswith("params"))
    assert int(params[1]) > int(params[2])  # 1x1 and BN parameters are gone
    gflops = next(line.split() for line in lines if line.startswith("GFLOPs"))
    assert float(gflops[1]) > float(gflops[2]) > 0
    assert "verified: True in float64" in out
    phases = next(line for line in lines if line.startswith("pass phases (s): "))
    assert all(f"{k} " in phases for k in ("capture", "shapes", "rules", "verify", "cast back", "artifact", "total"))


def test_explain_json_and_unfused_reasons():
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:SharedConv", "--input-shape", "1,3,8,8", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["fused"] == {} and rep["after"]["batch_norms"] == 1 and rep["after"]["convs"] == 1
    assert rep["unfused"], "the refused conv-BN fold must be reported with a reason"
    assert all(u["reason"] for u in rep["unfused"])
    # the stable code travels in the JSON as its plain string value
    assert {(u["rule"], u["code"]) for u in rep["unfused"]} >= {("conv_bn", Reason.OTHER_USERS.value)}
    assert all(u["code"] in {r.value for r in Reason} for u in rep["unfused"])
    assert rep["params"]["before"] == rep["params"]["after"]
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:SharedConv", "--input-shape", "1,3,8,8"])
    assert code == 0 and "left unfused (" in out and "(none)" in out  # no fused patterns
    line = next(line for line in out.splitlines() if line.strip().startswith("[conv_bn]"))
    assert line.split(": ", 1)[0].split()[-1] == "other_users", line  # [rule] node (target) code: sentence


def test_explain_graph_flag():
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:small_convbn_net", "--input-shape", "1,3,8,8",
                           "--graph"])
    assert code == 0, err
    before, after = out.split("graph before:")[1].split("graph after:")
    assert before.count("call_module") == 5 and after.count("call_module") == 3  # 2 BNs folded away


def test_explain_torchvision_resnet18():
    code, out, err = _run(["explain", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["fused"] == {"conv_bn": 20}  # 17 main-path + 3 downsample conv-BN pairs
    assert rep["before"]["batch_norms"] == 20 and rep["after"]["batch_norms"] == 0


def test_explain_module_instance_spec():
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:instance", "--input-shape", "1,3,8,8", "--json"])
    assert code == 0, err
    assert json.loads(out)["fused"] == {"conv_bn": 2}


@pytest.mark.parametrize(("capture", "fused"), [("symbolic", {}), ("export", {"conv_bn": 1}), ("auto", {"conv_bn": 1})])
def test_explain_capture_flag(capture, fused):
    """``--capture`` picks the front end: symbolic tracing fails on `int(y.size(1))` and its sub-module
    fallback sees conv and BN apart; torch.export captures the model whole and the BN folds."""
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:SizeAsInt", "--input-shape", "1,3,8,8",
                           "--capture", capture, "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["fused"] == fused
    assert rep["after"]["batch_norms"] == 0 and rep["before"]["batch_norms"] == len(fused)  # graph counts only
    assert rep["capture"] == ("submodules" if capture == "symbolic" else "export"), rep["capture_reason"]
    code, out, err = _run(["explain", "fxfuse_cli_test_specs:SizeAsInt", "--input-shape", "1,3,8,8",
                           "--capture", capture])
    assert code == 0 and f"capture: {rep['capture']} (" in out, out


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("argv", "needle"), [
    (["explain", "not-a-model"], "unknown model spec"),
    (["explain", "torchvision:resnet1234"], "unknown torchvision model"),
    (["explain", "no_such_pkg_xyz.mod:fn", "--input-shape", "1,3,8,8"], "cannot import"),
    (["explain", "fxfuse_cli_test_specs:nope", "--input-shape", "1,3,8,8"], "has no attribute"),
    (["explain", "fxfuse_cli_test_specs:not_a_model", "--input-shape", "1,3,8,8"], "neither an nn.Module"),
    (["explain", "fxfuse_cli_test_specs:returns_int", "--input-shape", "1,3,8,8"], "not a torch.nn.Module"),
    (["explain", "fxfuse_cli_test_specs:raises", "--input-shape", "1,3,8,8"], "boom in constructor"),
    (["explain", "repvgg-tiny", "--input-shape", "1,3,abc"], "bad dimension"),
    (["explain", "repvgg-tiny", "--input-shape", "1,3,0,8"], "must be >= 1"),
    (["explain", "repvgg-tiny", "--input-shape", "3"], "at least batch and channel"),
    (["explain", "repvgg-tiny", "--input-shape", "1,5,32,32"], "does not run on an input of shape"),
    (["fuse", "repvgg-tiny"], "required: --out"),
    (["fuse", "repvgg-tiny", "--out", "x.pt2", "--format", "tflite"], "invalid choice"),
    (["explain", "repvgg-tiny", "--weights", "/nonexistent/ckpt.pth"], "not found"),
    (["frobnicate"], "invalid choice"),
    (["explain", "repvgg-tiny", "--capture", "dynamo"], "invalid choice"),
])
def test_errors_are_one_line(argv, needle):
    code, out, err = _run(argv)
    _assert_one_line_error(code, err, needle)


def test_checkpoint_mismatch_lists_keys(tiny_ckpt, tmp_path):
    ckpt, model = tiny_ckpt
    sd = dict(model.state_dict())
    sd.pop("stage0.dense.conv.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    code, out, err = _run(["explain", "repvgg-tiny", "--weights", str(tmp_path / "bad.pth")])
    _assert_one_line_error(code, err, "missing keys: stage0.dense.conv.weight")
    assert "unexpected keys: extra.weight" in err
    # same keys, other shapes: repvgg-tiny weights into the grouped variant
    code, out, err = _run(["explain", "repvgg-tiny_g2", "--weights", str(ckpt)])
    _assert_one_line_error(code, err, "shape mismatch")


def test_checkpoint_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    code, out, err = _run(["explain", "repvgg-tiny", "--weights", str(tmp_path / "list.pth")])
    _assert_one_line_error(code, err, "does not hold a state_dict")
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    code, out, err = _run(["explain", "repvgg-tiny", "--weights", str(tmp_path / "junk.pth")])
    _assert_one_line_error(code, err, "cannot read checkpoint")


def test_checkpoint_needing_pickle_is_refused(tmp_path):
    """weights_only=True: a checkpoint holding a whole pickled module is rejected, not executed."""
    torch.save(build("repvgg-tiny"), tmp_path / "module.pth")
    code, out, err = _run(["explain", "repvgg-tiny", "--weights", str(tmp_path / "module.pth")])
    _assert_one_line_error(code, err, "weights_only=True")


def test_traceback_flag_reraises():
    with pytest.raises(ValueError, match="unknown model spec 'not-a-model'"):
        cli.main(["--traceback", "explain", "not-a-model"], stdout=io.StringIO(), stderr=io.StringIO())
