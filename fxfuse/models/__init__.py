"""Reference networks in multi-branch training form (RepVGG, ACNet, DBB, MobileOne, BN-after-sum),
their deploy-shaped plain twins, and a BatchNorm randomizer for tests."""
from __future__ import annotations

from ._bn import randomize_batchnorm_
from .blocks import (
    ACBlock,
    ACNet,
    BNAfterSumBlock,
    BNAfterSumNet,
    DBBBlock,
    DBBNet,
    MobileOneBlock,
    MobileOneNet,
    MobileOneUnit,
    PadThenBN,
)
from .catalog import PlainBlock, build, default_input_shape, names, plain_twin, reparam_blocks, zoo_names
from .dbb_mobile import DBBDepthwiseUnit, DBBMobileBlock, DBBMobileNet
from .repmlp import RepMLPBlock, RepMLPDeployBlock, RepMLPNet, repmlp_deploy
from .repvgg_net import REPVGG_CONFIGS, RepVGG, RepVGGBlock, conv_spec, repvgg
from .zoo_form import AssertingBatchNorm2d, ZooRepVGGBlock, zoo_form

__all__ = [
    "ACBlock",
    "AssertingBatchNorm2d",
    "ACNet",
    "BNAfterSumBlock",
    "BNAfterSumNet",
    "PadThenBN",
    "DBBBlock",
    "DBBDepthwiseUnit",
    "DBBMobileBlock",
    "DBBMobileNet",
    "DBBNet",
    "MobileOneBlock",
    "MobileOneNet",
    "MobileOneUnit",
    "PlainBlock",
    "REPVGG_CONFIGS",
    "RepMLPBlock",
    "RepMLPDeployBlock",
    "RepMLPNet",
    "RepVGG",
    "RepVGGBlock",
    "build",
    "conv_spec",
    "default_input_shape",
    "names",
    "plain_twin",
    "randomize_batchnorm_",
    "reparam_blocks",
    "repmlp_deploy",
    "repvgg",
    "ZooRepVGGBlock",
    "zoo_form",
    "zoo_names",
]
