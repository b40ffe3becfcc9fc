"""Name registry for the reference nets, and the deploy-shaped "plain twin" builder."""
from __future__ import annotations

import copy
from typing import Any, Callable, cast

import torch
from torch import nn

from .blocks import ACNet, BNAfterSumNet, DBBNet, MobileOneNet
from .repvgg_net import REPVGG_CONFIGS, repvgg
from .zoo_form import zoo_form

__all__ = [
    "PlainBlock",
    "build",
    "default_input_shape",
    "names",
    "plain_twin",
    "reparam_blocks",
    "zoo_names",
]

ZOO_SUFFIX = "-zoo"

_SMALL_NETS: dict[str, Callable[..., nn.Module]] = {
    "acnet": ACNet,
    "dbb": DBBNet,
    "mobileone": MobileOneNet,
    "bn-after-sum": BNAfterSumNet,
}
_SMALL_INPUT = (1, 3, 32, 32)
_TINY_INPUT = (1, 3, 64, 64)
_IMAGENET_INPUT = (1, 3, 224, 224)


def names() -> list[str]:
    """All registered model names: ``repvgg-<config>`` for each RepVGG config, then the small nets."""
    return [f"repvgg-{c}" for c in REPVGG_CONFIGS] + list(_SMALL_NETS)


def zoo_names() -> list[str]:
    """The reference nets of the op-level benchmark in zoo spelling (``build`` accepts ``<any name>-zoo``)."""
    return [f"{n}{ZOO_SUFFIX}" for n in ("repvgg-A0", "repvgg-tiny", "repvgg-article", *_SMALL_NETS)]


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}")


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered net in training form; ``kwargs`` go to its constructor (override config).
    ``<name>-zoo`` builds it in zoo spelling (:mod:`fxfuse.models.zoo_form`)."""
    if name.endswith(ZOO_SUFFIX) and name != ZOO_SUFFIX:
        return zoo_form(build(name[: -len(ZOO_SUFFIX)], **kwargs))
    if name in _SMALL_NETS:
        return _SMALL_NETS[name](**kwargs)
    if name.startswith("repvgg-") and name[len("repvgg-"):] in REPVGG_CONFIGS:
        return repvgg(name[len("repvgg-"):], **kwargs)
    raise _unknown(name)


def default_input_shape(name: str) -> tuple[int, int, int, int]:
    """NCHW input for ``name``: 224x224 for full RepVGGs, 64x64 for tiny ones, 32x32 for small nets."""
    if name.endswith(ZOO_SUFFIX) and name != ZOO_SUFFIX:
        return default_input_shape(name[: -len(ZOO_SUFFIX)])
    if name in _SMALL_NETS:
        return _SMALL_INPUT
    if name in ("repvgg-tiny", "repvgg-tiny_g2"):
        return _TINY_INPUT
    if name.startswith("repvgg-") and name[len("repvgg-"):] in REPVGG_CONFIGS:
        return _IMAGENET_INPUT
    raise _unknown(name)


def _is_block(module: nn.Module) -> bool:
    return callable(getattr(module, "deploy_conv_specs", None))


def reparam_blocks(model: nn.Module) -> list[nn.Module]:
    """Outermost modules of ``model`` that expose ``deploy_conv_specs()``, in registration order."""
    if _is_block(model):
        return [model]
    found: list[nn.Module] = []
    for child in model.children():
        found.extend(reparam_blocks(child))
    return found


class PlainBlock(nn.Sequential):
    """Deploy form of one block: ``Conv2d(bias=True) -> ReLU`` per spec of ``deploy_conv_specs()``."""

    def __init__(self, specs: list[dict[str, Any]], device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        layers: list[nn.Module] = []
        for spec in specs:
            layers.append(nn.Conv2d(**spec, bias=True, device=device, dtype=dtype))
            layers.append(nn.ReLU())
        super().__init__(*layers)


def _plain_of(block: nn.Module) -> PlainBlock:
    ref = next(iter(block.parameters()), None)
    plain = PlainBlock(
        cast(Any, block).deploy_conv_specs(),
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    return plain.train(block.training)


def _replace_blocks(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if _is_block(child):
            setattr(module, name, _plain_of(child))
            count += 1
        else:
            count += _replace_blocks(child)
    return count


def plain_twin(model: nn.Module) -> nn.Module:
    """Deploy-shaped twin of a training-form net from this package.

    A deep copy of ``model`` in which every re-parameterizable block is replaced by a
    :class:`PlainBlock` with freshly initialized ``Conv2d(bias=True)`` of exactly the geometry a
    perfect re-parameterizer produces; everything else (head, pooling) is copied as is. Outputs
    differ from ``model`` (random weights): it is the speed/shape reference. ``model`` is unchanged.
    """
    if _is_block(model):
        return _plain_of(model)
    twin = copy.deepcopy(model)
    if _replace_blocks(twin) == 0:
        raise ValueError(f"{type(model).__name__} has no block exposing deploy_conv_specs()")
    return twin
