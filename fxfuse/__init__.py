"""fxfuse — structural re-parameterization as a torch.fx pass.

    fused = fxfuse.reparametrize(model, example_input)   # GraphModule, eval mode, verified equal
    print(fused.fxfuse_report)
"""

from ._api import reparametrize
from ._errors import FusionError
from ._graph import AffineRead, ConvRead, LinearRead, Refusal
from ._registry import Rule, RewriteContext, register_rule, registered_rules, unregister_rule
from ._report import FusionReport, GraphStats, Unfused
from ._spec import ChannelAffine, ConvSpec

__version__ = "0.1.0"

__all__ = [
    "reparametrize",
    "FusionError",
    "FusionReport",
    "GraphStats",
    "Unfused",
    "register_rule",
    "unregister_rule",
    "registered_rules",
    "Rule",
    "RewriteContext",
    "ConvSpec",
    "ChannelAffine",
    "ConvRead",
    "AffineRead",
    "LinearRead",
    "Refusal",
]
