"""Layout readers: pads (zero, copying, with per-channel values), crops, permutes and concatenations."""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx

from .. import ops
from .args import arg, arg_ints, shape_of
from .base import ReaderBase
from .constants import _per_channel, _uniform_along_all_but
from .reads import ValuedPad


class PadReads(ReaderBase):
    """Nodes read as pads, crops, permutes (see the module docstring)."""

    def permute(self, node: fx.Node) -> Optional[Tuple[fx.Node, Tuple[int, ...]]]:
        """``x.permute(*dims)`` / ``torch.permute(x, dims)``: returns ``(x, dims)`` (non-negative)."""
        if node.op == "call_method" and node.target in ops.PERMUTE_METHODS:
            dims: Any = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
        elif node.op == "call_function" and node.target in ops.PERMUTE_FUNCS:
            dims = arg_ints(node, 1, "dims")
        else:
            return None
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or not isinstance(dims, (tuple, list)) \
                or not all(isinstance(d, int) for d in dims):
            return None
        n = len(dims)
        return x, tuple(d % n for d in dims)

    def view_sizes(self, node: fx.Node) -> Optional[Tuple[Any, ...]]:
        """The target sizes of a reshape / view written with sizes (``x.reshape(a, b)``, ``x.view((a, b))``,
        ``torch.reshape(x, s)``, ``aten.view(x, s)`` …): a tuple of ints and nodes (a size computed in the graph,
        e.g. a symbolic batch). ``None`` for ``flatten`` / ``reshape_as`` / ``view_as`` and anything else."""
        if node.op == "call_method" and node.target in ops.SIZED_VIEW_METHODS:
            sizes: Any = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
        elif node.op == "call_function" and node.target in ops.SIZED_VIEW_FUNCS:
            sizes = arg(node, 1, "shape", arg(node, 1, "size"))
        else:
            return None
        if not isinstance(sizes, (tuple, list)) or not all(isinstance(s, (int, fx.Node)) for s in sizes):
            return None
        return tuple(sizes)

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
        return ValuedPad(x, cur, tuple(padding), values.to(self.device), (*nodes, cur))

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
        if full and shape is not None and src.op == "call_function" and src.target in ops.SLICE_SCATTER_FUNCS:
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
