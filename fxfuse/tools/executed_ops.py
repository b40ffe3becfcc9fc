"""Count every op a model executes on an input, whatever its capture: a ``TorchFunctionMode`` sees each torch
function, tensor method and tensor-attribute read (``x.ndim``) as it runs, including those inside ``nn.Module``
forwards. Used by the op-level benchmark (original / fxfuse / plain twin), the zoo sweep and the no-residue
tests."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

OpKey = Callable[[Callable[..., Any]], Optional[str]]


def op_name(func: Callable[..., Any]) -> str:
    """The name an executed op is counted under (``conv2d``, ``add``, ``ndim`` for an ``x.ndim`` read …)."""
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a tensor attribute read such as x.ndim / x.shape
        name = getattr(getattr(func, "__self__", None), "__name__", None)
    return str(name or func)


class _OpCounter(TorchFunctionMode):
    def __init__(self, key: OpKey) -> None:
        super().__init__()
        self.key = key
        self.counts: Counter = Counter()

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Optional[Dict[str, Any]] = None) -> Any:
        label = self.key(func)
        if label is not None:
            self.counts[label] += 1
        return func(*args, **(kwargs or {}))


def run_counting(model: Callable[..., Any], *inputs: Any, key: OpKey = op_name) -> Tuple[Any, Counter]:
    """``(model(*inputs), counts)`` under ``torch.no_grad()``; ``key`` maps an executed function to the label it
    is counted under (``None``: not counted), e.g. :func:`fxfuse.ir.ops.function_kind` for op classes."""
    with torch.no_grad(), _OpCounter(key) as counter:
        out = model(*inputs)
    return out, counter.counts


def executed_ops(model: Callable[..., Any], *inputs: Any) -> Counter:
    """``Counter`` of op name → times executed by one ``model(*inputs)`` (see :func:`op_name`)."""
    return run_counting(model, *inputs)[1]


# The op classes a re-parameterizer removes: what ``capture="auto"`` minimizes and the benchmarks compare.
FUSABLE_KINDS = ("conv", "batch_norm", "avg_pool")


def executed_fusable(model: Callable[..., Any], *inputs: Any) -> int:
    """Convs + BatchNorms + pools one ``model(*inputs)`` executes, counted as they run (whatever the capture, so a
    sub-module fallback's untraced parts count too); classified by :func:`fxfuse.ir.ops.function_kind`."""
    from ..ir.ops import function_kind

    def kind(func: Callable[..., Any]) -> Optional[str]:
        k = function_kind(func)
        return k if k in FUSABLE_KINDS else None

    return sum(run_counting(model, *inputs, key=kind)[1].values())
