"""Capture front ends: symbolic tracing (:mod:`.symbolic`), per-sub-module capture for models that do not trace
whole (:mod:`.submodules`), shape propagation (:mod:`.shapes`)."""

from .shapes import propagate_shapes
from .submodules import Call, capture_calls
from .symbolic import trace

__all__ = ["Call", "capture_calls", "propagate_shapes", "trace"]
