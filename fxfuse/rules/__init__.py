"""Built-in rewrite rules, one file each; importing this package registers them (in priority order):

``remove_noop`` (0) · ``conv_bn`` (10) · ``linear_view_bn`` (15) · ``bn_conv`` (20) · ``pad_into_conv`` (30) · ``pad_through_pointwise`` (31) ·
``branch_sum`` (40) · ``sequential`` (50) · ``concat`` (60) · ``horizontal`` (90, off by default).
"""

from . import affine_conv, branch_sum, concat, conv_affine, horizontal, noop, pad_into_conv, sequential, view_bn  # noqa: F401
