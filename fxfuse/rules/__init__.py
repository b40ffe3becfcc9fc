"""Built-in rewrite rules, one file per rule, file name == rule name.

:data:`ORDER` is the order table: importing this package imports (and so registers) the rules in this order,
which is the order they run in within each sweep of their phase (``horizontal`` is ``phase="late"`` and off by
default). A new built-in rule: add its file here, its section to docs/patterns.md, its test to
``tests/rules/test_<name>.py`` (checklist in docs/extending.md).
"""

import importlib

ORDER = (
    "fold_constants",         # parameter-only sub-graphs (generated weights) → one constant
    "remove_noop",            # identity / eval dropout out of the way first
    "pad_values",             # pad with per-channel values f(0) after a pointwise f → f after a zero pad
    "conv_bn",                # conv / linear → per-channel affine
    "linear_view_bn",         # linear → view → BN1d → view back
    "bn_conv",                # per-channel affine → conv / linear
    "pad_into_conv",          # zero pad → conv
    "pad_through_pointwise",  # zero pad after a bias-free 1x1 conv moves before it
    "branch_sum",             # Σ parallel branches on one input
    "sequential",             # conv → conv
    "concat",                 # cat of sibling convs
    "conv_into_fc",           # conv summed with / flattened into an FC over the same rows (RepMLP)
    "shape_assert",           # shape checks the fused graph guarantees (keep_asserts=True keeps them)
    "horizontal",             # late phase, off by default
)

for _name in ORDER:
    importlib.import_module(f"{__name__}.{_name}")
