"""``fxfuse bench``: the harness on a tiny reference net — table, CSV columns, JSON metadata, plots, and the
measured numbers' consistency (errors, ratios, FLOPs). No assertion on timings themselves."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fxfuse.tools import cli
from fxfuse.tools.bench import (
    CSV_COLUMNS,
    BenchConfig,
    Progress,
    count_flops,
    default_batch_sizes,
    interleaved_rounds,
    make_timer,
    run_bench,
)
from fxfuse.tools.bench.timing import per_call_times

# One worker runs this file under pytest-xdist (make test: --dist loadgroup), so the module-scoped bench run below
# happens once, not once per worker.
pytestmark = pytest.mark.xdist_group("bench")

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


@pytest.mark.parametrize(("argv", "needle"), [
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


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_per_step_when_not_a_terminal():
    """A pipe or file gets ``[k/N] what`` lines (no carriage returns); a terminal gets the redrawn tqdm bar."""
    stream = io.StringIO()
    progress = Progress(3, True, stream)
    progress.note("building")
    for i in range(3):
        progress.step(f"step {i}")
    progress.close()
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == ["building", "[   1/3] step 0", "[   2/3] step 1", "[   3/3] step 2"]
    if importlib.util.find_spec("tqdm") is not None:
        tty = _FakeTTY()
        bar = Progress(3, True, tty)
        for i in range(3):
            bar.step(f"step {i}")
        bar.close()
        assert "\r" in tty.getvalue() and "[   1/3]" not in tty.getvalue()
    silent = io.StringIO()
    Progress(3, False, silent).step("x")
    assert silent.getvalue() == ""


def test_cli_progress_lines_on_a_pipe():
    """``fxfuse bench`` with progress on and stderr not a terminal: one line per variant and round."""
    code, out, err = _run(["bench", "repvgg-tiny", "--image-size", "32", "--batch-sizes", "1", "--device", "cpu",
                           "--variants", "original,fxfuse", "--min-run-time", "0.01", "--rounds", "2",
                           "--warmup", "0"])
    assert code == 0, err
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert "\r" not in err
    assert steps == ["[   1/4] repvgg-tiny bs=1 original round 1/2", "[   2/4] repvgg-tiny bs=1 fxfuse round 1/2",
                     "[   3/4] repvgg-tiny bs=1 fxfuse round 2/2", "[   4/4] repvgg-tiny bs=1 original round 2/2"]


class _FakeTimer:
    """Records when it is asked to measure; returns a stand-in Measurement."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def blocked_autorange(self, min_run_time):
        self.log.append((self.name, min_run_time))
        return SimpleNamespace(times=[0.5, 0.25], raw_times=[1.0, 0.5], number_per_run=2, median=0.375)


def test_interleaved_rounds_rotate_the_order():
    log = []
    timers = {n: _FakeTimer(n, log) for n in ("a", "b", "c")}
    turns = []
    out = interleaved_rounds(timers, 4, 0.125, on_turn=lambda name, r: turns.append((name, r)))
    assert [n for n, _ in log] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(t == 0.125 for _, t in log)
    assert turns == [(n, i // 3) for i, (n, _) in enumerate(log)]
    assert {n: len(ms) for n, ms in out.items()} == {"a": 4, "b": 4, "c": 4}
    times, calls = per_call_times(out["a"])
    assert times == [0.5, 0.25] * 4 and calls == 2 * 2 * 4


def test_make_timer_measures_the_call():
    """The public ``Timer`` wrapper runs ``fn(*args)``: calls are counted, time per call is positive."""
    seen = []
    timer = make_timer(lambda t: seen.append(t), (7,), threads=1)
    m = timer.blocked_autorange(min_run_time=0.01)
    assert seen and set(seen) == {7}
    assert len(seen) >= m.number_per_run * len(m.raw_times) and m.median > 0


def test_output_error_is_measured(monkeypatch):
    """A variant whose output is off by a factor 1 + 1e-3 is reported with max rel err 1e-3 (the comparison is
    fxfuse.verify.compare, in float64, against the original)."""
    import fxfuse

    real = fxfuse.reparametrize

    def off_by_1e3(model, x, **kw):
        fused = real(model, x, **kw)
        fused.register_forward_hook(lambda mod, args, out: out * (1 + 1e-3))
        return fused

    monkeypatch.setattr(fxfuse, "reparametrize", off_by_1e3)
    cfg = BenchConfig(models=["repvgg-tiny"], batch_sizes=[1], image_size=16, device="cpu",
                      variants=["fxfuse"], min_run_time=0.01, rounds=1, warmup=0, progress=False)
    row = run_bench(cfg).rows[1]
    assert row["variant"] == "fxfuse"
    # float32 run: the fold itself differs by ~3e-7 relative, far below the injected 1e-3
    assert math.isclose(row["max_rel_error"], 1e-3, rel_tol=1e-2)
