"""Exceptions raised by fxfuse."""


class FusionError(RuntimeError):
    """fxfuse cannot return a model equal to the input (untraceable model, failed verification, …)."""


class UnfaithfulTrace(FusionError):
    """The captured graph, unmodified, already computes something else than the module."""


class IllConditioned(FusionError):
    """The model's output on the example is so sensitive to its weights that the check cannot tell an exact
    rewrite from a wrong one: ``noise`` is how far (relative to max|y|) 1e-15 relative noise in the weights moves
    it, beyond the check's tolerance."""

    def __init__(self, message: str, noise: float) -> None:
        super().__init__(message)
        self.noise = noise
