"""The op table: every graph spelling fxfuse knows, and the facts about ops that rules and tools rely on.

This is the only module that lists targets (``F.conv2d``, ``nn.BatchNorm2d``, ``operator.add``, ``"add_"`` …).
Readers (:mod:`fxfuse.ir.read`), surgery (:mod:`fxfuse.rewrite.context`), the report's op counts and the tools
ask it; nothing else spells a target.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

# ----------------------------------------------------------------------------------- linear layers
CONV_FUNCS: Dict[Callable[..., Any], int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
CONV_T_FUNCS: Dict[Callable[..., Any], int] = {F.conv_transpose1d: 1, F.conv_transpose2d: 2,
                                               F.conv_transpose3d: 3}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_FUNCS = (F.linear,)
BATCH_NORM_FUNCS = (F.batch_norm,)
AVG_POOL_FUNCS: Dict[Callable[..., Any], int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
AVG_POOL_MODULES: Dict[type, int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
PAD_FUNCS = (F.pad, torch._C._nn.pad)
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

# ------------------------------------------------------------------------------ no-ops in eval mode
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
DROPOUT_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)

# Modules whose behaviour is exactly their torch.nn class's: a subclass overriding forward is opaque.
STOCK_FORWARDS = {cls.forward for cls in (
    *CONV_MODULES, *CONV_T_MODULES, nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.Linear, nn.Identity,
    *DROPOUT_MODULES, *AVG_POOL_MODULES, *PAD_MODULES)}

# -------------------------------------------------------------------------------------- arithmetic
# target -> (operation, in_place)
ARITH_FUNCS: Dict[Callable[..., Any], Tuple[str, bool]] = {
    operator.add: ("add", False), torch.add: ("add", False), operator.iadd: ("add", True),
    operator.sub: ("sub", False), torch.sub: ("sub", False), operator.isub: ("sub", True),
    operator.mul: ("mul", False), torch.mul: ("mul", False), operator.imul: ("mul", True),
    operator.truediv: ("div", False), torch.div: ("div", False), torch.true_divide: ("div", False),
    operator.itruediv: ("div", True)}
ARITH_METHODS: Dict[str, Tuple[str, bool]] = {
    "add": ("add", False), "__add__": ("add", False), "add_": ("add", True), "__iadd__": ("add", True),
    "sub": ("sub", False), "__sub__": ("sub", False), "sub_": ("sub", True), "__isub__": ("sub", True),
    "mul": ("mul", False), "__mul__": ("mul", False), "mul_": ("mul", True),
    "div": ("div", False), "__truediv__": ("div", False), "div_": ("div", True)}


def arithmetic(node: fx.Node) -> Optional[Tuple[str, bool]]:
    """``(op, in_place)`` with ``op`` in ``add / sub / mul / div`` if ``node`` is binary arithmetic, else None."""
    if node.op == "call_function" and node.target in ARITH_FUNCS:
        return ARITH_FUNCS[node.target]  # type: ignore[index]
    if node.op == "call_method" and node.target in ARITH_METHODS:
        return ARITH_METHODS[str(node.target)]
    return None


# ------------------------------------------------------------------------------ views and metadata
VIEW_METHODS = {"flatten", "reshape", "view", "reshape_as", "view_as"}
META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
AS_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}
META_METHODS = {"size", "dim", "ndimension", "numel", "type", "get_device"}


def is_view(node: fx.Node) -> bool:
    """A reshaping method call (``flatten`` / ``reshape`` / ``view`` / ``*_as``)."""
    return node.op == "call_method" and node.target in VIEW_METHODS


def is_metadata_user(user: fx.Node, of: Optional[fx.Node] = None) -> bool:
    """Users that read only shape/dtype/device of ``of`` (``x.shape``, ``x.ndim``, ``x.size()``, and the template
    argument of ``t.reshape_as(x)`` / ``view_as`` / ``expand_as`` / ``type_as``): a fold that keeps the shape does
    not change what they see."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in META_ATTRS
    if user.op == "call_method":
        if user.target in META_METHODS:
            return True
        return (of is not None and user.target in AS_METHODS and len(user.args) == 2 and not user.kwargs
                and user.args[1] is of and user.args[0] is not of)
    return False


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than metadata reads."""
    return [u for u in node.users if not is_metadata_user(u, node)]


# ------------------------------------------------------------------------------------------ purity
_RANDOM = re.compile(r"rand|dropout|normal|bernoulli|uniform|multinomial|poisson|empty|exponential")
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
_PURE_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.Identity, nn.Dropout,
                 *PAD_MODULES, *AVG_POOL_MODULES)


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
        name = getattr(node.target, "__name__", str(node.target))
        return node.target not in _INPLACE_FUNCS and not name.endswith("_") and not _RANDOM.search(name) \
            and node.target is not torch._assert
    return False


# Ops known to return a new tensor (never a view or alias of an input, a graph input or a parameter).
_FRESH_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                torch.div, torch.cat, torch.relu, torch.sigmoid, *CONV_FUNCS, *BATCH_NORM_FUNCS, *LINEAR_FUNCS,
                *AVG_POOL_FUNCS}
_FRESH_METHODS = {"add", "sub", "mul", "div", "relu", "sigmoid", "clone"}
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.modules.pooling._AvgPoolNd)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid)


def returns_fresh_storage(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Is ``node`` known to return a new tensor? An in-place add on an alias also changes what the aliased
    tensor's other readers see, which a merged, out-of-place sum would not reproduce."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, _FRESH_MODULES) or (isinstance(mod, _ACTIVATION_MODULES)
                                                   and not getattr(mod, "inplace", False))
    if node.op == "call_function":
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
        if node.target in CONV_FUNCS or node.target in CONV_T_FUNCS:
            return "conv"
        if node.target in BATCH_NORM_FUNCS:
            return "batch_norm"
        if node.target in AVG_POOL_FUNCS:
            return "avg_pool"
        if node.target in LINEAR_FUNCS:
            return "linear"
        if node.target is torch._assert:
            return "assert"
    if is_metadata_user(node):
        return "metadata"
    arith = arithmetic(node)
    if arith is not None and arith[0] == "add":
        return "add"
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
