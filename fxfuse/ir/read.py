"""Readers: fx nodes seen as linear ops. The one place that knows how a conv, BN, pool, pad or sum is spelled
(through the op table, :mod:`fxfuse.ir.ops`).

A *reader* looks at one node and, if it computes a linear-affine function of a single tensor input with
constant parameters, returns that input plus a :class:`ConvSpec` / :class:`ChannelAffine`; otherwise it returns
``None`` or a :class:`Refusal` (the node is the right kind of op, but folding it would be wrong, with why).
Both graph spellings are read: ``call_module`` (``nn.Conv2d``, ``nn.BatchNorm2d``, …) and functional
(``F.conv2d`` / ``F.batch_norm`` with constant, ``get_attr``-rooted parameters).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, List, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

from ..reasons import Reason
from . import folds as K
from . import ops
from .algebra import ChannelAffine, ConvSpec, Refusal, as_tuple, float64


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


@dataclass(frozen=True)
class ValuedPad:
    """``node`` = ``input`` padded by ``padding`` (per spatial axis, both sides) with the per-channel constant
    ``values`` (float64 ``[C]``): a zero pad (``pad``) whose whole border is then overwritten with ``values``
    (``out[:, :, :p, :] = v`` … on every side, functionalized to ``slice_scatter``). ``nodes``: the pad, the
    writes and the slices they read (the construct, which nothing else should use)."""

    input: fx.Node
    pad: fx.Node
    padding: Tuple[int, ...]
    values: Tensor
    nodes: Tuple[fx.Node, ...]


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
        elif a.op in ("call_function", "call_method") and ops.is_pure(a, {}) \
                and (a.all_input_nodes or isinstance(a.target, ops.OpOverload)):
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
        first: Optional[Tensor] = next(iter(gm.parameters()), None)
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
                return Refusal(Reason.NOT_MATERIALIZED, "lazy conv not materialized")
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
            w, b, bias_ok = self._weight_and_bias(node)
            if w is None or not bias_ok or not isinstance(node.args[0], fx.Node):
                return Refusal(Reason.NOT_CONSTANT, "functional conv with non-constant weight") if w is None else None
            k = tuple(w.shape[2:])
            dil = as_tuple(arg(node, 5, "dilation", 1), ndim)
            padding = self._padding(arg(node, 4, "padding", 0), k, dil, ndim)
            if isinstance(padding, Refusal):
                return padding
            return self._conv_read(node.args[0], w, b, arg(node, 3, "stride", 1), padding, dil,
                                   arg(node, 6, "groups", 1), "zeros", False, ())
        if node.target in ops.CONV_T_FUNCS:
            ndim = ops.CONV_T_FUNCS[node.target]
            w, b, bias_ok = self._weight_and_bias(node)
            if w is None or not bias_ok or not isinstance(node.args[0], fx.Node):
                return None
            return self._conv_read(node.args[0], w, b, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0),
                                   arg(node, 7, "dilation", 1), arg(node, 6, "groups", 1), "zeros", True,
                                   arg(node, 5, "output_padding", 0))
        if node.target in ops.CONVOLUTION_FUNCS and len(node.args) >= 9:
            conv_args: Any = node.args
            inp, w_arg, b_arg, stride, pads, dil, transposed, out_pads, groups = conv_args[:9]
            w = self.constants.tensor(w_arg)
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if w is None or (b_arg is not None and b is None) or not isinstance(inp, fx.Node):
                return Refusal(Reason.NOT_CONSTANT, "functional conv with non-constant weight") if w is None else None
            return self._conv_read(inp, w, b, stride, pads, dil, groups, "zeros", bool(transposed),
                                   out_pads if transposed else ())
        return None

    def _weight_and_bias(self, node: fx.Node) -> Tuple[Optional[Tensor], Optional[Tensor], bool]:
        """``(weight, bias, bias_ok)`` of a functional layer call ``f(x, weight, bias, …)``: the constant values
        (``weight`` None when not constant), and whether a bias that is given is constant too."""
        b_arg = arg(node, 2, "bias")
        b = None if b_arg is None else self.constants.tensor(b_arg)
        return self.constants.tensor(arg(node, 1, "weight")), b, b_arg is None or b is not None

    @staticmethod
    def _padding(padding: Any, kernel: Sequence[int], dilation: Any, ndim: int) -> Union[tuple, Refusal]:
        if padding == "valid":
            return (0,) * ndim
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(as_tuple(dilation, ndim), as_tuple(kernel, ndim))]
            if any(t % 2 for t in total):
                return Refusal(Reason.PADDING, "padding='same' with an even receptive field pads asymmetrically")
            return tuple(t // 2 for t in total)
        if isinstance(padding, str):
            return Refusal(Reason.PADDING, f"padding={padding!r}")
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
        """Binary add/sub (``rsub``) of two non-constant tensors (see :class:`SumRead`)."""
        parsed = ops.binary(node)
        if parsed is None or parsed.op not in ("add", "sub"):
            return None
        a, b, alpha = parsed.a, parsed.b, parsed.alpha
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        if self.constants.tensor(a) is not None or self.constants.tensor(b) is not None:
            return None
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return None
        sign = 1.0 if parsed.op == "add" else -1.0
        return SumRead(((1.0, a), (sign * float(alpha), b)), parsed.in_place)

    # -- linear --------------------------------------------------------------------------------
    def linear(self, node: fx.Node) -> Optional[LinearRead]:
        mod = self.module(node)
        if isinstance(mod, nn.Linear) and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            w = mod.weight
            b = float64(mod.bias) if mod.bias is not None else w.new_zeros(w.shape[0], dtype=torch.float64)
            return LinearRead(node.args[0], float64(w), b, w)
        if node.op == "call_function" and node.target in ops.LINEAR_FUNCS and isinstance(node.args[0], fx.Node):
            wc, bc, bias_ok = self._weight_and_bias(node)
            if wc is None or not bias_ok or wc.dim() != 2:
                return None
            b64 = float64(bc) if bc is not None else torch.zeros(wc.shape[0], dtype=torch.float64)
            return LinearRead(node.args[0], float64(wc), b64, wc)
        if node.op == "call_function" and node.target in ops.ADDMM_FUNCS and len(node.args) >= 3 \
                and isinstance(node.args[1], fx.Node):
            # addmm(bias, x, w_t, beta, alpha) = beta·bias + alpha·x @ w_t: a linear layer with weight alpha·w_tᵀ
            bias, wt = self.constants.tensor(node.args[0]), self.constants.tensor(node.args[2])
            beta, alpha = arg(node, 3, "beta", 1), arg(node, 4, "alpha", 1)
            if bias is None or wt is None or wt.dim() != 2 or self.constants.tensor(node.args[1]) is not None \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (beta, alpha)):
                return None
            if bias.numel() not in (1, wt.shape[1]) or bias.dim() > 2 or (bias.dim() == 2 and bias.shape[0] != 1):
                return None  # a per-row bias is not a linear layer's
            w64 = float64(wt).t().contiguous() * alpha
            b64 = (float64(bias).reshape(-1) * beta).expand(wt.shape[1]).clone()
            return LinearRead(node.args[1], w64, b64, self._origin(node.args[2], wt))
        if node.op == "call_function" and node.target in ops.MM_FUNCS and isinstance(node.args[0], fx.Node) \
                and self.constants.tensor(node.args[0]) is None:
            wt = self.constants.tensor(node.args[1])  # mm(x, w_t) = x @ w_t: weight w_tᵀ, no bias
            if wt is None or wt.dim() != 2:
                return None
            return LinearRead(node.args[0], float64(wt).t().contiguous(), torch.zeros(wt.shape[1],
                              dtype=torch.float64), self._origin(node.args[1], wt))
        return None

    def _origin(self, node: Any, fallback: Tensor) -> Tensor:
        """The parameter a constant argument is a view of (``w.t()``, ``w.permute(1, 0)``): its dtype and
        ``requires_grad`` are what a fused layer should get."""
        while isinstance(node, fx.Node) and node.op == "call_function" and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
        value = self.constants.value(node) if isinstance(node, fx.Node) and node.op == "get_attr" else None
        return value if isinstance(value, Tensor) else fallback

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
                return Refusal(Reason.NOT_MATERIALIZED, "lazy BatchNorm not materialized")
            if mod.training:
                return Refusal(Reason.BATCH_STATISTICS, "BatchNorm in training mode")
            if not mod.track_running_stats or mod.running_mean is None or mod.running_var is None:
                return Refusal(Reason.BATCH_STATISTICS,
                               "BatchNorm without running statistics normalizes by batch statistics")
            aff = K.batchnorm_as_affine(float64(mod.running_mean), float64(mod.running_var),
                                        None if mod.weight is None else float64(mod.weight),
                                        None if mod.bias is None else float64(mod.bias), mod.eps)
            return AffineRead(node.args[0], aff, 1, ndim, "batch_norm")
        if node.op == "call_function" and node.target in ops.BATCH_NORM_FUNCS:
            if arg(node, 5, "training", False) is not False:
                return Refusal(Reason.BATCH_STATISTICS, "F.batch_norm(training=True) uses batch statistics")
            rm, rv = (self.constants.tensor(arg(node, i, n)) for i, n in ((1, "running_mean"), (2, "running_var")))
            w_arg, b_arg = arg(node, 3, "weight"), arg(node, 4, "bias")
            w = None if w_arg is None else self.constants.tensor(w_arg)
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if rm is None or rv is None or (w_arg is not None and w is None) or (b_arg is not None and b is None):
                return Refusal(Reason.NOT_CONSTANT, "F.batch_norm with non-constant statistics or parameters")
            aff = K.batchnorm_as_affine(float64(rm), float64(rv), None if w is None else float64(w),
                                        None if b is None else float64(b), float(arg(node, 7, "eps", 1e-5)))
            return AffineRead(node.args[0], aff, 1, ndim, "batch_norm")
        bn = self._aten_batchnorm_node(node)
        if bn is not None and bn.target in ops.BATCH_NORM_NO_STATS:
            return Refusal(Reason.BATCH_STATISTICS,
                           "batch_norm without running statistics normalizes by batch statistics")
        if bn is not None:
            training_at, eps_at = ops.BATCH_NORM_ATEN[bn.target]
            w_arg, b_arg, rm_arg, rv_arg = (arg(bn, i, n) for i, n in
                                            ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
            # (no running statistics first: an eval BatchNorm without them is exported with training=True)
            if rm_arg is None or rv_arg is None:
                return Refusal(Reason.BATCH_STATISTICS,
                           "batch_norm without running statistics normalizes by batch statistics")
            if training_at is not None and arg(bn, training_at, "training", False) is not False:
                return Refusal(Reason.BATCH_STATISTICS, "batch_norm(training=True) uses batch statistics")
            rm, rv = self.constants.tensor(rm_arg), self.constants.tensor(rv_arg)
            w = None if w_arg is None else self.constants.tensor(w_arg)
            b = None if b_arg is None else self.constants.tensor(b_arg)
            if rm is None or rv is None or (w_arg is not None and w is None) or (b_arg is not None and b is None):
                return Refusal(Reason.NOT_CONSTANT, "batch_norm with non-constant statistics or parameters")
            if not isinstance(bn.args[0], fx.Node):
                return None
            aff = K.batchnorm_as_affine(float64(rm), float64(rv), None if w is None else float64(w),
                                        None if b is None else float64(b), float(arg(bn, eps_at, "eps", 1e-5)))
            return AffineRead(bn.args[0], aff, 1, ndim, "batch_norm")
        return None

    @staticmethod
    def _aten_batchnorm_node(node: fx.Node) -> Optional[fx.Node]:
        """The ATen BatchNorm call whose output ``node`` is: ``node`` itself (``aten.batch_norm``) or, for the
        tuple-returning ops (``_native_batch_norm_legit_no_training`` …), ``node = getitem(bn, 0)``."""
        if node.op != "call_function":
            return None
        if node.target is operator.getitem and len(node.args) == 2 and node.args[1] == 0:
            bn = node.args[0]
            if isinstance(bn, fx.Node) and bn.op == "call_function" and bn.target in ops.BATCH_NORM_TUPLE:
                return bn
            return None
        if node.target in ops.BATCH_NORM_ATEN and node.target not in ops.BATCH_NORM_TUPLE:
            return node
        return None

    def _arith_affine(self, node: fx.Node, axis: int) -> Optional[AffineRead]:
        parsed = ops.binary(node)  # (no rounding_mode: a div with one is not read)
        if parsed is None or parsed.in_place:
            return None
        op, a, b, alpha = parsed.op, parsed.a, parsed.b, parsed.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return None
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
        """``AvgPoolNd`` as a depthwise conv; exact only for ``ceil_mode=False``, no ``divisor_override``, and
        ``count_include_pad=True`` or zero padding (docs/patterns.md, "avg-pool as a conv")."""
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
        if any(isinstance(v, fx.Node) for v in (k, s, p)):
            return None
        if (not cip and any(as_tuple(p, ndim))) or ceil or div is not None:
            # count_include_pad=False divides border windows by the taps inside: exact as a conv only unpadded
            return Refusal(Reason.POOL_NOT_LINEAR, "avg_pool is a conv only with ceil_mode=False, no "
                           "divisor_override, and count_include_pad=True or no padding")
        shape = shape_of(node.args[0])
        if shape is None or len(shape) != ndim + 2:
            return None
        spec = K.avg_pool_as_conv(shape[1], as_tuple(k, ndim), as_tuple(s, ndim), as_tuple(p, ndim),
                                  device=self.device)
        return ConvRead(node.args[0], spec, "avg_pool", None)

    def permute(self, node: fx.Node) -> Optional[Tuple[fx.Node, Tuple[int, ...]]]:
        """``x.permute(*dims)`` / ``torch.permute(x, dims)``: returns ``(x, dims)`` (non-negative)."""
        if node.op == "call_method" and node.target in ops.PERMUTE_METHODS:
            dims: Any = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
        elif node.op == "call_function" and node.target in ops.PERMUTE_FUNCS:
            dims = arg(node, 1, "dims")
        else:
            return None
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or not isinstance(dims, (tuple, list)) \
                or not all(isinstance(d, int) for d in dims):
            return None
        n = len(dims)
        return x, tuple(d % n for d in dims)

    def crop(self, node: fx.Node) -> Optional[Tuple[fx.Node, Tuple[Tuple[int, int], ...]]]:
        """``x[:, :, a:-b, c:-d]`` (plain slices, step 1, batch and channel axes whole): returns ``(x, per
        spatial axis (cut at the start, cut at the end))``; None for any other indexing."""
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            return None
        x, index = node.args
        shape = shape_of(x)
        if not isinstance(x, fx.Node) or shape is None or len(shape) < 3:
            return None
        items = list(index) if isinstance(index, tuple) else [index]
        if any(i is Ellipsis for i in items):
            at = items.index(Ellipsis)
            items = items[:at] + [slice(None)] * (len(shape) - len(items) + 1) + items[at + 1:]
        if len(items) > len(shape) or any(not isinstance(i, slice) for i in items):
            return None
        items += [slice(None)] * (len(shape) - len(items))
        cuts = []
        slices: List[slice] = [i for i in items if isinstance(i, slice)]
        for axis, (item, size) in enumerate(zip(slices, shape)):
            if any(isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)) or item.step not in (None, 1):
                return None
            start, stop, _ = item.indices(int(size))
            if axis < 2 and (start, stop) != (0, int(size)):
                return None
            if stop <= start:
                return None
            cuts.append((start, int(size) - stop))
        spatial = tuple(cuts[2:])
        return (x, spatial) if any(a or b for a, b in spatial) else None

    def zero_pad(self, node: fx.Node) -> Optional[tuple[fx.Node, tuple[int, ...]]]:
        """``F.pad(x, pads)`` / ``nn.ZeroPadNd`` / ``nn.ConstantPadNd(value=0)`` that pads every spatial axis
        symmetrically with zeros: returns ``(x, per-axis padding)``."""
        mod = self.module(node)
        if isinstance(mod, ops.PAD_MODULES) and len(node.args) == 1:
            pads, value, mode = mod.padding, getattr(mod, "value", 0.0), "constant"
        elif node.op == "call_function" and node.target in ops.PAD_FUNCS:
            pads, mode, value = arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
        elif node.op == "call_function" and node.target in ops.CONSTANT_PAD_FUNCS:
            pads, mode, value = arg(node, 1, "pad"), "constant", arg(node, 2, "value", 0)
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

    def copying_pad(self, node: fx.Node) -> Optional[fx.Node]:
        """A reflect / replicate / circular pad of spatial axes only (module, ``F.pad(mode=…)`` or ATen): every
        output element copies an input element of the same sample and channel. Returns the padded input."""
        mod = self.module(node)
        x = node.args[0] if node.args else None
        if isinstance(mod, ops.COPY_PAD_MODULES) and len(node.args) == 1:
            return x if isinstance(x, fx.Node) else None
        if node.op != "call_function" or not isinstance(x, fx.Node):
            return None
        if node.target in ops.COPY_PAD_FUNCS:
            pads = arg(node, 1, "padding", node.kwargs.get("pad"))  # (_pad_circular names it ``pad``)
        elif node.target in ops.PAD_FUNCS and arg(node, 2, "mode", "constant") in ops.COPY_PAD_MODES:
            pads = arg(node, 1, "pad")
        else:
            return None
        shape = shape_of(x)
        if shape is None or not isinstance(pads, (list, tuple)) or len(pads) > 2 * (len(shape) - 2):
            return None  # unknown rank, or a pad reaching the channel axis
        return x

    def cat(self, node: fx.Node) -> Optional[Tuple[Sequence[Any], Any]]:
        """``torch.cat(tensors, dim)`` in any spelling: returns ``(tensors, dim)``."""
        if node.op != "call_function" or node.target not in ops.CAT_FUNCS:
            return None
        return arg(node, 0, "tensors"), arg(node, 1, "dim", 0)

    def valued_pad(self, node: fx.Node) -> Optional[ValuedPad]:
        """A zero pad whose every border position is overwritten with one per-channel constant (DBB's
        BN-and-pad layer: ``out = F.pad(bn(x), [p] * 4); out[:, :, :p, :] = pad_values; …``), i.e. a pad with
        per-channel values: see :class:`ValuedPad`. Only writes that stay inside the border and together cover
        all of it are accepted; every write must store the same values."""
        writes: list = []  # (dim, start, end, value) in the order they are applied, latest first
        nodes: list = []
        cur = node
        while cur.op == "call_function" and cur.target in ops.SLICE_SCATTER_FUNCS:
            parsed = self._slice_write(cur)
            if parsed is None:
                return None
            cur, ws, ns = parsed
            writes.extend(ws)
            nodes.extend(ns)
        if not writes:
            return None
        pad = self.zero_pad(cur)
        shape = shape_of(cur)
        if pad is None or shape is None:
            return None
        x, padding = pad
        ndim = len(shape)
        values = None
        covered: Dict[int, set] = {}
        for dim, start, end, value in writes:
            if not isinstance(dim, int) or dim % ndim < 2:
                return None  # a write along the batch or channel axis
            dim %= ndim
            size = int(shape[dim])
            lo, hi, _ = slice(start, end).indices(size)
            p = padding[dim - 2]
            if hi <= lo or not (hi <= p or lo >= size - p):
                return None  # empty, or reaches into the interior
            vec = _per_channel(_uniform_along_all_but(value, ndim, 1), ndim, 1, int(shape[1]))
            if vec is None or (values is not None and not torch.equal(vec, values)):
                return None
            values = vec
            covered.setdefault(dim, set()).update(range(lo, hi))
        for axis, p in enumerate(padding):
            size = int(shape[axis + 2])
            if p and not covered.get(axis + 2, set()) >= set(range(p)) | set(range(size - p, size)):
                return None  # part of the border keeps the zero padding
        assert values is not None
        return ValuedPad(x, cur, tuple(padding), values.to(self.device), tuple([*nodes, cur]))

    def _slice_write(self, node: fx.Node) -> Optional[Tuple[fx.Node, list, list]]:
        """``slice_scatter(base, src, dim, start, end)`` writing a constant (``copy(view, c)``, ``fill(view, c)``
        or a broadcast constant), or writing into a full-range slice of ``base`` (``out[:, :, :p] = c`` is
        recorded as a write into ``out[:]``): ``(base, [(dim, start, end, value)], nodes)``."""
        base, src = arg(node, 0, "input"), arg(node, 1, "src")
        dim, start, end = arg(node, 2, "dim", 0), arg(node, 3, "start"), arg(node, 4, "end")
        step = arg(node, 5, "step", 1)
        if not isinstance(base, fx.Node) or not isinstance(src, fx.Node) or step != 1 \
                or any(isinstance(v, fx.Node) for v in (dim, start, end)):
            return None
        value = self._written_constant(src)
        if value is not None:
            nodes = [node, src] + [n for n in src.all_input_nodes if n.op == "call_function"
                                   and n.target in ops.SLICE_FUNCS]
            return base, [(dim, start, end, value)], nodes
        shape = shape_of(base)
        full = shape is not None and start in (None, 0) and (end is None or end >= int(shape[dim]))
        if full and src.op == "call_function" and src.target in ops.SLICE_SCATTER_FUNCS:
            view = arg(src, 0, "input")
            if isinstance(view, fx.Node) and view.op == "call_function" and view.target in ops.SLICE_FUNCS \
                    and view.args[0] is base and arg(view, 1, "dim", 0) == dim \
                    and arg(view, 2, "start") in (None, 0) and (arg(view, 3, "end") is None
                                                                or arg(view, 3, "end") >= int(shape[dim])) \
                    and arg(view, 4, "step", 1) == 1:
                inner = self._slice_write(src)
                if inner is not None and inner[0] is view:
                    return base, inner[1], [node, view, *inner[2]]
        return None

    def _written_constant(self, src: fx.Node) -> Optional[Tensor]:
        """The constant a write stores (before broadcasting to the written region), or None."""
        value: Any = src
        if src.op == "call_function" and src.target in ops.COPY_FUNCS + ops.FILL_FUNCS:
            value = arg(src, 1, "src" if src.target in ops.COPY_FUNCS else "value")
        while True:
            c = self.constants.tensor(value)
            if c is not None:
                return c
            if isinstance(value, fx.Node) and value.op == "call_function" and value.target in ops.EXPAND_FUNCS:
                value = value.args[0]
                continue
            return None

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


def _uniform_along_all_but(c: Tensor, ndim: int, axis: int) -> Tensor:
    """``c`` (broadcasting against an ``ndim`` tensor) with every other axis along which it holds one value
    shrunk to size 1 (a constant already expanded to the written region's shape)."""
    if c.dim() > ndim:
        return c
    c = c.reshape([1] * (ndim - c.dim()) + list(c.shape))
    for i in range(ndim):
        if i != axis and c.shape[i] > 1 and bool((c == c.narrow(i, 0, 1)).all()):
            c = c.narrow(i, 0, 1)
    return c


def _per_channel(c: Tensor, ndim: int, axis: int, channels: int) -> Optional[Tensor]:
    """``c`` as a ``[channels]`` float64 vector if it broadcasts against an ``ndim`` tensor only along ``axis``
    without enlarging it; else ``None``."""
    if c.dim() > ndim:
        return None
    shape = [1] * (ndim - c.dim()) + list(c.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return float64(c).reshape(-1).expand(channels).clone()
