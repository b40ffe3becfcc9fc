"""``fxfuse.expansion``: the training side of the round trip — over-parameterize any CNN, train it, collapse it.

    train_form = fxfuse.expand(model, x, scheme="dbb")              # trainable; same eval function at init
    ...train train_form as usual (DDP / AMP / torch.compile)...
    deploy = fxfuse.reparametrize(train_form.eval(), x)             # the original's conv structure again

:func:`fxfuse.expand` is :func:`~fxfuse.expansion.core.expand`. This package holds what it works with: the scheme
API (:mod:`~fxfuse.expansion.scheme`; register with ``@fxfuse.expansion.register_scheme("name")``), the built-in
schemes (:mod:`~fxfuse.expansion.schemes`), the expanded blocks (:mod:`~fxfuse.expansion.modules`), online mode
(:mod:`~fxfuse.expansion.online`) and the report (:mod:`~fxfuse.expansion.expand_report`); docs/expand.md,
docs/extending.md.
"""

from . import schemes as _builtin_schemes  # noqa: F401  (importing it registers the built-in schemes)
from .core import expand
from .expand_report import Expanded, ExpandReport, Skipped
from .modules import BNAndPad, ExpandedConv2d
from .online import ChannelScale, OnlineConv2d, ScaleAndPad
from .scheme import (
    Branch,
    ConvGeometry,
    Plan,
    Scheme,
    get_scheme,
    register_scheme,
    registered_schemes,
    unregister_scheme,
)

__all__ = [
    "expand",
    "register_scheme",
    "unregister_scheme",
    "registered_schemes",
    "get_scheme",
    "Scheme",
    "Plan",
    "Branch",
    "ConvGeometry",
    "ExpandedConv2d",
    "BNAndPad",
    "OnlineConv2d",
    "ChannelScale",
    "ScaleAndPad",
    "ExpandReport",
    "Expanded",
    "Skipped",
]
