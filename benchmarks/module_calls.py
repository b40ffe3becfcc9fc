"""Where the fused reference nets lose to their hand-written twins: the per-call cost of fetching sub-modules.

    python -m benchmarks.module_calls [--net mobileone-zoo] [--batches 8,1] [--rounds 9] [--min-run-time 0.1]
                                      [--profile]

Four versions of one reference net, all holding **the same weights** (the fused ones), timed interleaved on one
thread (CPU time, rotating order, median of per-round ratios):

* ``twin``: the hand-written deploy net (``plain_twin``, nested ``nn.Sequential``s: ``Sequential.forward`` iterates
  ``self._modules`` and never looks a sub-module up by name);
* ``traced_twin``: ``torch.fx.symbolic_trace(twin)``, fx's own code (``getattr(self.body, "0")``-style lookups);
* ``fx_code``: fxfuse's result with fx's generated code (``self.fused_add_4(x)``: each ``self.name`` misses
  ``__dict__`` and runs ``nn.Module.__getattr__``);
* ``fused``: what ``reparametrize`` returns (``self._modules['fused_add_4'](x)``, see
  ``fxfuse.ir.graphs.direct_module_calls``).

``--profile`` also prints a ``torch.profiler`` table of the ATen ops each version runs (counts must agree: the
versions differ in Python only). docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings
from typing import Dict, Optional, Sequence

import torch
from torch import fx, nn

import fxfuse
from fxfuse.models import build, default_input_shape, plain_twin, randomize_batchnorm_
from fxfuse.tools.bench.timing import make_timer

from .artifact_latency import with_weights_of


def versions(net: str) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    model = randomize_batchnorm_(build(net), 0).eval()
    x = torch.randn(default_input_shape(net))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fxfuse.reparametrize(model, x)
    twin = with_weights_of(plain_twin(model).eval(), fused)
    assert isinstance(fused, fx.GraphModule)
    fx_code = copy.deepcopy(fused)  # a deep copy regenerates fx's own code
    assert "self._modules[" not in fx_code.code and "self._modules[" in fused.code
    return {"twin": twin, "traced_twin": fx.symbolic_trace(copy.deepcopy(twin)), "fx_code": fx_code,
            "fused": fused}


def aten_ops(model: nn.Module, x: torch.Tensor, calls: int = 50) -> Dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(x)
    return {e.key: e.count // calls for e in prof.key_averages() if e.key.startswith("aten::")}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.module_calls", description=__doc__.split("\n")[0])
    parser.add_argument("--net", default="mobileone-zoo")
    parser.add_argument("--batches", default="8,1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--min-run-time", type=float, default=0.1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = versions(args.net)
    shape = default_input_shape(args.net)
    print(f"{args.net}, torch {torch.__version__}, 1 thread, CPU time, {args.rounds} rotating rounds of "
          f"{args.min_run_time} s; ratio = twin time / version time (> 1: faster than the twin)")
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, *shape[1:])
        if args.profile:
            ops = {name: aten_ops(m, x) for name, m in models.items()}
            print(f"batch {b}: ATen ops per call", {n: sum(o.values()) for n, o in ops.items()},
                  "equal" if ops["fused"] == ops["twin"] == ops["fx_code"] else "DIFFER")
        timers = {name: make_timer(m, (x,), 1, "cpu") for name, m in models.items()}
        res: Dict[str, list] = {name: [] for name in models}
        order = list(models)
        with torch.inference_mode():
            for r in range(args.rounds):
                k = r % len(order)
                for name in order[k:] + order[:k]:
                    res[name].append(timers[name].blocked_autorange(min_run_time=args.min_run_time).median)
        cells = []
        for name in order:
            ratio = statistics.median(t / v for t, v in zip(res["twin"], res[name]))
            cells.append(f"{name} {statistics.median(res[name]) * 1e6:.0f} µs ({ratio:.3f})")
        print(f"batch {b}: " + ", ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
