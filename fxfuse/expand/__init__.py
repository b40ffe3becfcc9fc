"""``fxfuse.expand``: the training side of the round trip — over-parameterize any CNN, train it, collapse it.

    train_form = fxfuse.expand(model, x, scheme="dbb")              # trainable; same eval function at init
    ...train train_form as usual (DDP / AMP / torch.compile)...
    deploy = fxfuse.reparametrize(train_form.eval(), x)             # the original's conv structure again

``fxfuse.expand`` is this module and is callable (``fxfuse.expand(...)`` is :func:`expand`); schemes are
registered with ``@fxfuse.expand.register_scheme("name")`` (docs/expand.md, docs/extending.md).
"""

import sys
import types
from typing import Any

from . import schemes as _builtin_schemes  # noqa: F401  (importing it registers the built-in schemes)
from .blocks import BNAndPad, ExpandedConv2d
from .core import expand
from .online import ChannelScale, OnlineConv2d, ScaleAndPad
from .report import Expanded, ExpandReport, Skipped
from .scheme import Branch, Geometry, Plan, Scheme, get_scheme, register_scheme, registered_schemes, unregister_scheme

__all__ = [
    "expand",
    "register_scheme",
    "unregister_scheme",
    "registered_schemes",
    "get_scheme",
    "Scheme",
    "Plan",
    "Branch",
    "Geometry",
    "ExpandedConv2d",
    "BNAndPad",
    "OnlineConv2d",
    "ChannelScale",
    "ScaleAndPad",
    "ExpandReport",
    "Expanded",
    "Skipped",
]


class _CallableModule(types.ModuleType):
    """Lets ``fxfuse.expand(model, x, scheme=...)`` call :func:`expand` while ``fxfuse.expand.register_scheme``
    and the other names stay reachable on the same object."""

    def __call__(self, model: Any, example_input: Any, **kwargs: Any) -> Any:
        return expand(model, example_input, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
