"""Export front end: ``torch.export.export(strict=False)`` → a functional ATen ``GraphModule`` the rules rewrite.

Captured whole where symbolic tracing stops: item assignment (``out[:, :, :p] = v``), ``int()`` / ``.size()``
unpacking, branches on shapes or devices, shape-keyed caches — export runs the Python and records the ATen ops.

The program is functionalized without decomposing (``ep.run_decompositions({})``, skipped when nothing is written
in place): writes into views become
``slice_scatter`` nodes, so every data dependency is a graph edge and a rule can never miss a mutation, while
ops stay at the level the readers know (``aten.conv2d``, ``aten.linear``, ``aten.pad``; eval BatchNorm becomes
``_native_batch_norm_legit_no_training`` + ``getitem``). The core-ATen decompositions are not run: they would
split ``linear`` into ``permute`` + ``addmm`` and ``conv2d`` into ``convolution`` and hand back a larger graph
for no gain (the readers read those spellings too, for programs users export themselves). See
docs/patterns.md, "ATen graphs (capture="export")".

``ep.module()`` gives a ``GraphModule`` whose parameters and buffers are ``get_attr`` nodes holding the model's own
tensors (so :class:`fxfuse.ir.read.Constants` evaluates parameter-only sub-graphs), with the model's calling
convention (pytree in/out specs). The batch dimension is dynamic by default.
"""

from __future__ import annotations

import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..ir.graphs import fresh_copy, out_of_place, prune
from ..ir.ops import TRACE_METADATA_CHECKS, OpOverload

__all__ = ["ExportCapture", "capture", "batch_dynamic_shapes", "trace_inputs", "fresh_copy", "graph_of",
           "dynamic_shapes_of", "to_exported_program", "failure_text"]


@dataclass
class ExportCapture:
    """A captured program: ``gm`` is the pristine graph (rewrites work on :func:`fresh_copy` of it), ``dynamic``
    says which dims are dynamic (or why none is), ``seconds`` the capture time."""

    gm: fx.GraphModule
    dynamic: str
    seconds: float
    batch_pinned: bool = False  # exported static although the inputs have a batch dim export refused to free


def batch_dynamic_shapes(args: Tuple[Any, ...]) -> Any:
    """``dynamic_shapes`` marking dim 0 of every tensor input whose dim 0 equals the first tensor input's as one
    shared dynamic ``batch`` dim (``None`` when no input is a tensor with a dim). Tensors in a list stay static:
    a list of tensors is the batch itself (detection models take a list of ``[C, H, W]`` images)."""
    def batched(a: Any) -> list:
        return [] if isinstance(a, list) else [t for t in tree_leaves(a) if isinstance(t, Tensor) and t.dim() > 0]

    tensors = [t for a in args for t in batched(a)]
    if not tensors:
        return None
    n = tensors[0].shape[0]
    batch = torch.export.Dim("batch")

    def spec(t: Any) -> Any:
        return {0: batch} if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else None

    def static(t: Any) -> Any:
        return None

    return tuple(tree_map(static, a) if isinstance(a, list) else tree_map(spec, a) if isinstance(a, (tuple, dict))
                 else spec(a) for a in args)


def trace_inputs(args: Tuple[Any, ...], dynamic_shapes: Any) -> Tuple[Any, ...]:
    """The inputs to export on: ``args`` with every dim that ``dynamic_shapes`` marks dynamic and whose example
    size is 1 repeated to size 2. Export specializes such a dim (a batch of 1 would pin the batch), and it
    only traces, so no value is computed from the repeated rows. ``dynamic_shapes`` in the positional form
    (a tuple / list aligned with ``args``); a dict form is passed to export as it is."""
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(args):
        return args

    def widen(t: Any, spec: Any) -> Any:
        for dim, marked in (spec.items() if isinstance(t, Tensor) and isinstance(spec, dict) else ()):
            if marked not in (None, torch.export.Dim.STATIC) and t.shape[dim] == 1:  # (size 0: no row to repeat)
                t = t.repeat_interleave(2, dim=dim)
        return t

    def one(a: Any, spec: Any) -> Any:
        if isinstance(a, Tensor):
            return widen(a, spec)
        if isinstance(a, (tuple, list)) and isinstance(spec, (tuple, list)) and len(a) == len(spec):
            return type(a)(one(x, s) for x, s in zip(a, spec))
        if isinstance(a, dict) and isinstance(spec, dict):
            return {k: one(v, spec.get(k)) for k, v in a.items()}
        return a

    return tuple(one(a, s) for a, s in zip(args, dynamic_shapes))


def graph_of(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The functional, unlifted graph of ``ep`` (parameters and buffers as ``get_attr``; the calling convention
    of the exported module). A program without a mutating op is functional already; in-place ops on tensors the
    program made and nothing aliases (``relu_``, ``add_`` of a residual) become their out-of-place twins
    (:func:`fxfuse.ir.graphs.out_of_place`); only a program with another write is functionalized by
    ``run_decompositions({})`` (2-3x the export time).

    Two kinds of node are dropped: the dtype / device checks export records at ``.to()`` calls
    (:data:`fxfuse.ir.ops.TRACE_METADATA_CHECKS`: they hold for the float64 working copy, not for the model cast
    back; the returned model is run and compared in its own dtype instead), and pure nodes nothing uses (the
    unused statistics outputs ``getitem(bn, 1 | 2)`` of a program decomposed to core ATen, which would hide the
    BatchNorm from the readers). The input-shape guard stays."""
    gm = fresh_copy(ep.module())
    if any(node.op == "call_function" and isinstance(node.target, OpOverload) and node.target._schema.is_mutable
           for node in gm.graph.nodes) and not out_of_place(gm):
        gm = fresh_copy(ep.run_decompositions({}).module())
    prune(gm, drop=lambda node: node.target in TRACE_METADATA_CHECKS)
    gm.recompile()
    return gm


def capture(module: nn.Module, args: Tuple[Any, ...], dynamic_shapes: Any = None,
            faithful: Optional[Callable[[fx.GraphModule], bool]] = None) -> ExportCapture:
    """Export ``module`` on ``args`` (non-strict), functionalize, unlift. With ``dynamic_shapes=None`` the batch
    dim is dynamic (:func:`batch_dynamic_shapes`); if export refuses that (the code specializes the batch size)
    or the dynamic graph does not reproduce the model on ``args`` (``faithful``), it is exported with static
    shapes and ``dynamic`` says why. A user's ``dynamic_shapes`` is passed to ``torch.export`` as is."""
    with warnings.catch_warnings():
        # Tensor attributes a forward assigns (caches, grids) are put back by the caller (fxfuse.capture.state)
        warnings.filterwarnings("ignore", message="The tensor attributes? .* assigned during export")
        return _capture(module, args, dynamic_shapes, faithful)


def _capture(module: nn.Module, args: Tuple[Any, ...], dynamic_shapes: Any,
             faithful: Optional[Callable[[fx.GraphModule], bool]]) -> ExportCapture:
    start = time.perf_counter()
    if dynamic_shapes is not None:
        ep = torch.export.export(module, trace_inputs(args, dynamic_shapes), strict=False,
                                 dynamic_shapes=dynamic_shapes)
        return ExportCapture(graph_of(ep), "as given by dynamic_shapes", time.perf_counter() - start)
    shapes = batch_dynamic_shapes(args)
    why_static = "no tensor input with a batch dim (tensors in a list stay static)"
    if shapes is not None:
        try:
            ep = torch.export.export(module, trace_inputs(args, shapes), strict=False, dynamic_shapes=shapes)
            gm = graph_of(ep)
            if faithful is None or faithful(gm):
                return ExportCapture(gm, "batch (dim 0 of the inputs) dynamic", time.perf_counter() - start)
            why_static = "the graph exported with a dynamic batch differs from the model on the example input"
        except Exception as exc:  # e.g. the code specializes the batch size: export it static
            why_static = f"dynamic batch refused by torch.export ({type(exc).__name__}: " \
                         f"{_first_line(exc, 160)})"
    ep = torch.export.export(module, args, strict=False)
    return ExportCapture(graph_of(ep), f"static shapes: {why_static}", time.perf_counter() - start,
                         batch_pinned=shapes is not None)


def dynamic_shapes_of(ep: torch.export.ExportedProgram) -> Any:
    """The ``dynamic_shapes`` that re-export a module with ``ep``'s signature: one ``Dim`` per symbol of ``ep``'s
    user inputs, with ``ep.range_constraints``' range; ``None`` when every shape is static."""
    dims: Dict[str, Any] = {}
    specs = []
    any_dynamic = False
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in _user_input_names(ep):
            continue
        val = node.meta.get("val")
        spec: Optional[Dict[int, Any]] = None
        if isinstance(val, Tensor):
            for i, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt):
                    name = str(s)
                    if name not in dims:
                        vr = ep.range_constraints.get(s.node.expr)
                        lower = _finite_int(vr.lower) if vr is not None else None
                        upper = _finite_int(vr.upper) if vr is not None else None
                        kwargs = {k: v for k, v in (("min", lower), ("max", upper)) if v is not None}
                        dims[name] = torch.export.Dim(f"d_{name}", **kwargs)
                    spec = spec or {}
                    spec[i] = dims[name]
                    any_dynamic = True
        specs.append(spec)
    if not any_dynamic:
        return None
    args_spec = ep.call_spec.in_spec
    flat_count = args_spec.num_leaves if args_spec is not None else len(specs)
    if flat_count != len(specs):
        return None
    # Rebuild the (args, kwargs) structure of the exported call with the per-leaf specs.
    args_part, kwargs_part = torch.utils._pytree.tree_unflatten(specs, args_spec)
    return None if kwargs_part else tuple(args_part)


def failure_text(exc: BaseException, limit: int = 160) -> str:
    """``"Type: first line [at file:line in function]"`` for why an export failed: the innermost exception of the
    ``__cause__`` / ``__context__`` chain, located at the deepest frame outside torch and fxfuse — the model line
    where torch.export stopped (``if boxes.numel() == 0`` in torchvision's NMS), when there is one."""
    chain = [exc]
    while len(chain) < 8:
        nxt = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    text = f"{type(chain[-1]).__name__}: {_first_line(chain[-1], limit)}"
    skip = ("/torch/", "/contextlib.py", "/fxfuse/")
    for e in reversed(chain):
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if not any(part in f.filename.replace("\\", "/") for part in skip)]
        if frames:
            where = frames[-1]
            return f"{text} [at {where.filename.rsplit('site-packages/', 1)[-1]}:{where.lineno} in {where.name}]"
    return text


def _first_line(exc: BaseException, limit: int) -> str:
    """The first line of an exception's message, cut to ``limit`` characters (for reports)."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def _finite_int(bound: Any) -> Optional[int]:
    """A range bound as an int, or None for an infinite one."""
    try:
        value = int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return value if abs(value) < 2**62 else None


def _user_input_names(ep: torch.export.ExportedProgram) -> set:
    return set(ep.graph_signature.user_inputs)


def to_exported_program(module: nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]] = None,
                        dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """Export a (fused) module again: the program users get back from ``fxfuse.reparametrize(ep)``."""
    return torch.export.export(module, trace_inputs(tuple(args), dynamic_shapes), kwargs or None, strict=False,
                               dynamic_shapes=dynamic_shapes)
