"""Readers: fx nodes seen as linear ops. The one place that knows how a conv, BN, pool, pad or sum is spelled
(through the op table, :mod:`fxfuse.ir.ops`).

A *reader* looks at one node and, if it computes a linear-affine function of a single tensor input with
constant parameters, returns that input plus a :class:`ConvSpec` / :class:`ChannelAffine`; otherwise it returns
``None`` or a :class:`Refusal` (the node is the right kind of op, but folding it would be wrong, with why).
Both graph spellings are read: ``call_module`` (``nn.Conv2d``, ``nn.BatchNorm2d``, …) and functional
(``F.conv2d`` / ``F.batch_norm`` with constant, ``get_attr``-rooted parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from . import folds as K
from . import ops
from .algebra import ChannelAffine, ConvSpec, as_tuple, float64


@dataclass(frozen=True)
class Refusal:
    """The node is a candidate, but a fold through it would not be exact."""

    reason: str


@dataclass(frozen=True)
class ConvRead:
    """``node = spec(input)``; ``kind`` is ``conv``, ``conv_transpose``, ``avg_pool`` or ``affine``.
    ``like`` is the original weight (dtype/device/layout/requires_grad for the rewritten module)."""

    input: fx.Node
    spec: ConvSpec
    kind: str
    like: Optional[Tensor]


@dataclass(frozen=True)
class AffineRead:
    """``node = affine(input)`` along ``axis`` (non-negative) of an ``ndim``-dim tensor."""

    input: fx.Node
    affine: ChannelAffine
    axis: int
    ndim: int
    kind: str


@dataclass(frozen=True)
class LinearRead:
    """``node = F.linear(input, weight, bias)`` (weight ``[out, in]``)."""

    input: fx.Node
    weight: Tensor
    bias: Tensor
    like: Tensor


@dataclass(frozen=True)
class SumRead:
    """``node = Σ coef·term`` over two non-constant tensors (``a + b``, ``a - b``, ``torch.add(a, b, alpha=k)``,
    ``a.add_(b)`` …); ``in_place`` when the first operand is written."""

    terms: Tuple[Tuple[float, fx.Node], ...]
    in_place: bool


# ----------------------------------------------------------------------------------- arguments
def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape_of(node: Any) -> Optional[torch.Size]:
    """The propagated output shape of ``node`` (``None`` if unknown or not a tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


# ------------------------------------------------------------------------------------ constants
class Constants:
    """Evaluates sub-graphs that depend only on ``get_attr`` nodes and literals (e.g. a frozen BN's
    ``w * (rv + eps).rsqrt()``), memoized. Random and in-place ops are never evaluated."""

    _MISSING = object()

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.memo: Dict[fx.Node, Any] = {}

    def value(self, a: Any) -> Any:
        """The constant value of an argument (node or literal), or ``Constants._MISSING``."""
        if not isinstance(a, fx.Node):
            return a
        if a in self.memo:
            return self.memo[a]
        result = self._MISSING
        if a.op == "get_attr":
            result = _fetch_attr(self.gm, a.target)
        elif a.op in ("call_function", "call_method") and ops.is_pure(a, {}) and a.all_input_nodes:
            args = fx.node.map_arg(a.args, self.value)
            kwargs = fx.node.map_arg(a.kwargs, self.value)
            flat = list(args) + list(kwargs.values())
            if not any(x is self._MISSING for x in _flatten(flat)):
                try:
                    with torch.no_grad():
                        if a.op == "call_function":
                            result = a.target(*args, **kwargs)
                        else:
                            result = getattr(args[0], a.target)(*args[1:], **kwargs)
                except Exception:  # not evaluable as a constant: treat as non-constant
                    result = self._MISSING
        self.memo[a] = result
        return result

    def tensor(self, a: Any) -> Optional[Tensor]:
        """The constant as a tensor (numbers become 0-d tensors), or ``None`` if not constant."""
        v = self.value(a)
        if isinstance(v, Tensor):
            return v.detach()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return torch.tensor(float(v), dtype=torch.float64)
        return None


def _flatten(xs: Sequence[Any]) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flatten(x))
        elif isinstance(x, dict):
            out.extend(_flatten(list(x.values())))
        else:
            out.append(x)
    return out


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------------------- readers
class Reader:
    """Reads nodes of one GraphModule as linear ops (see module docstring)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.constants = Constants(gm)
        first = next(iter(gm.parameters()), None)
        if first is None:
            first = next(iter(gm.buffers()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        """The called module, if it computes exactly what its ``torch.nn`` class does: a subclass that overrides
        ``forward`` or a module with forward hooks is opaque (``None``)."""
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if mod is None or mod._forward_hooks or mod._forward_pre_hooks:
            return None
        if type(mod).forward not in ops.STOCK_FORWARDS:
            return None
        return mod

    # -- convolutions ------------------------------------------------------------------------
    def conv(self, node: fx.Node) -> Union[ConvRead, Refusal, None]:
        """``nn.ConvNd`` / ``nn.ConvTransposeNd`` / ``F.convNd`` / ``F.conv_transposeNd`` with constant weights."""
        mod = self.module(node)
        if isinstance(mod, nn.modules.conv._ConvNd):
            if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
                return Refusal("lazy conv not materialized")
            if not node.args or not isinstance(node.args[0], fx.Node) or len(node.args) + len(node.kwargs) != 1:
                return None
            transposed = isinstance(mod, ops.CONV_T_MODULES)
            if not transposed and not isinstance(mod, ops.CONV_MODULES):
                return None
            ndim = mod.weight.dim() - 2
            padding = self._padding(mod.padding, mod.kernel_size, mod.dilation, ndim)
            if isinstance(padding, Refusal):
                return padding
            bias = mod.bias if mod.bias is not None else None
            return self._conv_read(node.args[0], mod.weight, bias, mod.stride, padding, mod.dilation, mod.groups,
                                   mod.padding_mode, transposed, getattr(mod, "output_padding", ()))
        if node.op != "call_function":
            return None
        if node.target in ops.CONV_FUNCS:
            ndim = ops.CONV_FUNCS[node.target]
            w = self.constants.tensor(arg(node, 1, "weight"))
            b_arg = arg(node, 2, "bias")
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if w is None or (b_arg is not None and b is None) or not isinstance(node.args[0], fx.Node):
                return Refusal("functional conv with non-constant weight") if w is None else None
            k = tuple(w.shape[2:])
            dil = as_tuple(arg(node, 5, "dilation", 1), ndim)
            padding = self._padding(arg(node, 4, "padding", 0), k, dil, ndim)
            if isinstance(padding, Refusal):
                return padding
            return self._conv_read(node.args[0], w, b, arg(node, 3, "stride", 1), padding, dil,
                                   arg(node, 6, "groups", 1), "zeros", False, ())
        if node.target in ops.CONV_T_FUNCS:
            ndim = ops.CONV_T_FUNCS[node.target]
            w = self.constants.tensor(arg(node, 1, "weight"))
            b_arg = arg(node, 2, "bias")
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if w is None or (b_arg is not None and b is None) or not isinstance(node.args[0], fx.Node):
                return None
            return self._conv_read(node.args[0], w, b, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0),
                                   arg(node, 7, "dilation", 1), arg(node, 6, "groups", 1), "zeros", True,
                                   arg(node, 5, "output_padding", 0))
        return None

    @staticmethod
    def _padding(padding: Any, kernel: Sequence[int], dilation: Any, ndim: int) -> Union[tuple, Refusal]:
        if padding == "valid":
            return (0,) * ndim
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(as_tuple(dilation, ndim), as_tuple(kernel, ndim))]
            if any(t % 2 for t in total):
                return Refusal("padding='same' with an even receptive field pads asymmetrically")
            return tuple(t // 2 for t in total)
        if isinstance(padding, str):
            return Refusal(f"padding={padding!r}")
        return as_tuple(padding, ndim)

    def _conv_read(self, inp: fx.Node, weight: Tensor, bias: Optional[Tensor], stride: Any, padding: Any,
                   dilation: Any, groups: int, padding_mode: str, transposed: bool, output_padding: Any) -> ConvRead:
        ndim = weight.dim() - 2
        w = float64(weight)
        out_ch = w.shape[1] * groups if transposed else w.shape[0]
        b = float64(bias) if bias is not None else w.new_zeros(out_ch)
        spec = ConvSpec(w, b, as_tuple(stride, ndim), as_tuple(padding, ndim), as_tuple(dilation, ndim),
                        int(groups), padding_mode, transposed,
                        as_tuple(output_padding, ndim) if transposed else ())
        return ConvRead(inp, spec, "conv_transpose" if transposed else "conv", weight)

    # -- sums -------------------------------------------------------------------------------------
    def sum(self, node: fx.Node) -> Optional[SumRead]:
        """Binary add/sub of two non-constant tensors (see :class:`SumRead`)."""
        parsed = ops.arithmetic(node)
        if parsed is None or parsed[0] not in ("add", "sub"):
            return None
        if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return None
        a, b = node.args
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        if self.constants.tensor(a) is not None or self.constants.tensor(b) is not None:
            return None
        alpha = node.kwargs.get("alpha", 1)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return None
        sign = 1.0 if parsed[0] == "add" else -1.0
        return SumRead(((1.0, a), (sign * float(alpha), b)), parsed[1])

    # -- linear --------------------------------------------------------------------------------
    def linear(self, node: fx.Node) -> Optional[LinearRead]:
        mod = self.module(node)
        if isinstance(mod, nn.Linear) and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            w = mod.weight
            b = float64(mod.bias) if mod.bias is not None else w.new_zeros(w.shape[0], dtype=torch.float64)
            return LinearRead(node.args[0], float64(w), b, w)
        if node.op == "call_function" and node.target in ops.LINEAR_FUNCS and isinstance(node.args[0], fx.Node):
            w = self.constants.tensor(arg(node, 1, "weight"))
            b_arg = arg(node, 2, "bias")
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if w is None or (b_arg is not None and b is None) or w.dim() != 2:
                return None
            b64 = float64(b) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            return LinearRead(node.args[0], float64(w), b64, w)
        return None

    # -- per-channel affines -------------------------------------------------------------------
    def affine(self, node: fx.Node, axis: Optional[int] = None) -> Union[AffineRead, Refusal, None]:
        """Eval BatchNorm (module or ``F.batch_norm``) along axis 1, or ``x*c``, ``x+c``, ``c+x``, ``x-c``,
        ``c-x``, ``x/c`` with ``c`` a constant broadcasting along one channel axis. For arithmetic, ``axis``
        picks the channel axis (default 1); BatchNorm always uses axis 1."""
        bn = self._batchnorm(node)
        if bn is not None:
            return bn
        return self._arith_affine(node, 1 if axis is None else axis)

    def _batchnorm(self, node: fx.Node) -> Union[AffineRead, Refusal, None]:
        mod = self.module(node)
        shape = shape_of(node)
        ndim = len(shape) if shape is not None else 4
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
                return Refusal("lazy BatchNorm not materialized")
            if mod.training:
                return Refusal("BatchNorm in training mode")
            if not mod.track_running_stats or mod.running_mean is None or mod.running_var is None:
                return Refusal("BatchNorm without running statistics normalizes by batch statistics")
            aff = K.batchnorm_as_affine(float64(mod.running_mean), float64(mod.running_var),
                                        None if mod.weight is None else float64(mod.weight),
                                        None if mod.bias is None else float64(mod.bias), mod.eps)
            return AffineRead(node.args[0], aff, 1, ndim, "batch_norm")
        if node.op == "call_function" and node.target in ops.BATCH_NORM_FUNCS:
            if arg(node, 5, "training", False) is not False:
                return Refusal("F.batch_norm(training=True) uses batch statistics")
            rm, rv = (self.constants.tensor(arg(node, i, n)) for i, n in ((1, "running_mean"), (2, "running_var")))
            w_arg, b_arg = arg(node, 3, "weight"), arg(node, 4, "bias")
            w = None if w_arg is None else self.constants.tensor(w_arg)
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if rm is None or rv is None or (w_arg is not None and w is None) or (b_arg is not None and b is None):
                return Refusal("F.batch_norm with non-constant statistics or parameters")
            aff = K.batchnorm_as_affine(float64(rm), float64(rv), None if w is None else float64(w),
                                        None if b is None else float64(b), float(arg(node, 7, "eps", 1e-5)))
            return AffineRead(node.args[0], aff, 1, ndim, "batch_norm")
        return None

    def _arith_affine(self, node: fx.Node, axis: int) -> Optional[AffineRead]:
        parsed = ops.arithmetic(node)
        if parsed is None or parsed[1]:
            return None
        op = parsed[0]
        if len(node.args) != 2 or any(k not in ("alpha",) for k in node.kwargs):
            return None
        if op == "div" and node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = node.args
        alpha = node.kwargs.get("alpha", 1)
        ca, cb = self.constants.tensor(a), self.constants.tensor(b)
        if isinstance(a, fx.Node) and ca is None and cb is not None:
            x, c, x_first = a, cb, True
        elif isinstance(b, fx.Node) and cb is None and ca is not None:
            x, c, x_first = b, ca, False
        else:
            return None
        shape = shape_of(x)
        out_shape = shape_of(node)
        if shape is None or out_shape is None or tuple(shape) != tuple(out_shape) or len(shape) <= axis:
            return None
        ndim = len(shape)
        channels = shape[axis]
        vec = _per_channel(c, ndim, axis, channels)
        if vec is None:
            return None
        vec = vec.to(self.device)
        one, zero = torch.ones_like(vec), torch.zeros_like(vec)
        if op == "mul":
            aff = ChannelAffine(vec, zero)
        elif op == "div":
            if not x_first or bool((vec == 0).any()):
                return None
            aff = ChannelAffine(1.0 / vec, zero)
        elif op == "add":
            # alpha multiplies the second operand.
            aff = ChannelAffine(one, vec * alpha) if x_first else ChannelAffine(one * alpha, vec)
        else:  # sub: a - alpha*b
            aff = ChannelAffine(one, -alpha * vec) if x_first else ChannelAffine(-alpha * one, vec)
        return AffineRead(x, aff, axis, ndim, op)

    # -- pooling and padding -------------------------------------------------------------------
    def avg_pool(self, node: fx.Node) -> Union[ConvRead, Refusal, None]:
        """``AvgPoolNd`` as a depthwise conv; exact only for ``count_include_pad=True, ceil_mode=False``, no
        ``divisor_override`` (docs/patterns.md, "avg-pool as a conv")."""
        mod = self.module(node)
        if mod is not None and type(mod) in ops.AVG_POOL_MODULES:
            ndim = ops.AVG_POOL_MODULES[type(mod)]
            k, s, p = mod.kernel_size, mod.stride, mod.padding
            cip, ceil, div = mod.count_include_pad, mod.ceil_mode, getattr(mod, "divisor_override", None)
        elif node.op == "call_function" and node.target in ops.AVG_POOL_FUNCS:
            ndim = ops.AVG_POOL_FUNCS[node.target]
            k = arg(node, 1, "kernel_size")
            s = arg(node, 2, "stride", None) or k
            p = arg(node, 3, "padding", 0)
            ceil, cip = arg(node, 4, "ceil_mode", False), arg(node, 5, "count_include_pad", True)
            div = arg(node, 6, "divisor_override", None) if ndim > 1 else None
        else:
            return None
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if not cip or ceil or div is not None:
            return Refusal("avg_pool is a conv only with count_include_pad=True, ceil_mode=False and no "
                           "divisor_override")
        shape = shape_of(node.args[0])
        if shape is None or len(shape) != ndim + 2 or any(isinstance(v, fx.Node) for v in (k, s, p)):
            return None
        spec = K.avg_pool_as_conv(shape[1], as_tuple(k, ndim), as_tuple(s, ndim), as_tuple(p, ndim),
                                  device=self.device)
        return ConvRead(node.args[0], spec, "avg_pool", None)

    def zero_pad(self, node: fx.Node) -> Optional[tuple[fx.Node, tuple[int, ...]]]:
        """``F.pad(x, pads)`` / ``nn.ZeroPadNd`` / ``nn.ConstantPadNd(value=0)`` that pads every spatial axis
        symmetrically with zeros: returns ``(x, per-axis padding)``."""
        mod = self.module(node)
        if isinstance(mod, ops.PAD_MODULES) and len(node.args) == 1:
            pads, value, mode = mod.padding, getattr(mod, "value", 0.0), "constant"
        elif node.op == "call_function" and node.target in ops.PAD_FUNCS:
            pads, mode, value = arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
        else:
            return None
        x = node.args[0] if node.args else None
        shape = shape_of(x)
        if not isinstance(x, fx.Node) or shape is None or mode != "constant" or value not in (None, 0, 0.0):
            return None
        if not isinstance(pads, (list, tuple)) or any(not isinstance(p, int) for p in pads) or len(pads) % 2:
            return None
        spatial = len(shape) - 2
        if spatial < 1 or len(pads) > 2 * spatial:
            return None
        per_axis = [0] * spatial
        for i in range(len(pads) // 2):  # F.pad lists the last axis first
            left, right = pads[2 * i], pads[2 * i + 1]
            if left != right or left < 0:
                return None
            per_axis[spatial - 1 - i] = left
        return x, tuple(per_axis)

    # -- anything linear, as a conv --------------------------------------------------------------
    def as_conv(self, node: fx.Node) -> Union[ConvRead, Refusal, None]:
        """Convs, avg-pools and per-channel affines (as depthwise 1x1 convs) over an N,C,*spatial input."""
        read = self.conv(node)
        if read is not None:
            return read
        read = self.avg_pool(node)
        if read is not None:
            return read
        aff = self.affine(node)
        if isinstance(aff, AffineRead):
            if aff.axis != 1 or aff.ndim < 3:
                return None
            return ConvRead(aff.input, K.affine_as_conv(aff.affine, aff.ndim - 2), "affine", None)
        return aff


def _per_channel(c: Tensor, ndim: int, axis: int, channels: int) -> Optional[Tensor]:
    """``c`` as a ``[channels]`` float64 vector if it broadcasts against an ``ndim`` tensor only along ``axis``
    without enlarging it; else ``None``."""
    if c.dim() > ndim:
        return None
    shape = [1] * (ndim - c.dim()) + list(c.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return float64(c).reshape(-1).expand(channels).clone()
