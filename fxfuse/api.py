"""Public entry points: :func:`reparametrize`, :func:`reparametrize_exported`, :func:`compile`.

The pass runs capture → rewrite → verify → artifact once per capture tried: the capture choice is
:func:`fxfuse.capture.auto.choose`, the verified rewrite of a captured graph :func:`fxfuse.verified.rewrite_verified`
(float64 lens, rules, rollback, the returned module in the model's dtypes), dtype logic :mod:`fxfuse._dtypes`."""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from . import _dtypes
from . import rules as _builtin_rules  # noqa: F401  (importing it registers the built-in rules)
from .artifact import clone_inputs, inspect, run_original
from .capture import Call, trace
from .capture import export as _export
from .capture.auto import CAPTURES, Captures, choose
from .capture.state import attributes_preserved
from .capture.submodules import rewrite_submodules
from .errors import FusionError
from .ir.graphs import direct_module_calls
from .report import FusionReport
from .rewrite import RuleLike, resolve_rules
from .tools.executed_ops import executed_fusable
from .verified import Example, Options, rewrite_verified
from .verify import Comparison, compare

__all__ = ["CAPTURES", "compile", "reparametrize", "reparametrize_exported"]


def _normalize_inputs(example_input: Any) -> Tuple[Any, ...]:
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a tuple/list of the model's positional inputs, got "
                    f"{type(example_input).__name__}")


def reparametrize(
    model: nn.Module,
    example_input: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    rtol: Optional[float] = None,
    atol: float = 0.0,
    rules: Optional[Sequence[RuleLike]] = None,
    enable: Iterable[str] = (),
    disable: Iterable[str] = (),
    fallback: bool = True,
    max_rollbacks: int = 8,
    keep_asserts: bool = False,
    capture: str = "auto",
    dynamic_shapes: Any = None,
) -> nn.Module:
    """Return an eval-mode model equal to ``model`` with re-parameterizable structure collapsed into single convs.

    The rewrite is computed on a float64 copy, checked there on ``example_input`` (``rtol`` default 1e-9 of the
    output's max-abs), and cast back to each parameter's dtype; where float64 is impossible the model's dtype is
    used with a looser, dtype-aware tolerance (:func:`fxfuse.verify.default_rtol`). If the check fails, the
    rewrites that changed the output are found by bisection, undone and reported. The returned model is then run
    once on ``example_input`` in its own dtype and device and compared again (``report.artifact_check``).
    :class:`FusionError` is raised only when no equal model can be produced. The input model is not modified
    unless ``inplace=True``.

    Returns a ``torch.fx.GraphModule`` (or, for models that do not trace as a whole and ``fallback=True``, the
    model with every traceable sub-module rewritten) carrying ``.fxfuse_report`` (:class:`FusionReport`).

    ``rules``: the rules to run (names / :class:`Rule` / functions) instead of the enabled registered ones;
    ``enable`` / ``disable``: rule names added to / removed from that set. ``keep_asserts=True`` keeps shape
    assertions the fused graph already guarantees (rule ``shape_assert``, which removes them by default).

    ``capture``: how the model becomes a graph. ``"symbolic"``: ``torch.fx`` symbolic tracing. ``"export"``:
    ``torch.export`` (non-strict), rewritten on the functional ATen graph; it captures code symbolic tracing cannot
    (item assignment, ``int()`` of sizes, branches on shapes or devices, caches); the batch dim stays dynamic
    unless ``dynamic_shapes`` (``torch.export``'s argument) says otherwise. ``"auto"`` (default): symbolic
    tracing, then export when tracing fails or leaves BatchNorms / unfused candidates, keeping the result that
    executes fewer convs + BatchNorms (symbolic on a tie), never an export pinned to the example's batch size
    while a capture that keeps every batch size exists; the per-sub-module fallback comes last.
    ``report.capture`` / ``report.capture_reason`` say which was used and why. An ``ExportedProgram`` passed as
    ``model`` is rewritten by :func:`reparametrize_exported` and one is returned (``example_input`` then defaults
    to the inputs it was exported with).
    """
    if isinstance(model, torch.export.ExportedProgram):
        program: Any = reparametrize_exported(model, example_input, verify=verify, rtol=rtol, atol=atol, rules=rules,
                                              enable=enable, disable=disable, max_rollbacks=max_rollbacks,
                                              keep_asserts=keep_asserts, dynamic_shapes=dynamic_shapes)
        return program  # an ExportedProgram: the same kind of object that was passed
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparametrize expects a torch.nn.Module, got {type(model).__name__}")
    if example_input is None:
        raise TypeError("reparametrize needs an example_input: the tensor (or tuple of positional inputs) the "
                        "model is traced and checked on")
    args = _normalize_inputs(example_input)
    disable = [*disable, "shape_assert"] if keep_asserts else disable
    opts = Options(resolve_rules(rules, enable, disable), verify, rtol, atol, max_rollbacks)
    start = time.perf_counter()
    notes: List[str] = []
    if model.training:
        warnings.warn("fxfuse.reparametrize: the model is in training mode; BatchNorm folding uses running "
                      "statistics, so the result is an eval-mode model (compare it with model.eval()).",
                      UserWarning, stacklevel=2)
        notes.append("input model was in training mode; result is in eval mode")
    if not any(True for _ in model.parameters()) and not any(True for _ in model.buffers()) \
            and not any(True for _ in model.children()):
        warnings.warn("fxfuse.reparametrize: the model has no parameters or sub-modules; nothing to fuse",
                      UserWarning, stacklevel=2)

    # The model as given (its dtypes, its device), in eval mode: a structural copy sharing its tensors, so the
    # user's model keeps its mode and attributes (inplace=True: the model itself).
    work = model if inplace else _dtypes.shared_copy(model)
    work.eval()
    model_state = {id(t) for t in itertools.chain(work.parameters(), work.buffers())}
    copied = time.perf_counter()
    own, own_error = run_original(work, args) if verify else (None, None)
    ran = time.perf_counter()
    float64_outputs = _float64_outputs(work, args)
    if own_error is not None:
        if float64_outputs() is None:
            raise ValueError(f"the model cannot run on example_input: {type(own_error).__name__}: {own_error}. Pass "
                             "a tensor or a tuple of positional inputs that model(*inputs) accepts.") from own_error
        notes.append(f"the model does not run in its own dtype here ({type(own_error).__name__}: "
                     f"{str(own_error)[:160]}); verified in float64")
    if verify and not _has_float_tensor(own if own_error is None else float64_outputs()):
        raise FusionError(f"the model's output ({type(own).__name__}) holds no floating-point tensor, so fxfuse "
                          "cannot check that the rewritten model is equal. Make forward return its tensors (tensors "
                          "nested in tuples/lists/dicts are fine) or pass verify=False.")
    example = Example([Call(args, {}, own)], own_error, float64_outputs)

    def symbolic() -> Tuple[nn.Module, FusionReport]:
        clock = time.perf_counter()
        gm = trace(work)
        captured = time.perf_counter() - clock
        module, report = rewrite_verified(gm, example, opts, model_state)
        report.phases = {"capture": captured, **report.phases}
        return module, report

    def export() -> Tuple[nn.Module, FusionReport, _export.ExportCapture]:
        def faithful(gm: fx.GraphModule) -> bool:
            if own is None:
                return True
            with torch.no_grad(), attributes_preserved(gm):
                return compare(own, gm(*clone_inputs(args)), rtol, atol).ok

        with attributes_preserved(work):
            captured = _export.capture(work, args, dynamic_shapes, faithful)
        module, report = rewrite_verified(captured.gm, example, opts, model_state)
        report.phases = {"capture": captured.seconds, **report.phases}
        return module, report, captured

    def submodules(trace_error: Exception) -> Tuple[nn.Module, FusionReport]:
        return _rewrite_submodules(work, args, example, opts, model_state, trace_error, inplace)

    result, report = choose(capture, fallback, dynamic_shapes is not None,
                            Captures(symbolic, export, submodules, lambda m: _executed(m, args)))
    report.warnings[:0] = notes
    result.eval()
    report.pass_seconds = time.perf_counter() - start
    report.phases = {"copy": copied - start, "original run": ran - copied, **report.phases,
                     "total": report.pass_seconds}
    for sub in result.modules():
        if isinstance(sub, fx.GraphModule):
            direct_module_calls(sub)
    result.fxfuse_report = report  # type: ignore[assignment]
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module and drops plain attributes except those listed here.
        result.meta.setdefault("_user_preserved_attributes", {})["fxfuse_report"] = report
    return result


def _float64_outputs(work: nn.Module, args: Tuple[Any, ...]) -> Callable[[], Optional[List[Any]]]:
    """The model run in float64 (a float64 copy), computed on first use: the second witness for outputs decided by
    rounding in the model's dtype, and the reference where the model does not run in its own dtype."""
    cache: Dict[str, Optional[List[Any]]] = {}

    def outputs() -> Optional[List[Any]]:
        if "out" not in cache:
            try:
                copied = _dtypes.float64_copy(work).eval()
                with torch.no_grad(), attributes_preserved(copied):
                    cache["out"] = [copied(*_dtypes.cast_inputs(clone_inputs(args), torch.float64))]
            except Exception:  # float64 impossible for this model
                cache["out"] = None
        return cache["out"]

    return outputs


def _rewrite_submodules(work: nn.Module, args: Tuple[Any, ...], example: Example, opts: Options,
                        model_state: set, trace_error: Exception, inplace: bool) -> Tuple[nn.Module, FusionReport]:
    """The per-sub-module fallback: every largest traceable sub-module rewritten (each verified on the inputs it
    received), the whole model checked in its own dtype afterwards."""
    root = work if inplace else copy.deepcopy(work)  # the result owns its tensors, as every capture's does
    report = FusionReport()
    own = example.calls[0].output

    def rewrite_one(module: nn.Module, gm: fx.GraphModule, calls: Sequence[Call]) -> Tuple[nn.Module, FusionReport]:
        state = {id(t) for t in itertools.chain(module.parameters(), module.buffers())}
        return rewrite_verified(gm, Example(calls), opts, state)

    def check_whole(module: nn.Module) -> Comparison:
        with torch.no_grad(), attributes_preserved(module):  # each check starts from the state the run started from
            try:
                out = module(*clone_inputs(args))
            except Exception as exc:  # a rewrite that breaks execution is a failed check
                return Comparison(False, float("inf"), float("inf"), 0.0, f"rewritten model raised {exc!r}")
        return compare(own, out, opts.rtol, opts.atol)

    result = rewrite_submodules(root, args, rewrite_one, check_whole if opts.verify and own is not None else None,
                                report, trace_error)
    reference = example.float64_outputs() if example.float64_outputs is not None else None
    verdict = inspect(result, args, (reference or [own])[0] if opts.verify else None, own, example.error, opts.rtol,
                      opts.atol, drift_check=False)
    if not verdict.ok:
        raise FusionError(f"model with rewritten sub-modules: {verdict.text}")
    report.artifact_check, report.artifact_max_rel_error = verdict.text, verdict.max_rel
    if verdict.warning:
        report.warnings.append(verdict.warning)
    report.verify_dtype = _dtypes.dtype_name(_dtypes.leaf_dtype(own)) if opts.verify and own is not None else None
    return result, report


def _has_float_tensor(output: Any) -> bool:
    """Whether a (nested) output has a floating/complex tensor leaf: the values verification compares."""
    return any(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in tree_leaves(output))


def _executed(module: nn.Module, args: Tuple[Any, ...]) -> int:
    """Convs + BatchNorms + pools one call of ``module`` on ``args`` executes (what ``capture="auto"`` minimizes)."""
    with attributes_preserved(module):
        return executed_fusable(module, *clone_inputs(args))


def reparametrize_exported(ep: torch.export.ExportedProgram, example_input: Any = None, *,
                           dynamic_shapes: Any = None, **kwargs: Any) -> torch.export.ExportedProgram:
    """``reparametrize`` for an ``ExportedProgram``: rewrites ``ep.module()`` on its ATen graph and exports the
    result again with ``ep``'s signature (same inputs and outputs, same dynamic dims unless ``dynamic_shapes``
    says otherwise), so ``torch.export.save`` / ``load`` and whatever ran ``ep`` run it. ``example_input``
    defaults to the inputs ``ep`` was exported with. The report is ``result.fxfuse_report`` (not saved)."""
    if example_input is None:
        if ep.example_inputs is None:
            raise ValueError("this ExportedProgram carries no example inputs: pass example_input")
        args, call_kwargs = ep.example_inputs
        if call_kwargs:
            raise ValueError("the ExportedProgram was exported with keyword inputs; pass example_input "
                             "(positional inputs) for a program without them")
    else:
        args = _normalize_inputs(example_input)
    shapes = dynamic_shapes if dynamic_shapes is not None else _export.dynamic_shapes_of(ep)
    module = ep.module()
    for mod in module.modules():  # the program's mode is fixed in its graph; its eval() raises NotImplementedError
        mod.training = False
    fused = reparametrize(module, args, capture="export", dynamic_shapes=shapes, **kwargs)
    program = _export.to_exported_program(fused, args, dynamic_shapes=shapes)
    program.fxfuse_report = fused.fxfuse_report  # type: ignore[attr-defined]
    return program


def compile(model: nn.Module, example_input: Any, *, reparametrize_kwargs: Optional[Dict[str, Any]] = None,
            **compile_kwargs: Any) -> Callable[..., Any]:
    """Re-parameterize, then ``torch.compile``: ``torch.compile(reparametrize(model, example_input,
    **reparametrize_kwargs), **compile_kwargs)``. The compiled function carries the pass's report as
    ``.fxfuse_report``. Timings against compiling the original: docs/benchmarks.md (``benchmarks/compile_path.py``)."""
    fused = reparametrize(model, example_input, **(reparametrize_kwargs or {}))
    compiled = torch.compile(fused, **compile_kwargs)
    compiled.fxfuse_report = fused.fxfuse_report  # type: ignore[attr-defined]
    return compiled

