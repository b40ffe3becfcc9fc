"""The intermediate representation rule authors work with.

* :mod:`.algebra` — :class:`ConvSpec` (every linear op of a conv net as one conv), :class:`ChannelAffine`, and
  :class:`ConvGeometry` (a conv's hyper-parameters without tensors: the one geometry type).
* :mod:`.folds` — the fold math as pure tensor functions, with the ``why_not_*`` exactness conditions.
* :mod:`.ops` — the op table: every spelling of every op fxfuse knows.
* :mod:`.read` — :class:`Reader` (``ctx.read``): a node seen as a conv / affine / linear / sum / pad, or a
  :class:`Refusal` saying why folding through it would be wrong.
"""

from . import folds, ops
from .algebra import ChannelAffine, ConvGeometry, ConvSpec, as_tuple
from .read import AffineRead, ConvRead, LinearRead, Reader, Refusal, SumRead, arg, shape_of

__all__ = ["AffineRead", "ChannelAffine", "ConvGeometry", "ConvRead", "ConvSpec", "LinearRead", "Reader", "Refusal",
           "SumRead", "arg", "as_tuple", "folds", "ops", "shape_of"]
