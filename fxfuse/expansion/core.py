"""``expand``: find the convs the capture sees, swap each (with the BatchNorm after it) for an expanded block.

Finding convs: the model's ``torch.fx`` symbolic trace (:func:`fxfuse.capture.trace`) gives every
``nn.Conv2d`` call site and whether its only user is a ``BatchNorm2d``; a model that does not trace is walked
instead (``nn.Conv2d`` modules run once on the example input, a ``BatchNorm2d`` right after one in an
``nn.Sequential`` is its BN). The user's module tree is kept: the conv's attribute now holds the block and the
BN's holds ``nn.Identity``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from .. import _dtypes
from ..capture import capture_calls, trace
from ..capture.submodules import _swap_module
from ..errors import FusionError
from ..ir import ops
from ..ir.algebra import ConvGeometry
from ..verify import compare
from .expand_report import Expanded, ExpandReport, Skipped
from .modules import INITS, build_block
from .online import make_online
from .scheme import SchemeLike, get_scheme

Where = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
PRESERVE_RTOL = 1e-9


@dataclass
class _Site:
    name: str
    conv: nn.Conv2d
    bn_name: Optional[str] = None
    bn: Optional[nn.BatchNorm2d] = None


def expand(model: nn.Module, example_input: Any, *, scheme: SchemeLike, init: str = "preserve", where: Where = None,
           inplace: bool = False, verify: bool = True, online: bool = False) -> nn.Module:
    """Return ``model`` with every eligible ``nn.Conv2d`` (and the ``BatchNorm2d`` after it) replaced by a
    trainable multi-branch block of ``scheme`` (a registered name such as ``"repvgg"``, ``"acnet"``, ``"dbb"``,
    ``"mobileone"``, ``"qarepvgg"``, a :class:`Scheme`, or a scheme function).

    ``init="preserve"``: the result in eval mode computes the original function (checked in float64 on
    ``example_input`` to ``1e-9`` of the output's max-abs when ``verify``); ``init="paper"``: the schemes'
    published initialisation of the new branches, for training from scratch. ``where``: module-name glob
    pattern(s) or a predicate ``(name, conv) -> bool`` choosing the convs. The input model is copied unless
    ``inplace``. The result carries ``.fxfuse_expand_report`` (:class:`ExpandReport`).

    ``online=True`` (OREPA): every block's branch BatchNorms become learnable per-channel scales, the conv's own
    BatchNorm moves after the block, and each forward computes the block's equivalent kernel and runs one conv
    (:class:`~fxfuse.expansion.online.OnlineConv2d`); a block that cannot be made linear stays offline, with the
    reason in the report.

    ``fxfuse.reparametrize(result.eval(), example_input)`` collapses every block back into one conv of the
    original geometry."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expand expects a torch.nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    chosen = get_scheme(scheme)
    args = _inputs(example_input)
    select = _selector(where)
    report = ExpandReport(chosen.name, init, params_before=_count_params(model), online=online)
    reference = _run_float64(model, args, report) if verify and init == "preserve" else None

    work = model if inplace else copy.deepcopy(model)
    sites = _find_sites(work, args, report)
    for site in sites:
        if not select(site.name, site.conv):
            report.skipped.append(Skipped(site.name, "not selected by `where`"))
            continue
        geometry = ConvGeometry.of(site.conv)  # (_conv_reason refused an asymmetric padding="same")
        plan = chosen.plan(geometry)
        if plan.post_bn and site.bn is None:  # the Plan contract: a conv without BN gets no BN after the sum
            plan = dataclasses.replace(plan, post_bn=False,
                                       notes=(*plan.notes, "no BatchNorm after the sum: the conv has none"))
        if not plan.branches:
            why = "; ".join(plan.notes) or "the scheme returned no branch"
            report.skipped.append(Skipped(site.name, f"scheme {chosen.name!r} adds no branch here: {why}"))
            continue
        block = build_block(site.conv, site.bn, plan, geometry, init, chosen.name)
        online_notes: Tuple[str, ...] = ()
        offline_reason: Optional[str] = None
        if online:
            converted, online_notes, offline_reason = make_online(block)
            if converted is not None:
                block = converted
        if site.bn is not None:  # first: the block holds the BN too
            _swap_module(work, site.bn, nn.Identity())
        _swap_module(work, site.conv, block)
        report.expanded.append(Expanded(site.name, site.bn_name, tuple(block.branches), plan.notes,
                                        online=online and offline_reason is None, online_notes=online_notes,
                                        offline_reason=offline_reason))
    report.params_after = _count_params(work)

    if reference is not None and report.expanded:
        out = _run_float64(work, args, report)
        if out is not None:
            cmp = compare(reference, out, PRESERVE_RTOL)
            report.verified, report.max_rel_error, report.verify_dtype = cmp.ok, cmp.max_rel, "float64"
            if not cmp.ok:
                raise FusionError(f"expand(init='preserve') changed the model's eval-mode function: {cmp.detail}; "
                                  "please report this model")
    work.fxfuse_expand_report = report  # type: ignore[assignment]
    if isinstance(work, fx.GraphModule):
        work.meta.setdefault("_user_preserved_attributes", {})["fxfuse_expand_report"] = report
    return work


# ------------------------------------------------------------------------------------------- helpers
def _inputs(example_input: Any) -> Tuple[Any, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a tuple/list of the model's positional inputs, got "
                    f"{type(example_input).__name__}")


def _selector(where: Where) -> Callable[[str, nn.Module], bool]:
    if where is None:
        return lambda name, conv: True
    if callable(where):
        return where
    patterns = [where] if isinstance(where, str) else list(where)
    return lambda name, conv: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a capture run (no BatchNorm statistics update), each module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _run_float64(model: nn.Module, args: Tuple[Any, ...], report: ExpandReport) -> Any:
    """``model`` (an eval-mode float64 copy) on ``args`` in float64; ``None`` (with a warning) if impossible."""
    try:
        work = _dtypes.float64_copy(model).eval()
        with torch.no_grad():
            return work(*_dtypes.cast_inputs(args, torch.float64))
    except Exception as exc:
        report.warnings.append(f"not verified: the model does not run in float64 ({type(exc).__name__}: {exc})")
        return None


def _conv_reason(mod: nn.Module) -> Optional[str]:
    """Why a conv module is not expanded (``None`` if it is eligible)."""
    if not isinstance(mod, nn.Conv2d):
        return f"{type(mod).__name__}: only nn.Conv2d is expanded"
    if type(mod).forward not in ops.STOCK_FORWARDS:
        return f"{type(mod).__name__} overrides nn.Conv2d.forward"
    if mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}: the branches would pad differently"
    if mod.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(mod.dilation, mod.kernel_size)):
        return "padding='same' with an even receptive field pads asymmetrically"
    return None


def _is_stock_bn(mod: nn.Module, channels: int) -> bool:
    return (isinstance(mod, nn.BatchNorm2d) and type(mod).forward in ops.STOCK_FORWARDS
            and mod.num_features == channels and mod.track_running_stats)


def _is_zero_pad(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in ops.PAD_FUNCS
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), ops.PAD_MODULES)


def _find_sites(work: nn.Module, args: Tuple[Any, ...], report: ExpandReport) -> List[_Site]:
    try:
        gm = trace(work)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:160]
        report.capture = f"module walk (the model does not trace: {type(exc).__name__}: {first})"
        return _walk_sites(work, args, report)
    return _traced_sites(work, gm, report)


def _traced_sites(work: nn.Module, gm: fx.GraphModule, report: ExpandReport) -> List[_Site]:
    modules = dict(work.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    sites: List[_Site] = []
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops.CONV_FUNCS:
            report.skipped.append(Skipped(node.name, "functional convolution (F.conv on a tensor): no module to "
                                                     "swap"))
            continue
        if node.op != "call_module" or str(node.target) not in modules:
            continue
        name, mod = str(node.target), modules[str(node.target)]
        if not isinstance(mod, nn.modules.conv._ConvNd) or name in seen:
            continue
        seen.add(name)
        reason = _conv_reason(mod)
        if reason is None and calls[name] > 1:
            reason = f"called at {calls[name]} places (a shared module)"
        if reason is None and (len(node.args) != 1 or node.kwargs):
            reason = "called with more than one argument"
        if reason is not None:
            report.skipped.append(Skipped(name, reason))
            continue
        assert isinstance(mod, nn.Conv2d)  # _conv_reason: only nn.Conv2d is expanded
        users = ops.real_users(node)
        if any(_is_zero_pad(u, modules) for u in users):
            report.skipped.append(Skipped(name, "its output is zero-padded next (DBB's BN-and-pad): the bias an "
                                                "expanded block gains would change the borders, so it could not "
                                                "collapse again"))
            continue
        site = _Site(name, mod)
        if len(users) == 1 and users[0].op == "call_module" and users[0].args == (node,) and not users[0].kwargs:
            bn_name = str(users[0].target)
            bn = modules.get(bn_name)
            if bn is not None and _is_stock_bn(bn, mod.out_channels) and calls[bn_name] == 1:
                site.bn_name, site.bn = bn_name, bn
        sites.append(site)
    return sites


def _walk_sites(work: nn.Module, args: Tuple[Any, ...], report: ExpandReport) -> List[_Site]:
    with _eval_mode(work):
        calls = capture_calls(work, args)
    parents: Dict[int, Tuple[nn.Module, str]] = {}
    for mod in work.modules():
        for key, child in mod.named_children():
            parents.setdefault(id(child), (mod, key))
    sites: List[_Site] = []
    for name, mod in work.named_modules():
        if not isinstance(mod, nn.modules.conv._ConvNd):
            continue
        reason = _conv_reason(mod)
        if reason is None and id(mod) not in calls:
            reason = "not run on the example input"
        elif reason is None and len(calls[id(mod)]) > 1:
            reason = "called more than once (a shared module)"
        if reason is not None:
            report.skipped.append(Skipped(name, reason))
            continue
        assert isinstance(mod, nn.Conv2d)  # _conv_reason: only nn.Conv2d is expanded
        site = _Site(name, mod)
        parent, key = parents.get(id(mod), (None, ""))
        if type(parent) is nn.Sequential:
            keys = list(parent._modules)
            nxt = keys.index(key) + 1
            if nxt < len(keys):
                after = parent._modules[keys[nxt]]
                if isinstance(after, nn.BatchNorm2d) and _is_stock_bn(after, mod.out_channels) \
                        and len(calls.get(id(after), [])) == 1:
                    site.bn_name, site.bn = f"{name.rpartition('.')[0]}.{keys[nxt]}".lstrip("."), after
        sites.append(site)
    return sites
