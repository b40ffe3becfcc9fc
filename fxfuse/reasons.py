"""Stable reason codes: why a candidate was left unfused, why a rewrite was rolled back, why a capture was dropped.

Every such decision carries a :class:`Reason` beside its sentence. Code (fxfuse's and its users') branches on the
code, never on the English text, which may be reworded at any release. The values are stable strings (they appear
in ``FusionReport.to_dict()`` and the CLI's JSON output).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Reason"]


class Reason(str, Enum):
    """Why something was not done. Grouped by what it explains; see docs/patterns.md for each exactness condition."""

    # -- a candidate left unfused (FusionReport.unfused[i].code)
    BATCH_STATISTICS = "batch_statistics"  # a BatchNorm normalizes by batch statistics (training mode, no stats)
    NOT_CONSTANT = "not_constant"  # a weight / statistic is not a constant of this graph
    NOT_MATERIALIZED = "not_materialized"  # a lazy module has no parameters yet
    PADDING = "padding"  # a padding the fold cannot express exactly ('same' with an even field, zero pad after a shift)
    POOL_NOT_LINEAR = "pool_not_linear"  # an avg-pool that is not a conv (count_include_pad=False, ceil_mode, …)
    OTHER_USERS = "other_users"  # an intermediate the fold would remove is used (or its shape read) elsewhere
    AXIS = "axis"  # an affine that is not along the channel / feature axis of its neighbour
    TAP_GRID = "tap_grid"  # kernels that do not sit on one tap grid (branches' stride / offsets; a chain's stride or
    # dilation; a crop that is not a multiple of the dilation)
    MORE_WORK = "more_work"  # merging would execute more arithmetic than leaving the ops apart
    ALIASING = "aliasing"  # an in-place write on a tensor that is read again or may alias another
    NOT_LINEAR = "not_linear"  # the op next to the candidate is not a linear map the fold can compose with
    ROLLED_BACK = "rolled_back"  # the rewrite was undone by verification (see FusionReport.rollbacks)
    NO_PARTNER = "no_partner"  # nothing to fold it into: a per-channel affine with no conv / linear layer beside it,
    # a pool or affine term of a sum with no conv branch on its input
    VIEW_ORDER = "view_order"  # reshapes around a linear map that do not keep one row-major element order (a
    # permute on one side only, rows split differently)
    SPATIAL_SIZE = "spatial_size"  # a conv read as a dense matrix of one input size, but the graph does not fix
    # the size it sees (another input size would run the original and not the fused map)
    DTYPE = "dtype"  # the layers to merge hold tensors of different dtypes
    NOT_MATCHED = "not_matched"  # an op of a fusable kind next to a layer, but no enabled rule matched the pattern

    # -- a rewrite rolled back (FusionReport.rollbacks[i].code)
    OUTPUT_CHANGED = "output_changed"  # the float64 check of the rewritten graph failed
    ILL_CONDITIONED = "ill_conditioned"  # 1e-15 relative noise in the weights already fails the check: no rewrite
    # of this graph can be verified on this input
    ARTIFACT_DTYPE = "artifact_dtype"  # the returned model answered in another dtype or device than the original
    ARTIFACT_OVERFLOW = "artifact_overflow"  # a fused tensor is finite in float64 but not in the model's dtype
    ARTIFACT_MISMATCH = "artifact_mismatch"  # run in its own dtype, the result differs beyond that dtype's tolerance
    ARTIFACT_RAISES = "artifact_raises"  # run in its own dtype, the result raises
    ARTIFACT_DRIFT = "artifact_drift"  # a second call on the same input differs from the first (state written)

    # -- a capture not used (FusionReport.captures[i].code)
    TRACE_FAILED = "trace_failed"  # torch.fx symbolic tracing raised
    EXPORT_FAILED = "export_failed"  # torch.export raised
    UNFAITHFUL = "unfaithful"  # the captured graph, unmodified, computes something else than the model
    REWRITE_FAILED = "rewrite_failed"  # no verified rewrite of the captured graph (FusionError)
    BATCH_PINNED = "batch_pinned"  # the program runs at the example's batch size only; another capture does not
    EXECUTES_MORE = "executes_more"  # verified, but executes more convs + BatchNorms + pools than the one kept
    NOT_TRIED = "not_tried"  # not needed: the capture kept leaves nothing this one could fuse
    NOT_REQUESTED = "not_requested"  # the user asked for another capture

    def __str__(self) -> str:
        return self.value
