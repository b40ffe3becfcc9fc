"""Networks written the way training-form re-parameterizable code is written in the wild: the constructs that stop
``torch.fx`` symbolic tracing — item assignment into a padded tensor (DBB's BN-and-pad layer), ``int()`` of sizes,
branches on devices or shapes, ``reshape(*x.size())``, shape-keyed caches (detection heads), in-place writes on
aliases, forward hooks — and weights generated in forward (masks × scale, ``w + identity``, kernels composed by
convolving two kernels). ``CORPUS`` maps a name to (factory, example input shape, the hand-written deploy form's
(convs, BatchNorms, Linears) executed): the structure ``fxfuse.reparametrize`` must reach
(tests/test_capture_export.py; per-capture counts: ``python -m benchmarks.capture_corpus``, docs/benchmarks.md).

``DTYPE_CORPUS`` (same convention) holds networks whose forward derives a dtype from its input or its weights —
``torch.arange(n, dtype=x.dtype)`` grids cached per shape, DETR's sine position embedding, the AMP cast
``x.to(self.stem.conv.weight.dtype)``, ``torch.full`` / ``new_tensor`` / ``new_ones`` / ``zeros_like``, a float32
buffer brought in with ``type_as``, ``torch.finfo(x.dtype)`` — around RepVGG blocks that must still collapse, in
whatever dtype the model is run (tests/test_dtype_corpus.py).

The networks live by family in :mod:`.dbb_published`, :mod:`.ecb`, :mod:`.spellings` (blocks spelled the way
tracing finds them), :mod:`.detection` and :mod:`.dtypes` (:mod:`.common`: conv-BN and the RepVGG block they share);
their names stay importable from here.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .common import conv_bn
from .dbb_published import DBBNet
from .detection import FCOSHeadNet, GridHeadNet, SinePositionNet, TinyYolo
from .dtypes import CastToWeightNet, ForwardConstantsNet, TypeAsBufferNet
from .ecb import ECBNet
from .spellings import (
    AliasedInplaceAdd,
    CatDecoder,
    FlatWeightNet,
    LargeKernelGenerated,
    MobileOneNet,
    ReshapeNet,
    TokenMLP,
    hooked_conv_bn,
)

__all__ = ["CORPUS", "DTYPE_CORPUS", "make", "conv_bn", "DBBNet", "ReshapeNet"]


# ------------------------------------------------------------------------------------------ the table
# name -> (factory, example input shape, deploy form's (convs, batch_norms, linears)).
CORPUS = {
    # 2 DBB blocks -> one kxk conv each; the Linear head stays.
    "dbb_bn_and_pad": (DBBNet, (1, 3, 8, 8), (2, 0, 1)),
    # conv-BN-ReLU x2 with generated weights -> 2 convs.
    "flat_weight_int_size": (FlatWeightNet, (2, 3, 6, 6), (2, 0, 0)),
    # ECB training form: 4 branches (+ identity) per block, bias-valued pads -> one 3x3 conv per block.
    "ecb_train_form": (lambda: ECBNet(rebuild_in_eval=False), (1, 3, 6, 6), (2, 0, 0)),
    # ECB eval path: the deploy kernel rebuilt every call (get_device() branch) -> one conv per block.
    "ecb_eval_rebuild": (lambda: ECBNet(rebuild_in_eval=True), (1, 3, 6, 6), (2, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks (3x3 + 1x1 + identity BN), reshape(*x.size()) -> 3 convs.
    "reshape_star_size": (ReshapeNet, (2, 3, 6, 6), (3, 0, 0)),
    # stem, RepConv, down-sampling conv (each conv-BN) + 2 head convs -> 5 convs.
    "yolo_detect_head": (TinyYolo, (1, 3, 16, 16), (5, 0, 0)),
    # 4 MobileOne blocks -> one conv each.
    "mobileone_shape_branch": (MobileOneNet, (2, 3, 8, 8), (4, 0, 0)),
    # body conv-BN -> 1 conv; conv(x) + x -> 1 conv (identity merged).
    "aliased_inplace_add": (AliasedInplaceAdd, (2, 3, 5, 5), (2, 0, 0)),
    # conv·3 → BN → ReLU → 1x1 conv → BN -> 2 convs.
    "forward_hook": (hooked_conv_bn, (1, 3, 6, 6), (2, 0, 0)),
    # depthwise 5x5 from large + padded small kernel, BN -> 1 conv.
    "large_kernel_generated": (lambda: LargeKernelGenerated(4), (2, 4, 7, 7), (1, 0, 0)),
    # cat of two conv-BNs on x -> 1 conv; ConvTranspose + BN -> 1 transposed conv.
    "cat_decoder_dict_out": (CatDecoder, (2, 3, 5, 5), (2, 0, 0)),
    # Linear -> view -> BatchNorm1d -> view back -> 1 Linear, + the output Linear.
    "token_mlp_bn1d": (TokenMLP, (2, 5, 6), (0, 0, 2)),
}
# Forward-time dtype derivations around RepVGG blocks; same convention. Every block -> one conv, every BN folded.
DTYPE_CORPUS = {
    # stem conv-BN + 2 RepVGG blocks + head (conv-BN, 1x1 regression) -> 5 convs; the cached grid is an add.
    "grid_cache_arange": (GridHeadNet, (2, 3, 12, 12), (5, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks + input_proj conv-BN -> 4 convs; the sine embedding is elementwise.
    "detr_sine_position": (SinePositionNet, (2, 3, 8, 8), (4, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks (the first strided, no identity) -> 3 convs; the Linear head stays.
    "amp_cast_to_weight": (CastToWeightNet, (2, 3, 10, 10), (3, 0, 1)),
    # stem conv-BN + 2 RepVGG blocks -> 3 convs; the forward-built affine between them stays elementwise.
    "forward_constants": (ForwardConstantsNet, (2, 3, 8, 8), (3, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks -> 3 convs; the buffer scales stay elementwise.
    "type_as_buffer": (TypeAsBufferNet, (2, 3, 12, 12), (3, 0, 0)),
    # stem conv-BN + 2 RepVGG blocks + cls and bbox convs -> 5 convs.
    "fcos_scale_finfo": (FCOSHeadNet, (2, 3, 8, 8), (5, 0, 0)),
}
# Built with a fixed seed: the factories draw random weights.
SEED = 0


def make(name: str) -> Tuple[nn.Module, Tensor]:
    """``(model, example input)`` for a name of :data:`CORPUS` or :data:`DTYPE_CORPUS`, built with a fixed seed
    (float32; the caller casts both to another dtype)."""
    factory, shape, _ = CORPUS[name] if name in CORPUS else DTYPE_CORPUS[name]
    torch.manual_seed(SEED)
    model = factory()
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(SEED + 1))
