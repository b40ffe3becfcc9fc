"""What does training an expanded model cost? Plain vs offline-expanded vs online-expanded (``expand(online=True)``).

For each network and scheme, one training step (forward, cross-entropy, backward, SGD step with momentum,
``zero_grad(set_to_none=True)``) is timed with ``torch.utils.benchmark`` (the ``fxfuse bench`` timer), all variants
of a network interleaved in one process, rounds rotating which variant goes first; the table gives the median
step time and its ratio to the plain net's (the machine is shared: quote ratios).

Peak memory: one step under ``torch.profiler.profile(profile_memory=True)``; the running sum of the CPU allocator's
allocation/free events gives the peak bytes the step allocated above what was live when it began, plus the bytes of
the parameters, buffers and optimizer state (so the figure is "torch tensor memory at the step's peak"). It counts
tensors, not the process RSS (no allocator caching, no library workspaces outside torch's allocator). The last
columns leave the parameters, buffers, optimizer state and input out: what the step itself allocates (activations,
gradients, online mode's per-step kernels). An expanded model has several times the plain net's parameters in
either mode; online mode removes the branches' feature maps, not their parameters.

    python -m benchmarks.train_cost                 # resnet18 + mobilenet_v2(0.5), 32x32, batch 32, 2 threads, 3 rounds
    python -m benchmarks.train_cost --full          # 64x64, 5 rounds, and torch.compile of every online form
    python -m benchmarks.train_cost --nets tiny --compile     # torch.compile (inductor) of a small net only

``--compile`` adds ``torch.compile`` (inductor) of the plain and online forms (compile time is printed, not timed
in the step)."""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fxfuse
from benchmarks.common import cpu_text, shown_command, source_state
from fxfuse.tools.bench import interleaved_rounds, make_timer

SCHEMES = ("repvgg", "acnet", "dbb", "mobileone", "qarepvgg")


def tiny() -> nn.Module:
    """conv-BN-ReLU x4 (16-16-32-32, one stride 2), pool, linear (the training study's net)."""
    def cbr(cin: int, cout: int, stride: int = 1) -> List[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*cbr(3, 16), *cbr(16, 16), *cbr(16, 32, 2), *cbr(32, 32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


NETS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5),
    "tiny": tiny,
}


class Step:
    """One SGD training step of ``model`` on a fixed batch."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool = False) -> None:
        self.model = model.train()
        self.run = torch.compile(model) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.y = x, y
        self.loss = nn.CrossEntropyLoss()

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.run(self.x), self.y).backward()
        self.opt.step()

    def resident_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors) + self.x.numel() * self.x.element_size()


def peak_step_bytes(step: Step) -> int:
    """Tensor bytes at the peak of one step: live before it (:meth:`Step.resident_bytes`) + the peak of the running
    sum of the allocator's events during it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return step.resident_bytes() + peak


def variants(name: str, x: torch.Tensor, y: torch.Tensor, schemes: Tuple[str, ...],
             compiled: bool) -> Dict[str, Step]:
    torch.manual_seed(0)
    base = NETS[name]()
    out = {"plain": Step(base, x, y)}
    if compiled:
        out["plain compiled"] = Step(copy.deepcopy(base), x, y, compiled=True)
    for s in schemes:
        out[f"{s} offline"] = Step(fxfuse.expand(base, x[:2], scheme=s, init="paper"), x, y)
        online = fxfuse.expand(base, x[:2], scheme=s, init="paper", online=True)
        assert all(e.online for e in online.fxfuse_expand_report.expanded)
        out[f"{s} online"] = Step(online, x, y)
        if compiled:
            out[f"{s} online compiled"] = Step(fxfuse.expand(base, x[:2], scheme=s, init="paper", online=True), x, y,
                                               compiled=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="resnet18,mobilenet_v2")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--size", type=int, default=None, help="input height = width (default 32; --full: 64)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --full: 5)")
    ap.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed block (at least one step)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of plain and online")
    ap.add_argument("--full", action="store_true", help="64x64, 5 rounds, --compile")
    args = ap.parse_args()
    size = args.size or (64 if args.full else 32)
    rounds = args.rounds or (5 if args.full else 3)
    compiled = args.compile or args.full
    torch.set_num_threads(args.threads)
    schemes = tuple(s for s in args.schemes.split(",") if s)
    print(f"{shown_command('python -m benchmarks.train_cost', sys.argv[1:])}; {cpu_text()}, shared; "
          f"{args.threads} threads; torch {torch.__version__}; {source_state()}; {datetime.date.today().isoformat()}; "
          f"batch {args.batch}, {size}x{size}, float32, {rounds} interleaved rounds", flush=True)
    for name in args.nets.split(","):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, size, size, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        steps = variants(name, x, y, schemes, compiled)
        for key, step in steps.items():  # warm-up (and compilation)
            start = time.perf_counter()
            step()
            step()
            if key.endswith("compiled"):
                print(f"  {name} {key}: compiled + 2 steps in {time.perf_counter() - start:.1f} s", flush=True)
        memory = {key: peak_step_bytes(step) for key, step in steps.items()}
        # what the step allocates above the model's parameters, buffers, optimizer state and input: activations,
        # gradients, and online mode's per-step kernels
        working = {key: memory[key] - step.resident_bytes() for key, step in steps.items()}
        timers = {key: make_timer(step, (), threads=args.threads) for key, step in steps.items()}
        measured = interleaved_rounds(timers, rounds, args.min_run_time)
        med = {key: statistics.median(m.median for m in ms) for key, ms in measured.items()}
        spread = {key: (min(m.median for m in ms), max(m.median for m in ms)) for key, ms in measured.items()}
        print(f"\n{name}\n")
        print("| variant | step (median of rounds) | min – max over rounds | vs plain | peak tensor memory "
              "| vs plain | of it above parameters + optimizer state | vs plain |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key in steps:
            lo, hi = spread[key]
            print(f"| {key} | {med[key] * 1e3:.0f} ms | {lo * 1e3:.0f} – {hi * 1e3:.0f} ms | "
                  f"{med[key] / med['plain']:.2f}x | {memory[key] / 2**20:.0f} MiB | "
                  f"{memory[key] / memory['plain']:.2f}x | {working[key] / 2**20:.0f} MiB | "
                  f"{working[key] / working['plain']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
