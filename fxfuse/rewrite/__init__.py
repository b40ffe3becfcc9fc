"""Rewriting: rule registration (:mod:`.registry`), graph surgery (:mod:`.context`), the fixed-point driver
(:mod:`.driver`)."""

from .context import RewriteContext
from .driver import PassResult, run_rules
from .registry import (
    PHASES,
    Rewrite,
    Rule,
    RuleFn,
    RuleLike,
    register_rule,
    registered_rules,
    resolve_rules,
    unregister_rule,
)

__all__ = ["PHASES", "PassResult", "Rewrite", "RewriteContext", "Rule", "RuleFn", "RuleLike", "register_rule",
           "registered_rules", "resolve_rules", "run_rules", "unregister_rule"]
