"""The zoo: every ``torchvision.models.list_models()`` entry, how it is built and what inputs it gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn

from fxfuse.models import randomize_batchnorm_

SEED = 0

_TV = torchvision.models
KIND_MODULES = {
    "detection": _TV.detection,
    "segmentation": _TV.segmentation,
    "video": _TV.video,
    "optical_flow": _TV.optical_flow,
    "quantization": _TV.quantization,
}


def model_kind(name: str) -> str:
    """``classification``, ``detection``, ``segmentation``, ``video``, ``optical_flow`` or ``quantization``."""
    for kind, module in KIND_MODULES.items():
        if name in _TV.list_models(module=module):
            return kind
    return "classification"


def all_models() -> List[str]:
    return sorted(_TV.list_models())


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` (a tensor, or tuples / lists / dicts of them) with every floating tensor cast to ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(cast_floats(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class ZooCase:
    """How one zoo model is built and called. ``inputs(batch)`` returns the positional arguments of
    ``model(*args)``; ``batches`` are the two batch sizes checked (the first is the pass's example input)."""

    name: str
    kind: str
    build_kwargs: Dict[str, Any]
    inputs: Callable[[int], Tuple[Any, ...]]
    batches: Tuple[int, int] = (2, 1)
    note: str = ""

    def build(self) -> nn.Module:
        """The float32 model with random weights and randomized BatchNorm statistics, in eval mode."""
        torch.manual_seed(SEED)
        model = _TV.get_model(self.name, **self.build_kwargs)
        randomize_batchnorm_(model, seed=SEED)
        return model.eval()

    def input_desc(self) -> str:
        def desc(a: Any) -> str:
            if isinstance(a, Tensor):
                return "x".join(map(str, a.shape))
            if isinstance(a, (list, tuple)):
                return "[" + ", ".join(desc(v) for v in a) + "]"
            return repr(a)

        return ", ".join(desc(a) for a in self.inputs(self.batches[0]))


def _images(batch: int, *shape: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.rand(batch, *shape, generator=g)


def _image_list(batch: int, sizes: Sequence[Tuple[int, int]]) -> Tuple[List[Tensor]]:
    """Detection input: a list of ``[3, H, W]`` images in [0, 1] of different sizes."""
    g = torch.Generator().manual_seed(100 + batch)
    return ([torch.rand(3, *sizes[i % len(sizes)], generator=g) for i in range(batch)],)


def zoo_case(name: str) -> ZooCase:
    """The build arguments and inputs of ``name`` (small inputs to keep the sweep short)."""
    kind = model_kind(name)
    kw: Dict[str, Any] = {"weights": None}
    size = 64
    if kind == "quantization":
        kw["quantize"] = False
    if kind in ("detection", "segmentation"):
        kw["weights_backbone"] = None
    if kind == "detection":
        if name.startswith("ssd"):  # SSD resizes every image to its fixed 300 / 320 square
            return ZooCase(name, kind, kw, lambda b: _image_list(b, [(120, 160), (96, 128)]), (2, 1),
                           "images resized to the model's fixed size")
        kw.update(min_size=128, max_size=160)
        note = "min_size=128, max_size=160"
        if "rcnn" in name:  # fewer proposals (float64 box heads are slow); keep every box so outputs are not empty
            kw.update(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_score_thresh=0.0)
            note += ", 100 proposals, box_score_thresh=0"
        else:
            kw.update(score_thresh=0.0)
            note += ", score_thresh=0"
        return ZooCase(name, kind, kw, lambda b: _image_list(b, [(120, 160), (96, 128)]), (2, 1), note)
    if kind == "optical_flow":
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 128, 128), _images(b, 3, 128, 128, seed=7)),
                       (1, 2), "12 flow updates (default)")
    if kind == "video":
        if name == "s3d":  # ends in AvgPool3d((2, 7, 7)): needs 16 x 224 x 224
            return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 16, 224, 224),), (1, 2))
        if name.startswith("mvit"):  # position embeddings fixed to 16 x 224 x 224
            return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 16, 224, 224),), (1, 2))
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 4, 64, 64),), (1, 2))
    if name.startswith("vit_"):
        patch = 14 if name.endswith("_14") else int(name.rsplit("_", 1)[1])
        size = 4 * patch
        kw["image_size"] = size
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, size, size),), (2, 1), f"image_size={size}")
    if name == "maxvit_t":  # partition size 7 at every stage: 224 only
        return ZooCase(name, kind, kw, lambda b: (_images(b, 3, 224, 224),), (1, 2))
    if "inception_v3" in name:
        size = 80  # >= 75
    return ZooCase(name, kind, kw, lambda b: (_images(b, 3, size, size),), (2, 1))
