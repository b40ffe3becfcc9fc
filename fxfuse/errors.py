"""Exceptions raised by fxfuse."""


class FusionError(RuntimeError):
    """fxfuse cannot return a model equal to the input (untraceable model, failed verification, …)."""


class UnfaithfulTrace(FusionError):
    """The captured graph, unmodified, already computes something else than the module."""
