"""The versions of one model that a benchmark compares, built once per model (before any batch size is timed).

``original`` (eval model, BN statistics randomized so fusion is not trivial), ``fxfuse``
(:func:`fxfuse.reparametrize`), ``plain`` (the hand-written deploy net, :func:`fxfuse.models.plain_twin`;
reference nets only), ``fx_fuse`` (``torch.fx.experimental.optimization.fuse``, PyTorch's generic conv-BN fuser);
``compiled_*`` share their eager model here and are compiled per batch size by the runner."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from ...ir.ops import module_kind
from ...report import FusionReport
from ..executed_ops import executed_ops
from ..model_source import SpecError, load_model
from .config import BenchConfig
from .progress import Progress


@dataclass
class Variant:
    name: str
    module: nn.Module  # compiled variants: the eager model (compiled per batch size by the runner)
    prepare_s: Optional[float] = None
    flops_per_image: Optional[float] = None
    params: Optional[int] = None
    compared: bool = True  # outputs compared with `original` (not the plain twin: different weights)


@dataclass
class Prepared:
    spec: str
    kind: str
    input_shape: Tuple[int, ...]  # batch-1 NCHW
    variants: Dict[str, Variant]
    notes: Dict[str, Any]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: Callable[..., Any], x: Tensor) -> Optional[float]:
    """Total FLOPs of one call (``FlopCounterMode``; a multiply-add counts as 2), or ``None`` if it fails."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(x)
        return float(counter.get_total_flops())
    except Exception:  # a model the counter cannot run through
        return None


def plain_reinit_(plain: nn.Module, seed: int) -> None:
    """Kaiming-normal (ReLU gain, ``std = sqrt(2 / fan_in)``) weights and zero biases for the plain twin's convs:
    keeps activations O(1) through depth so no variant runs into denormal numbers (slow on CPUs) by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in plain.modules():
            if module_kind(m) != "conv":
                continue
            conv = cast(nn.Conv2d, m)
            fan_in = conv.weight[0].numel()
            w = torch.randn(conv.weight.shape, generator=gen, dtype=torch.float32) * math.sqrt(2.0 / fan_in)
            conv.weight.copy_(w.to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.zero_()


def make_input(shape: Sequence[int], device: torch.device, dtype: torch.dtype, channels_last: bool,
               seed: int) -> Tensor:
    """Standard-normal input, drawn in float32 from ``seed`` (same values for every dtype), then cast."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def prepare(spec: str, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, wanted: Sequence[str],
            progress: Progress) -> Prepared:
    """Build ``spec``, randomize BN, and produce every wanted variant on ``device`` in ``dtype``. A variant that
    cannot be built is skipped with its reason in ``notes["skipped"]``."""
    import fxfuse
    from fxfuse import models as fxm

    loaded = load_model(spec)
    model = loaded.model
    fxm.randomize_batchnorm_(model, seed=cfg.seed)
    model.eval()
    base = loaded.default_shape or (1, 3, 224, 224)
    if len(base) != 4:
        raise SpecError(f"bench needs an image model (NCHW input); {spec!r} has default input {base}")
    size = cfg.image_size or base[2]
    shape = (1, base[1], size, size)
    model.to(device=device, dtype=dtype)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    x1 = make_input(shape, device, dtype, cfg.channels_last, cfg.seed)
    try:
        with torch.inference_mode():
            model(x1)
    except Exception as exc:  # any failure of the user's model becomes one line
        raise SpecError(f"{spec!r} does not run on input {tuple(shape)} in {cfg.dtype} on {device.type}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    variants: Dict[str, Variant] = {"original": Variant("original", model, prepare_s=0.0)}
    notes: Dict[str, Any] = {"kind": loaded.kind, "input_shape": list(shape), "skipped": {}}

    def skip(name: str, why: str) -> None:
        notes["skipped"][name] = why
        progress.note(f"{spec}: skipping {name}: {why}")

    fused = None
    if "fxfuse" in wanted or "compiled_fxfuse" in wanted:
        t0 = time.perf_counter()
        try:
            fused = fxfuse.reparametrize(model, x1)
        except Exception as exc:  # report and go on with the other variants
            skip("fxfuse", f"reparametrize failed: {type(exc).__name__}: {exc}")
            if "compiled_fxfuse" in wanted:
                skip("compiled_fxfuse", "no fxfuse model")
        else:
            elapsed = time.perf_counter() - t0
            if cfg.channels_last:
                fused.to(memory_format=torch.channels_last)
            rep = cast(FusionReport, fused.fxfuse_report)
            notes["reparametrize_s"] = elapsed
            notes["fusion"] = {
                "fused": dict(rep.fused), "unfused": len(rep.unfused), "rolled_back": list(rep.rolled_back),
                "verified": rep.verified, "verify_dtype": rep.verify_dtype,
                "max_rel_error": rep.max_rel_error, "convs": [rep.before.convs, rep.after.convs],
                "batch_norms": [rep.before.batch_norms, rep.after.batch_norms],
                "ops": [rep.before.nodes, rep.after.nodes],
            }
            if "fxfuse" in wanted:
                variants["fxfuse"] = Variant("fxfuse", fused, prepare_s=elapsed)
    if "plain" in wanted:
        if fxm.reparam_blocks(model):
            t0 = time.perf_counter()
            plain = fxm.plain_twin(model).eval()
            plain_reinit_(plain, cfg.seed + 1)
            plain.to(device=device, dtype=dtype)
            if cfg.channels_last:
                plain.to(memory_format=torch.channels_last)
            variants["plain"] = Variant("plain", plain, prepare_s=time.perf_counter() - t0, compared=False)
        else:
            skip("plain", "no hand-written deploy twin (only fxfuse.models reference nets have one)")
    if "fx_fuse" in wanted:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        t0 = time.perf_counter()
        try:
            generic = fx_fuse(model, inplace=False)
        except Exception as exc:  # PyTorch's fuser cannot trace every model
            skip("fx_fuse", f"torch.fx.experimental.optimization.fuse failed: {type(exc).__name__}: {exc}")
        else:
            if cfg.channels_last:
                generic.to(memory_format=torch.channels_last)
            variants["fx_fuse"] = Variant("fx_fuse", generic, prepare_s=time.perf_counter() - t0)

    for v in variants.values():
        v.params = count_params(v.module)
        v.flops_per_image = count_flops(v.module, x1)
    # every op each eager variant executes on one batch-1 call (fxfuse.tools.executed_ops)
    notes["executed_ops"] = {name: dict(executed_ops(v.module, x1)) for name, v in variants.items()}
    # compiled variants are (re)built per batch size by the runner; they share the eager model's counts
    eager_models = {"compiled_original": model, "compiled_fxfuse": fused}
    for name, eager in eager_models.items():
        if name in wanted and eager is not None:
            variants[name] = Variant(name, eager, params=count_params(eager), flops_per_image=count_flops(eager, x1))
    notes["params"] = {k: v.params for k, v in variants.items()}
    notes["flops_per_image"] = {k: v.flops_per_image for k, v in variants.items()}
    return Prepared(spec, loaded.kind, shape, variants, notes)
