"""Running or tracing a model without side effects on its plain attributes.

A forward may write plain attributes (``if self.anchor is None: self.anchor = torch.zeros_like(y)``, a counter, a
cache dict). The pass runs the model several times (float64 reference, per-sub-module capture, checks) and traces
it; symbolic tracing even stores ``torch.fx.Proxy`` objects there. What the user gets back must be in the state
the user's model was in, so every run and trace is bracketed by :func:`attributes_preserved`: afterwards each
module's plain attributes are the ones it had before (added ones removed, rebound ones restored, lists / dicts /
sets mutated in place refilled). Parameters, buffers, sub-modules and ``nn.Module``'s own bookkeeping (hooks,
``training``) are not plain attributes and are left alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

from torch import nn

# nn.Module's own instance attributes (hook dicts, ``training``, the parameter/buffer/module stores).
MODULE_INTERNALS = frozenset(vars(nn.Module()))
_CONTAINERS = (list, dict, set)
_MISSING = object()


def _contents(value: Any) -> Any:
    """A shallow copy of a list / dict / set (to undo in-place mutation), else ``None``."""
    return value.copy() if type(value) in _CONTAINERS else None


def _same_contents(value: Any, contents: Any) -> bool:
    """Whether a container still holds the very same objects (by identity: tensors do not compare to a bool)."""
    if isinstance(value, dict):
        return value.keys() == contents.keys() and all(value[k] is contents[k] for k in value)
    if isinstance(value, list):
        return len(value) == len(contents) and all(a is b for a, b in zip(value, contents))
    return value == contents  # a set: members are hashed by identity or value already


@dataclass
class AttributeState:
    """The plain attributes of every module of a tree at one moment (values by reference, containers' contents
    shallow-copied)."""

    saved: List[Tuple[nn.Module, Dict[str, Tuple[Any, Any]]]]

    @classmethod
    def of(cls, root: nn.Module) -> AttributeState:
        return cls([(mod, {k: (v, _contents(v)) for k, v in vars(mod).items() if k not in MODULE_INTERNALS})
                    for mod in root.modules()])

    def restore(self) -> None:
        """Put every saved module's plain attributes back as they were."""
        for mod, attrs in self.saved:
            current = vars(mod)
            for key in [k for k in current if k not in MODULE_INTERNALS and k not in attrs]:
                del current[key]  # added by the run (a cache, a ``_tensor_constantN`` of a trace)
            for key, (value, contents) in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value  # bypasses nn.Module.__setattr__: it was a plain attribute
                if contents is not None and not _same_contents(value, contents):
                    value.clear()
                    if isinstance(value, list):
                        value.extend(contents)
                    else:
                        value.update(contents)


@contextmanager
def attributes_preserved(root: nn.Module) -> Iterator[None]:
    """Run the body, then restore the plain attributes of every module of ``root`` (see the module docstring)."""
    state = AttributeState.of(root)
    try:
        yield
    finally:
        state.restore()
