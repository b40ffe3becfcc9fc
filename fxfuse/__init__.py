"""fxfuse — structural re-parameterization as a torch.fx pass.

    fused = fxfuse.reparametrize(model, example_input)   # GraphModule, eval mode, verified equal
    print(fused.fxfuse_report)
    training_bns = [u for u in fused.fxfuse_report.unfused if u.code is fxfuse.Reason.BATCH_STATISTICS]

The training side: :func:`expand` (over-parameterize a CNN; schemes and blocks in :mod:`fxfuse.expansion`).
Rule authors: :func:`register_rule` here, the readers and fold math in :mod:`fxfuse.ir`, property tests with
:mod:`fxfuse.testing` (docs/extending.md).
"""

from .api import compile, reparametrize, reparametrize_exported
from .errors import FusionError
from .expansion import expand
from .reasons import Reason
from .report import FusionReport, GraphStats, Unfused
from .rewrite import RewriteContext, Rule, register_rule, registered_rules, unregister_rule

__version__ = "0.3.0.dev0"

__all__ = [
    "reparametrize",
    "expand",
    "reparametrize_exported",
    "compile",
    "FusionError",
    "Reason",
    "FusionReport",
    "GraphStats",
    "Unfused",
    "register_rule",
    "unregister_rule",
    "registered_rules",
    "Rule",
    "RewriteContext",
]
