"""``fxfuse bench``: the harness on a tiny reference net — table, CSV columns, JSON metadata, plots, and the
measured numbers' consistency (errors, ratios, FLOPs). No assertion on timings themselves."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch

from fxfuse.tools import cli
from fxfuse.tools.bench import CSV_COLUMNS, BenchConfig, count_flops, default_batch_sizes, run_bench

FAST = ["--min-run-time", "0.01", "--rounds", "2", "--warmup", "1", "--no-progress"]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """One CPU bench run shared by the output tests: repvgg-tiny, 32x32, batch 1 and 2, four variants."""
    out = tmp_path_factory.mktemp("bench")
    code, stdout, stderr = _run(["bench", "repvgg-tiny", "--image-size", "32", "--batch-sizes", "1,2",
                                 "--device", "cpu", "--out", str(out), *FAST])
    assert code == 0, stderr
    (out / "stdout.txt").write_text(stdout)
    return out


def _rows(bench_dir: Path):
    with open(bench_dir / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_columns_and_rows(bench_dir):
    with open(bench_dir / "results.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == CSV_COLUMNS
    rows = _rows(bench_dir)
    assert sorted((r["variant"], int(r["batch_size"])) for r in rows) == sorted(
        (v, b) for v in ("original", "fxfuse", "plain", "fx_fuse") for b in (1, 2))
    for r in rows:
        assert r["model"] == "repvgg-tiny" and r["image_size"] == "32" and r["dtype"] == "float32"
        assert r["device"] == "cpu" and r["peak_memory_bytes"] == ""  # memory is CUDA-only
        med, q1, q3 = float(r["median_ms"]), float(r["q1_ms"]), float(r["q3_ms"])
        assert 0 < q1 <= med <= q3 and math.isclose(float(r["iqr_ms"]), q3 - q1, rel_tol=1e-9, abs_tol=1e-12)
        assert int(r["calls"]) >= 2  # at least one timed call per round
        bs = int(r["batch_size"])
        assert math.isclose(float(r["images_per_s"]), bs / (med / 1e3), rel_tol=1e-9)


def test_ratios_errors_flops_are_consistent(bench_dir):
    rows = _rows(bench_dir)
    by = {(r["variant"], int(r["batch_size"])): r for r in rows}
    for bs in (1, 2):
        orig = by[("original", bs)]
        assert float(orig["speedup_vs_original"]) == 1.0 and float(orig["max_abs_error"]) == 0.0
        for v in ("fxfuse", "plain", "fx_fuse"):
            r = by[(v, bs)]
            expect = float(orig["median_ms"]) / float(r["median_ms"])
            assert math.isclose(float(r["speedup_vs_original"]), expect, rel_tol=1e-9)
        # fused models compute the same function: float32 rounding only (randomized BN, 8 convs deep)
        for v in ("fxfuse", "fx_fuse"):
            assert 0 <= float(by[(v, bs)]["max_rel_error"]) < 1e-4
        assert by[("plain", bs)]["max_rel_error"] == ""  # different (random) weights: not compared
        # FLOPs scale with the batch; collapsing the branches removes the 1x1 / identity work
        g1, g2 = float(by[("fxfuse", 1)]["gflops"]), float(by[("fxfuse", 2)]["gflops"])
        assert math.isclose(g2, 2 * g1, rel_tol=1e-9)
        assert float(by[("fxfuse", bs)]["gflops"]) < float(by[("fx_fuse", bs)]["gflops"]) \
            <= float(by[("original", bs)]["gflops"])
        # the fused net has exactly the plain twin's conv shapes: same parameter count and FLOPs
        assert by[("fxfuse", bs)]["params"] == by[("plain", bs)]["params"]
        assert math.isclose(float(by[("fxfuse", bs)]["gflops"]), float(by[("plain", bs)]["gflops"]), rel_tol=1e-9)
    assert float(by[("fxfuse", 1)]["prepare_s"]) > 0


def test_json_metadata(bench_dir):
    data = json.loads((bench_dir / "results.json").read_text())
    md = data["metadata"]
    for key in ("device", "device_name", "cpu_model", "torch_version", "dtype", "date", "command", "threads",
                "batch_sizes", "variants", "timer", "load_average_start"):
        assert key in md, key
    assert md["device"] == "cpu" and md["torch_version"] == torch.__version__ and md["dtype"] == "float32"
    assert md["batch_sizes"] == [1, 2] and md["threads"] >= 1 and md["device_name"] == md["cpu_model"]
    assert md["command"].startswith("fxfuse bench repvgg-tiny")
    assert len(data["results"]) == 8 and set(data["results"][0]) == set(CSV_COLUMNS)
    fusion = data["models"]["repvgg-tiny"]["fusion"]
    # repvgg-tiny: 8 blocks; each block's 2 conv-BNs fold (16) and its branches sum into one conv (8)
    assert fusion["fused"] == {"branch_sum": 8, "conv_bn": 16}
    assert fusion["convs"] == [16, 8] and fusion["batch_norms"][1] == 0 and fusion["verified"] is True


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_plots_written(bench_dir):
    for name in ("latency.png", "speedup.png"):
        data = (bench_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_table_printed(bench_dir):
    text = (bench_dir / "stdout.txt").read_text()
    assert "median ms" in text and "speedup" in text
    for v in ("original", "fxfuse", "plain", "fx_fuse"):
        assert f" {v} " in text
    assert "wrote " in text and "results.csv" in text


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    code, out, err = _run(["bench", "repvgg-tiny", "--image-size", "32", "--batch-sizes", "1", "--device", "cpu",
                           "--variants", "original,fxfuse", "--out", str(tmp_path), *FAST])
    assert code == 0, err
    assert "matplotlib is not installed" in err
    assert (tmp_path / "results.csv").exists() and not (tmp_path / "latency.png").exists()


def test_non_reference_model_skips_plain(tmp_path, monkeypatch):
    """A package.module:callable spec: plain is skipped with a note; fx_fuse folds the conv-BN."""
    (tmp_path / "fxfuse_bench_test_specs.py").write_text(
        "from torch import nn\n"
        "def small_convbn_net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "fxfuse_bench_test_specs:small_convbn_net"
    cfg = BenchConfig(models=[spec], batch_sizes=[1], image_size=16,
                      device="cpu", min_run_time=0.01, rounds=1, warmup=0, progress=False)
    res = run_bench(cfg)
    variants = [r["variant"] for r in res.rows]
    assert variants == ["original", "fxfuse", "fx_fuse"]
    assert "plain" in res.models[spec]["skipped"]
    for r in res.rows[1:]:
        assert r["max_rel_error"] < 1e-5
    assert res.models[spec]["fusion"]["fused"] == {"conv_bn": 2}


def test_bfloat16_channels_last_run():
    cfg = BenchConfig(models=["repvgg-tiny"], batch_sizes=[1], image_size=32, dtype="bfloat16",
                      channels_last=True, device="cpu", variants=["fxfuse"], min_run_time=0.01, rounds=1,
                      warmup=0, progress=False)
    res = run_bench(cfg)
    assert [r["variant"] for r in res.rows] == ["original", "fxfuse"]
    fused = res.rows[1]
    assert fused["dtype"] == "bfloat16" and fused["channels_last"] is True
    # bfloat16 has an 8-bit mantissa: the fused model (folded in float64, rounded once) stays within a few %
    assert 0 <= fused["max_rel_error"] < 0.1


def test_flop_counter_counts_conv():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False).eval()
    x = torch.randn(2, 3, 10, 10)
    assert count_flops(conv, x) == 2 * 2 * 8 * 10 * 10 * 3 * 9  # 2 FLOPs per multiply-add


def test_default_batch_sizes():
    assert default_batch_sizes(torch.device("cpu")) == [1, 8]
    assert default_batch_sizes(torch.device("cuda")) == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("argv, needle", [
    (["bench", "no-such-net"], "unknown model spec"),
    (["bench", "repvgg-tiny", "--batch-sizes", "1,zero"], "bad batch size"),
    (["bench", "repvgg-tiny", "--batch-sizes", "0"], "must be >= 1"),
    (["bench", "repvgg-tiny", "--variants", "original,turbo"], "unknown variant"),
    (["bench", "repvgg-tiny", "--dtype", "float8"], "invalid choice"),
])
def test_bench_errors_are_one_line(argv, needle):
    code, out, err = _run(argv + FAST)
    assert code != 0
    assert err.startswith("fxfuse: error: ") and needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    code, out, err = _run(["bench", "repvgg-tiny", "--device", "cuda", *FAST])
    assert code == 1 and "CUDA is not available" in err and "Traceback" not in err


@pytest.mark.cuda
def test_cuda_bench_memory_and_sync(tmp_path):
    """On CUDA: peak forward memory is measured for every variant, errors stay float32-small, and the
    compiled variants record a compile time."""
    code, out, err = _run(["bench", "repvgg-tiny", "--image-size", "32", "--batch-sizes", "1,4", "--device",
                           "cuda", "--compile", "--out", str(tmp_path), *FAST])
    assert code == 0, err
    rows = _rows(tmp_path)
    assert {r["variant"] for r in rows} == {"original", "fxfuse", "plain", "fx_fuse", "compiled_original",
                                            "compiled_fxfuse"}
    for r in rows:
        assert r["device"] == "cuda" and int(r["peak_memory_bytes"]) > 0
        if r["variant"] in ("fxfuse", "fx_fuse", "compiled_original", "compiled_fxfuse"):
            assert float(r["max_rel_error"]) < 1e-3  # TF32 may be on for convs
        if r["variant"].startswith("compiled_"):
            assert float(r["prepare_s"]) > 0
    md = json.loads((tmp_path / "results.json").read_text())["metadata"]
    assert md["gpu_name"] and md["device_name"] == md["gpu_name"] and md["cuda_version"]


def test_cpu_timer_single_thread_restores_threads():
    before = torch.get_num_threads()
    code, out, err = _run(["bench", "repvgg-tiny", "--image-size", "32", "--batch-sizes", "1", "--device", "cpu",
                           "--variants", "original,fxfuse", "--threads", "1", "--timer", "cpu", *FAST])
    assert code == 0, err
    assert "CPU time of this process" in out and "threads 1" in out
    assert torch.get_num_threads() == before


def test_unknown_timer_rejected():
    with pytest.raises(ValueError, match="unknown timer"):
        run_bench(BenchConfig(models=["repvgg-tiny"], device="cpu", timer="gpu", progress=False))


@pytest.mark.cuda
def test_cpu_timer_rejected_on_cuda_device():
    with pytest.raises(ValueError, match="only meaningful with --device cpu"):
        run_bench(BenchConfig(models=["repvgg-tiny"], device="cuda", timer="cpu", progress=False))
