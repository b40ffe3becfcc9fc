"""Layer readers: convolutions, linear layers, per-channel affines (BatchNorm, arithmetic with a constant),
sums and avg-pools, and anything linear seen as a conv (:meth:`LayerReads.as_conv`)."""

from __future__ import annotations

import operator
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, fx, nn

from ...reasons import Reason
from .. import folds as K
from .. import ops
from ..algebra import ChannelAffine, ConvSpec, Refusal, as_tuple, float64
from .args import arg, arg_node, shape_of
from .base import ReaderBase
from .constants import _per_channel
from .reads import AffineRead, ConvRead, LinearRead, SumRead


class LayerReads(ReaderBase):
    """Nodes read as layers (see the module docstring)."""

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
            x = arg_node(node, 0)
            if x is None:
                return None
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
            return AffineRead(x, aff, 1, ndim, "batch_norm")
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
