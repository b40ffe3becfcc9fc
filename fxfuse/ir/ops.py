"""The op table: every graph spelling fxfuse knows, and the facts about ops that rules and tools rely on.

This is the only module that lists targets (``F.conv2d``, ``nn.BatchNorm2d``, ``operator.add``, ``"add_"`` …).
Readers (:mod:`fxfuse.ir.read`), surgery (:mod:`fxfuse.rewrite.context`), the report's op counts and the tools
ask it; nothing else spells a target.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

# ----------------------------------------------------------------------------------- linear layers
CONV_FUNCS: Dict[Callable[..., Any], int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
CONV_T_FUNCS: Dict[Callable[..., Any], int] = {F.conv_transpose1d: 1, F.conv_transpose2d: 2,
                                               F.conv_transpose3d: 3}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # indexed by spatial rank - 1
CONV_T_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_FUNCS: Tuple[Callable[..., Any], ...] = (F.linear,)
BATCH_NORM_FUNCS = (F.batch_norm,)
AVG_POOL_FUNCS: Dict[Callable[..., Any], int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
AVG_POOL_MODULES: Dict[type, int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
PAD_FUNCS: Tuple[Callable[..., Any], ...] = (F.pad, torch._C._nn.pad)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

# ------------------------------------------------------------- ATen spellings (torch.export graphs)
# ATen ops whose positional arguments match the functional spelling above join those tables; the others have
# their own entries. Graphs come from ``torch.export`` functionalized (fxfuse.capture.export), so writes into
# views are ``slice_scatter`` nodes and every data dependency is an edge.
aten = torch.ops.aten
OpOverload = torch._ops.OpOverload  # the type of ATen call_function targets (no public alias)
CONV_FUNCS.update({aten.conv1d.default: 1, aten.conv1d.padding: 1, aten.conv2d.default: 2,
                   aten.conv2d.padding: 2, aten.conv3d.default: 3, aten.conv3d.padding: 3})
CONV_T_FUNCS.update({aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2,
                     aten.conv_transpose3d.input: 3})
# (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, …)
CONVOLUTION_FUNCS = (aten.convolution.default, aten._convolution.default)
LINEAR_FUNCS = (*LINEAR_FUNCS, aten.linear.default)
ADDMM_FUNCS = (aten.addmm.default,)  # addmm(bias, x, w_t, beta=1, alpha=1) = beta·bias + alpha·x @ w_t
MM_FUNCS = (aten.mm.default,)  # mm(x, w_t) = x @ w_t: a bias-free linear layer once decomposed to core ATen
# (input, weight, bias, running_mean, running_var, …): target -> (index of `training` or None, index of `eps`)
BATCH_NORM_ATEN: Dict[Any, Tuple[Optional[int], int]] = {
    aten.batch_norm.default: (5, 7), aten.native_batch_norm.default: (5, 7),
    aten._native_batch_norm_legit.default: (5, 7), aten._native_batch_norm_legit_functional.default: (5, 7),
    aten._native_batch_norm_legit_no_training.default: (None, 6)}
# BatchNorm by batch statistics only (no running statistics): (input, weight, bias, training, momentum, eps).
BATCH_NORM_NO_STATS = (aten._native_batch_norm_legit.no_stats,)
# The BN ops above that return a tuple: their output is ``operator.getitem(bn, 0)``.
BATCH_NORM_TUPLE = (frozenset(BATCH_NORM_ATEN) | frozenset(BATCH_NORM_NO_STATS)) - {aten.batch_norm.default}
AVG_POOL_FUNCS.update({aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3})
PAD_FUNCS = (*PAD_FUNCS, aten.pad.default)
CONSTANT_PAD_FUNCS = (aten.constant_pad_nd.default,)  # (input, pad, value=0)
# Pads whose every output element is a copy of an input element of the same sample and channel, so they commute
# with any per-channel map: reflect / replicate / circular, on spatial axes only. Modules and the ATen ops take
# F.pad's list (last axis first) as ``padding`` / argument 1; ``F.pad`` / ``aten.pad`` say it with ``mode``.
COPY_PAD_MODES = ("reflect", "replicate", "circular")
COPY_PAD_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
COPY_PAD_FUNCS = (aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default,
                  aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default,
                  aten._pad_circular.default)  # (input, pad)
CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate, aten.cat.default)  # (tensors, dim=0)
SLICE_FUNCS = (aten.slice.Tensor,)  # (input, dim=0, start=None, end=None, step=1): a view
SLICE_SCATTER_FUNCS = (aten.slice_scatter.default,)  # (input, src, dim=0, start=None, end=None, step=1)
COPY_FUNCS = (aten.copy.default,)  # copy(dst, src): src broadcast to dst's shape (functional ``dst[...] = src``)
FILL_FUNCS = (aten.fill.Scalar, aten.fill.Tensor)  # fill(dst, value): value broadcast to dst's shape
EXPAND_FUNCS = (aten.expand.default, aten.expand_copy.default)  # (input, size): a broadcast

# ``ExportedProgram.module()`` checks the input shapes it was specialized to in a ``call_module`` of this name (no
# users, no output): a guard on the graph inputs, not an op of the model.
EXPORT_GUARD_MODULES = ("_guards_fn",)


def is_input_guard(node: fx.Node) -> bool:
    """The input-shape guard ``torch.export`` puts in an unlifted module (``call_module _guards_fn``)."""
    return (node.op == "call_module" and node.target in EXPORT_GUARD_MODULES) or (
        node.op == "call_function" and getattr(node.target, INPUT_GUARD_MARK, False))


# Set on the guard function :func:`fxfuse.ir.graphs.direct_input_guard` calls directly.
INPUT_GUARD_MARK = "_fxfuse_input_guard"


# ------------------------------------------------------------------------------ no-ops in eval mode
IDENTITY_MODULES = (nn.Identity,)
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                 aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                 aten.feature_alpha_dropout.default)  # the ATen ones: (input, p, train)

# Modules whose behaviour is exactly their torch.nn class's: a subclass overriding forward is opaque.
STOCK_FORWARDS = {cls.forward for cls in (  # type: ignore[attr-defined]
    *CONV_MODULES, *CONV_T_MODULES, nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.Linear, nn.Identity,
    *DROPOUT_MODULES, *AVG_POOL_MODULES, *PAD_MODULES, *COPY_PAD_MODULES)}

# -------------------------------------------------------------------------------------- arithmetic
# target -> (operation, in_place)
ARITH_FUNCS: Dict[Callable[..., Any], Tuple[str, bool]] = {
    operator.add: ("add", False), torch.add: ("add", False), operator.iadd: ("add", True),
    operator.sub: ("sub", False), torch.sub: ("sub", False), operator.isub: ("sub", True),
    operator.mul: ("mul", False), torch.mul: ("mul", False), operator.imul: ("mul", True),
    operator.truediv: ("div", False), torch.div: ("div", False), torch.true_divide: ("div", False),
    operator.itruediv: ("div", True)}
ARITH_FUNCS.update({getattr(getattr(aten, name + suffix), overload): (name, suffix == "_")
                    for name in ("add", "sub", "mul", "div") for suffix in ("", "_")
                    for overload in ("Tensor", "Scalar")})
ARITH_METHODS: Dict[str, Tuple[str, bool]] = {
    "add": ("add", False), "__add__": ("add", False), "add_": ("add", True), "__iadd__": ("add", True),
    "sub": ("sub", False), "__sub__": ("sub", False), "sub_": ("sub", True), "__isub__": ("sub", True),
    "mul": ("mul", False), "__mul__": ("mul", False), "mul_": ("mul", True),
    "div": ("div", False), "__truediv__": ("div", False), "div_": ("div", True)}


def weighted_add(a: fx.Node, b: fx.Node, coef: float) -> Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]:
    """``(target, args, kwargs)`` of a call computing ``a + coef·b`` out of place (``a + b``, ``a - b``, else
    ``torch.add(a, b, alpha=coef)``): what the rewrite context inserts for a merged sum."""
    if coef == 1.0:
        return operator.add, (a, b), {}
    if coef == -1.0:
        return operator.sub, (a, b), {}
    return torch.add, (a, b), {"alpha": coef}


# rsub(input, other, alpha=1) = other − alpha·input: ATen's spelling of ``c - t`` for a Python number ``c``.
RSUB_FUNCS: Tuple[Callable[..., Any], ...] = (torch.rsub, aten.rsub.Scalar, aten.rsub.Tensor)


def arithmetic(node: fx.Node) -> Optional[Tuple[str, bool]]:
    """``(op, in_place)`` with ``op`` in ``add / sub / mul / div`` if ``node`` is binary arithmetic whose
    positional arguments are ``(a, b)`` in that order, else None (``rsub``: see :func:`binary`)."""
    if node.op == "call_function" and node.target in ARITH_FUNCS:
        return ARITH_FUNCS[node.target]
    if node.op == "call_method" and node.target in ARITH_METHODS:
        return ARITH_METHODS[str(node.target)]
    return None


@dataclass(frozen=True)
class Binary:
    """``node = a op alpha·b`` (``alpha`` is 1 except for ``add`` / ``sub`` given one); ``in_place``: ``a`` is
    written."""

    op: str
    in_place: bool
    a: Any
    b: Any
    alpha: Any


def binary(node: fx.Node) -> Optional[Binary]:
    """Binary arithmetic in any spelling with its operands in math order: ``a + b``, ``torch.add(a, b,
    alpha=k)``, ``a.sub_(b)``, ``aten.mul.Scalar(a, 2)`` … and ``rsub(input, other, alpha)`` as ``other −
    alpha·input``. None for anything else, or with keyword arguments other than ``alpha`` (``rounding_mode``)."""
    parsed = arithmetic(node)
    if parsed is not None:
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None
        return Binary(parsed[0], parsed[1], node.args[0], node.args[1], node.kwargs.get("alpha", 1))
    if node.op == "call_function" and node.target in RSUB_FUNCS:
        if len(node.args) not in (2, 3) or set(node.kwargs) - {"alpha"} or (len(node.args) == 3 and node.kwargs):
            return None
        alpha = node.args[2] if len(node.args) == 3 else node.kwargs.get("alpha", 1)
        return Binary("sub", False, node.args[1], node.args[0], alpha)
    return None


# ------------------------------------------------------------------------------ views and metadata
SPLIT = torch.split  # split(input, sizes, dim): what the rewrite context inserts to unstack channels
GETITEM = operator.getitem  # getitem(tuple, i): one output of a tuple-returning node
RESHAPE = torch.reshape  # reshape(input, sizes): what the rewrite context inserts to re-view rows
VIEW_METHODS = {"flatten", "reshape", "view", "reshape_as", "view_as"}
PERMUTE_METHODS = {"permute"}
PERMUTE_FUNCS = (torch.permute, aten.permute.default)
META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
AS_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}
META_METHODS = {"size", "dim", "ndimension", "numel", "type", "get_device"}


VIEW_FUNCS = (torch.reshape, torch.flatten, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.flatten.using_ints, aten.view_copy.default, aten.reshape_as.default,
              aten.view_as.default)  # (input, shape / template)
# reshapes written with their target sizes (``view_sizes`` reads them): method names and function spellings
SIZED_VIEW_METHODS = {"reshape", "view"}
SIZED_VIEW_FUNCS = (torch.reshape, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                    aten.view_copy.default)
AS_FUNCS = (aten.reshape_as.default, aten.view_as.default, aten.expand_as.default, aten.type_as.default)
# ATen calls that read only the shape/stride/dtype of their tensor argument.
META_FUNCS = (aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
              aten.sym_stride.default, aten.sym_storage_offset.default, aten._assert_tensor_metadata.default)
ASSERT_FUNCS = (torch._assert, aten._assert_scalar.default, aten._assert_async.msg, aten._assert_async.default,
                aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default)
# ``torch._assert(condition, message)``: the model-zoo input check the ``shape_assert`` rule may remove.
TORCH_ASSERT_FUNCS = (torch._assert,)
# Python comparisons and logic on shape facts (``x.ndim == 4``, ``C in sizes``, ``a and b``): target -> evaluator.
COMPARE_FUNCS: Dict[Callable[..., Any], Callable[[Any, Any], Any]] = {
    operator.eq: operator.eq, operator.ne: operator.ne, operator.lt: operator.lt, operator.le: operator.le,
    operator.gt: operator.gt, operator.ge: operator.ge, operator.and_: operator.and_, operator.or_: operator.or_,
    operator.contains: operator.contains}
NOT_FUNCS = (operator.not_,)
RANK_METHODS = ("dim", "ndimension")  # x.dim(): the rank


def is_attr_read(node: fx.Node, name: str) -> bool:
    """``getattr(x, name)`` (``x.shape``, ``x.ndim`` in a symbolic graph)."""
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
        and isinstance(node.args[1], str) and node.args[1] == name


def is_getitem(node: fx.Node, index: Any = None) -> bool:
    """``x[i]`` (``operator.getitem``), with ``i == index`` unless ``index`` is None."""
    return node.op == "call_function" and node.target is GETITEM and len(node.args) == 2 \
        and (index is None or node.args[1] == index)


def is_size_call(node: fx.Node, *dims: int) -> bool:
    """``x.size(*dims)`` (``x.size()`` for no ``dims``)."""
    return node.op == "call_method" and node.target == "size" and tuple(node.args[1:]) == dims and not node.kwargs


# ``torch.export`` records, at each ``.to()`` / ``.double()`` / ``.float()``, the dtype and device its input had
# while tracing: those of fxfuse's float64 working copy, which the returned model (cast back) no longer has.
TRACE_METADATA_CHECKS = (aten._assert_tensor_metadata.default,)


def is_view(node: fx.Node) -> bool:
    """A reshaping method call (``flatten`` / ``reshape`` / ``view`` / ``*_as``) or its ATen spelling."""
    if node.op == "call_function":
        return node.target in VIEW_FUNCS
    return node.op == "call_method" and node.target in VIEW_METHODS


COPY_VALUE_FUNCS = (torch.clone, aten.clone.default, aten.contiguous.default)
COPY_VALUE_METHODS = {"clone", "contiguous"}


def is_value_copy(node: fx.Node) -> bool:
    """``x.clone()`` / ``x.contiguous()`` (any memory format) or its ATen spelling: the same values in the same
    logical order (``torch.export`` spells ``permuted.reshape(…)`` as ``clone`` + ``_unsafe_view``)."""
    if node.op == "call_function":
        return node.target in COPY_VALUE_FUNCS
    return node.op == "call_method" and node.target in COPY_VALUE_METHODS


def is_metadata_user(user: fx.Node, of: Optional[fx.Node] = None) -> bool:
    """Users that read only shape/dtype/device of ``of`` (``x.shape``, ``x.ndim``, ``x.size()``, and the template
    argument of ``t.reshape_as(x)`` / ``view_as`` / ``expand_as`` / ``type_as``): a fold that keeps the shape does
    not change what they see."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in META_ATTRS
    if user.op == "call_function" and user.target in META_FUNCS:
        return True
    if user.op == "call_function" and user.target in AS_FUNCS:  # the template argument of reshape_as …
        return of is not None and len(user.args) == 2 and user.args[1] is of and user.args[0] is not of
    if user.op == "call_method":
        if user.target in META_METHODS:
            return True
        return (of is not None and user.target in AS_METHODS and len(user.args) == 2 and not user.kwargs
                and user.args[1] is of and user.args[0] is not of)
    return False


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than metadata reads. A tuple-returning ATen BatchNorm whose only used output is
    ``[0]`` is seen through: its ``getitem(bn, 0)`` nodes are the users (they are the BN's output)."""
    users: list[fx.Node] = []
    for u in node.users:
        if is_metadata_user(u, node):
            continue
        outputs = tuple_outputs(u)
        users.extend(outputs if outputs is not None and u.args and u.args[0] is node else [u])
    return users


def tuple_outputs(node: fx.Node) -> Optional[list[fx.Node]]:
    """For a tuple-returning ATen BatchNorm whose users are all ``getitem(node, 0)``: those users; else None."""
    if node.op != "call_function" or node.target not in BATCH_NORM_TUPLE:
        return None
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
        return None
    return users


def tuple_output_of(node: fx.Node) -> bool:
    """Whether ``node`` is ``getitem(bn, 0)`` of a tuple-returning ATen BatchNorm (its output)."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    op, index = node.args
    return isinstance(op, fx.Node) and op.op == "call_function" and op.target in BATCH_NORM_TUPLE \
        and isinstance(index, int) and index == 0


def aten_is_pure(target: Any) -> bool:
    """An ATen op that writes nothing, draws no random numbers and asserts nothing."""
    return (not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
            and target not in ASSERT_FUNCS and not _RANDOM.search(target.__name__.split(".")[0]))


# ------------------------------------------------------------------------------------------ purity
_RANDOM = re.compile(r"rand|dropout|normal|bernoulli|uniform|multinomial|poisson|empty|exponential")
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
_PURE_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.Identity,
                 *DROPOUT_MODULES, *PAD_MODULES, *COPY_PAD_MODULES, *AVG_POOL_MODULES)


def is_pure(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """May be erased once unused (and evaluated once when its inputs are constant): no in-place or random op,
    no assertion, no arbitrary module."""
    if node.op == "get_attr":
        return True
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _PURE_MODULES)
    if node.op == "call_method":
        return not str(node.target).endswith("_") and not _RANDOM.search(str(node.target))
    if node.op == "call_function":
        if isinstance(node.target, OpOverload):
            return aten_is_pure(node.target)
        name = getattr(node.target, "__name__", str(node.target))
        return node.target not in _INPLACE_FUNCS and not name.endswith("_") and not _RANDOM.search(name) \
            and node.target is not torch._assert
    return False


def writes_input(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """May ``node`` write into one of its inputs (``add_``, ``+=``, ``x[i] = v``, ``ReLU(inplace=True)``,
    ``F.relu(x, inplace=True)``)? Unknown modules count as writers."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return mod is None or bool(getattr(mod, "inplace", False)) or not isinstance(mod, (*_PURE_MODULES,
                                                                                          *_ACTIVATION_MODULES))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("__")
    if node.op == "call_function":
        if isinstance(node.target, OpOverload):
            return bool(node.target._schema.is_mutable)
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCS or name.endswith("_") or bool(node.kwargs.get("inplace", False))
    return False


# Ops known to return a new tensor (never a view or alias of an input, a graph input or a parameter).
_FRESH_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                torch.div, torch.cat, torch.relu, torch.sigmoid, *CONV_FUNCS, *BATCH_NORM_FUNCS, *LINEAR_FUNCS,
                *AVG_POOL_FUNCS}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "clone"}
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.modules.pooling._AvgPoolNd)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid)


_ALIAS_METHODS = VIEW_METHODS | {"permute", "t", "transpose", "detach", "expand", "expand_as", "contiguous",
                                 "squeeze", "unsqueeze"}


def is_alias(node: fx.Node) -> bool:
    """Returns (a view of) its first input without computing anything: ATen view ops (schema returns an alias),
    ``view`` / ``reshape`` / ``permute`` / ``t`` / ``detach`` / ``expand`` … methods."""
    if node.op == "call_function" and isinstance(node.target, OpOverload):
        return any(r.alias_info is not None for r in node.target._schema.returns)
    if node.op == "call_function":
        return node.target in PERMUTE_FUNCS or node.target in (torch.t, torch.transpose, torch.squeeze,
                                                               torch.unsqueeze, torch.reshape, torch.flatten)
    return node.op == "call_method" and node.target in _ALIAS_METHODS


def returns_fresh_storage(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Is ``node`` known to return a new tensor? An in-place add on an alias also changes what the aliased
    tensor's other readers see, which a merged, out-of-place sum would not reproduce."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, _FRESH_MODULES) or (isinstance(mod, _ACTIVATION_MODULES)
                                                   and not getattr(mod, "inplace", False))
    if node.op == "call_function":
        if isinstance(node.target, OpOverload):  # functional ATen ops that return no alias
            return aten_is_pure(node.target) and all(r.alias_info is None for r in node.target._schema.returns)
        return node.target in _FRESH_FUNCS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in _FRESH_METHODS


# ----------------------------------------------------------------------------------- op classes
OP_KINDS = ("conv", "batch_norm", "avg_pool", "linear", "add", "assert", "metadata")


def op_kind(node: fx.Node, modules: Mapping[str, nn.Module]) -> Optional[str]:
    """Coarse op class of a node (one of :data:`OP_KINDS`) or ``None``: what :class:`fxfuse.GraphStats` and the
    tools count."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return None if mod is None else module_kind(mod)
    if node.op == "call_function":
        kind = function_kind(node.target)
        if kind is not None:
            return kind
    if is_metadata_user(node):
        return "metadata"
    arith = arithmetic(node)
    if arith is not None and arith[0] == "add":
        return "add"
    return None


def function_kind(target: Any) -> Optional[str]:
    """Op class of a function: an fx ``call_function`` target, or the ``func`` a ``TorchFunctionMode`` sees when
    a model runs (conv, batch_norm, avg_pool, linear, assert), else ``None``."""
    if target in CONV_FUNCS or target in CONV_T_FUNCS or target in CONVOLUTION_FUNCS:
        return "conv"
    if target in BATCH_NORM_FUNCS or target in BATCH_NORM_ATEN or target in BATCH_NORM_NO_STATS:
        return "batch_norm"
    if target in AVG_POOL_FUNCS:
        return "avg_pool"
    if target in LINEAR_FUNCS or target in ADDMM_FUNCS or target in MM_FUNCS:
        return "linear"
    if target in ASSERT_FUNCS:
        return "assert"
    return None


def module_kind(mod: nn.Module) -> Optional[str]:
    """Op class of a module instance (for models that are not a GraphModule)."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return "batch_norm"
    if isinstance(mod, tuple(AVG_POOL_MODULES)):
        return "avg_pool"
    if isinstance(mod, nn.Linear):
        return "linear"
    return None


# ------------------------------------------------------------------------------ eager spellings of ATen ops
# An ATen overload called from generated code costs ~2x the Python of the public binding that dispatches to it
# (``torch.ops.aten.relu.default`` ~1.7 µs vs ``torch.relu`` ~0.9 µs). The returned graph of an exported model
# calls these instead: each binding takes the overload's arguments positionally in the same order and resolves to
# that overload for them (the returned model is run and compared afterwards: fxfuse.artifact).
EAGER_SPELLING: Dict[Any, Callable[..., Any]] = {
    aten.conv1d.default: torch.conv1d, aten.conv2d.default: torch.conv2d, aten.conv3d.default: torch.conv3d,
    aten.linear.default: torch._C._nn.linear,
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu_,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.silu.default: torch._C._nn.silu, aten.silu_.default: torch._C._nn.silu_,
    aten.hardswish.default: torch._C._nn.hardswish, aten.hardswish_.default: torch._C._nn.hardswish_,
    aten.hardsigmoid.default: torch._C._nn.hardsigmoid,
    aten.hardtanh.default: torch._C._nn.hardtanh, aten.hardtanh_.default: torch._C._nn.hardtanh_,
    aten.gelu.default: torch._C._nn.gelu,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul, aten.div.Tensor: torch.div,
    aten.add_.Tensor: torch.Tensor.add_, aten.mul_.Tensor: torch.Tensor.mul_,
    aten.cat.default: torch.cat, aten.flatten.using_ints: torch.flatten, aten.mean.dim: torch.mean,
    aten.adaptive_avg_pool2d.default: torch._C._nn.adaptive_avg_pool2d,
    aten.avg_pool2d.default: torch._C._nn.avg_pool2d, aten.max_pool2d.default: torch.max_pool2d,
    aten.permute.default: torch.permute, aten.reshape.default: torch.reshape, aten.view.default: torch.Tensor.view,
    aten.softmax.int: torch.softmax, aten.matmul.default: torch.matmul, aten.clone.default: torch.clone,
    aten.contiguous.default: torch.Tensor.contiguous, aten.transpose.int: torch.transpose,
    aten.pad.default: torch._C._nn.pad, aten.chunk.default: torch.chunk, aten.split.Tensor: torch.split,
}


def functional_twin(target: Any) -> Optional[Any]:
    """The out-of-place ATen overload of an in-place one that writes only its first argument and returns it
    (``aten.relu_.default`` → ``aten.relu.default``, ``aten.add_.Tensor`` → ``aten.add.Tensor``): same argument
    names, nothing written. ``None`` for anything else (``out=`` variants, ops writing several arguments)."""
    if not isinstance(target, OpOverload):
        return None
    schema = target._schema
    args = schema.arguments
    if not args or args[0].alias_info is None or not args[0].alias_info.is_write:
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in args[1:]) or len(schema.returns) != 1:
        return None
    namespace, _, name = schema.name.partition("::")
    if namespace != "aten" or not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    twin = getattr(packet, target._overloadname, None) if packet is not None else None
    if not isinstance(twin, OpOverload) or twin._schema.is_mutable:
        return None
    if [a.name for a in twin._schema.arguments] != [a.name for a in args] or len(twin._schema.returns) != 1 \
            or twin._schema.returns[0].alias_info is not None:
        return None
    return twin
