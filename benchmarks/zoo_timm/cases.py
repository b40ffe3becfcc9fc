"""Where the timm sweep's models come from (:class:`ModelSource`: timm itself, or stand-ins in the tests), which of
them a run takes (:func:`select`), how one is sized up without building it (:func:`count_params`) and built
(:func:`build`)."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fxfuse.models import randomize_batchnorm_

SEED = 0
BATCH = 2


@dataclass
class ModelSource:
    """The model zoo as the harness sees it: ``list_models()`` (names), ``create(name, **kwargs)`` (a model with
    random weights; ``kwargs`` may hold ``img_size``, which a model that does not take it rejects with a
    ``TypeError``), ``deploy(model)`` (the zoo's own inference conversion, in place, returning the converted
    model) and ``versions`` (library → version, for the report). :func:`timm_source` is timm; tests pass
    hand-made stand-ins."""

    list_models: Callable[[], List[str]]
    create: Callable[..., nn.Module]
    deploy: Callable[[nn.Module], nn.Module]
    versions: Dict[str, str] = field(default_factory=dict)
    deploy_name: str = "deploy"


def timm_source() -> ModelSource:
    """timm: ``timm.list_models()``, ``timm.create_model(name, pretrained=False, **kwargs)`` and its deploy
    conversion ``timm.utils.model.reparameterize_model`` (RepVGG / MobileOne / FastViT-style blocks fused in place:
    each child's ``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()``)."""
    import timm

    try:
        from timm.utils.model import reparameterize_model
    except ImportError:  # older layouts export it from timm.models only
        from timm.models import reparameterize_model

    def create(name: str, **kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return ModelSource(
        list_models=lambda: list(timm.list_models()),
        create=create,
        deploy=lambda m: reparameterize_model(m, inplace=True),
        versions={"timm": timm.__version__},
        deploy_name="timm.utils.model.reparameterize_model",
    )


def select(names: Sequence[str], patterns: str = "", limit: int = 0) -> List[str]:
    """``names`` sorted, kept when they match one of the comma-separated glob ``patterns`` (all when empty), the
    first ``limit`` of them (all when 0)."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    picked = sorted(n for n in set(names) if not globs or any(fnmatch.fnmatchcase(n, g) for g in globs))
    return picked[:limit] if limit > 0 else picked


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[:limit] + " …"


def create(source: ModelSource, name: str, size: int, *, meta: bool) -> Tuple[nn.Module, Dict[str, Any], str]:
    """``(model, kwargs, note)``: ``name`` built with ``kwargs = {"img_size": size}`` where the model takes it, else
    with ``{}``; ``note`` says why ``img_size`` was rejected when the reason is not an unknown keyword (e.g. a size
    the architecture cannot take: its default build may still run at that size), else ``""``. ``meta``: built on
    the meta device (no memory, no init cost: for counting parameters), else with random weights (seed
    :data:`SEED`). Raises the error of the build without ``img_size`` when neither builds."""
    def make(**kwargs: Any) -> nn.Module:
        torch.manual_seed(SEED)
        with torch.device("meta") if meta else contextlib.nullcontext():
            return source.create(name, **kwargs)

    try:
        return make(img_size=size), {"img_size": size}, ""
    except TypeError as exc:
        if "img_size" in str(exc):  # the model does not take the argument: build it as it is
            return make(), {}, ""
        note = f"img_size={size} rejected ({first_line(exc, 200)})"
    except Exception as exc:  # the size does not suit the model (window sizes, ...): its default build may still run
        note = f"img_size={size} rejected ({first_line(exc, 200)})"
    return make(), {}, note


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (shared ones once; works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def build(source: ModelSource, name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """``name`` built with ``kwargs`` and random weights (seed :data:`SEED`), prepared by :func:`prepare`."""
    torch.manual_seed(SEED)
    return prepare(source.create(name, **kwargs))


def prepare(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm's statistics and affine randomized (:func:`fxfuse.models.randomize_batchnorm_`,
    seed :data:`SEED`, so that no fold is the identity), in float32 and eval mode."""
    randomize_batchnorm_(model, seed=SEED)
    return model.float().eval()


def example_input(size: int, batch: int = BATCH) -> Tensor:
    """``batch x 3 x size x size`` float32 standard normal (seeded: the same input for every model)."""
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(batch, 3, size, size, generator=g)


def deployed(source: ModelSource, model: nn.Module) -> nn.Module:
    """The zoo's own deploy conversion of a copy of ``model`` (``model`` is not modified)."""
    return source.deploy(copy.deepcopy(model)).eval()


def parse_count(text: str) -> int:
    """``"60M"`` / ``"1.5G"`` / ``"60e6"`` / ``"60000000"`` → an int."""
    text = text.strip()
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:])
    value = float(text[:-1]) * scale if scale else float(text)
    return int(value)


def maybe_int(x: Optional[int]) -> str:
    return "—" if x is None else str(x)
