"""Model specs for the command line: build a model from a string, parse shapes, load checkpoints.

A SPEC is one of

* a reference net name from :func:`fxfuse.models.names` (``repvgg-article``, ``repvgg-A0``, ``dbb`` ...);
* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None)``;
* ``package.module:attr`` — ``attr`` (dotted attributes allowed) is an ``nn.Module`` instance, or a callable
  taking no arguments that returns one.

Every failure raises :class:`SpecError` with a one-line, user-facing message.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "SpecError",
    "LoadedModel",
    "load_model",
    "parse_shape",
    "parse_int_list",
    "default_shape",
    "load_weights",
    "parse_dtype",
]

#: Command-line names of the floating dtypes the harness runs in.
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class SpecError(ValueError):
    """A bad model spec, shape, dtype or checkpoint (reported as ``fxfuse: error: <message>``)."""


@dataclass
class LoadedModel:
    """A model built from a spec. ``kind`` is ``reference``, ``torchvision`` or ``callable``."""

    spec: str
    kind: str
    model: nn.Module
    default_shape: Optional[Tuple[int, ...]]


def parse_dtype(name: str) -> torch.dtype:
    """``"float16"`` → ``torch.float16`` (only the names in :data:`DTYPES`)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise SpecError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def parse_int_list(text: str, what: str = "value") -> List[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``; every entry must be a positive int."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts:
        raise SpecError(f"empty {what} list {text!r}")
    out: List[int] = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise SpecError(f"bad {what} {p!r} in {text!r}: expected positive integers separated by commas") \
                from None
        if v < 1:
            raise SpecError(f"bad {what} {v} in {text!r}: must be >= 1")
        out.append(v)
    return out


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` → ``(1, 3, 224, 224)``; all dims positive, at least 2 of them."""
    shape = tuple(parse_int_list(text.replace("x", ",").replace("X", ","), "dimension"))
    if len(shape) < 2:
        raise SpecError(f"bad input shape {text!r}: need at least batch and channel dims, e.g. 1,3,224,224")
    return shape


def default_shape(loaded: LoadedModel) -> Tuple[int, ...]:
    """The spec's natural NCHW input, or a :class:`SpecError` asking for ``--input-shape``."""
    if loaded.default_shape is None:
        raise SpecError(f"no default input shape for {loaded.spec!r}; pass --input-shape N,C,H,W")
    return loaded.default_shape


def load_model(spec: str) -> LoadedModel:
    """Build the model a SPEC names (training mode, as constructed; callers put it in eval)."""
    from .. import models

    spec = spec.strip()
    if not spec:
        raise SpecError("empty model spec")
    if spec in models.names() or (spec.endswith("-zoo") and spec[:-len("-zoo")] in models.names()):
        return LoadedModel(spec, "reference", models.build(spec), tuple(models.default_input_shape(spec)))
    if spec.startswith("torchvision:"):
        return _torchvision(spec, spec.split(":", 1)[1])
    if ":" in spec:
        return _callable(spec)
    raise SpecError(f"unknown model spec {spec!r}: use a reference name ({', '.join(models.names())}; "
                    "append -zoo for its model-zoo spelling), torchvision:NAME, or package.module:callable")


def _torchvision(spec: str, name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError:
        raise SpecError(f"{spec!r} needs torchvision, which is not installed") from None
    available = set(torchvision.models.list_models())
    if name not in available:
        close = sorted(n for n in available if name.lower()[:4] in n)[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise SpecError(f"unknown torchvision model {name!r}{hint}")
    try:
        model = torchvision.models.get_model(name, weights=None)
    except Exception as exc:  # constructor failures become a one-line message
        raise SpecError(f"could not build torchvision model {name!r}: {type(exc).__name__}: {exc}") from None
    size = 299 if name == "inception_v3" else 224
    shape = (1, 3, size, size) if name in torchvision.models.list_models(torchvision.models) else None
    return LoadedModel(spec, "torchvision", model, shape)


def _callable(spec: str) -> LoadedModel:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise SpecError(f"bad model spec {spec!r}: expected package.module:callable")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError or an error inside the module
        raise SpecError(f"cannot import {module_name!r} from spec {spec!r}: {type(exc).__name__}: {exc}") \
            from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"{module_name!r} has no attribute {attr_path!r} (spec {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as exc:
            raise SpecError(f"calling {spec!r} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise SpecError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise SpecError(f"{spec!r} is a {type(obj).__name__}, neither an nn.Module nor a callable returning one")
    return LoadedModel(spec, "callable", model, None)


def _extract_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise SpecError(f"{path} does not hold a state_dict (a mapping of names to tensors, possibly under a "
                    f"'state_dict' or 'model' key); got {type(obj).__name__}")


def _short(keys: List[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model`` with ``torch.load(path, weights_only=True)``.

    Accepts a raw state_dict or one stored under a ``state_dict`` / ``model`` key; a ``module.`` prefix
    (DataParallel) is stripped when the model's keys lack it. Missing, unexpected or wrongly shaped keys raise
    :class:`SpecError` listing them; nothing is loaded in that case.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"cannot read checkpoint {str(path)!r} with torch.load(weights_only=True): "
                        f"{type(exc).__name__}: {first}") from None
    sd = dict(_extract_state_dict(obj, path))
    own = model.state_dict()
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch (checkpoint vs model): {_short(wrong, 4)}")
    if problems:
        raise SpecError(f"checkpoint {str(path)!r} does not match the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
