"""The runtime of a folded CAQ model: what stays online after folding.

- :mod:`~caq_lightning.runtime.recipe`: :class:`QuantRecipe`, the bits and transforms of a run;
- :mod:`~caq_lightning.runtime.packing`: two 4-bit codes per byte and :class:`Int4Linear`;
- :mod:`~caq_lightning.runtime.int_linear`: activation codes and :class:`IntLinear` (``torch._int_mm``);
- :mod:`~caq_lightning.runtime.int_kv`: the integer KV cache;
- :mod:`~caq_lightning.runtime.attach`: :func:`attach_runtime` (fake-quant) and :func:`attach_int_runtime` (integer).
"""

from caq_lightning.runtime.attach import attach_int_runtime, attach_runtime
from caq_lightning.runtime.int_linear import IntLinear
from caq_lightning.runtime.packing import Int4Linear
from caq_lightning.runtime.recipe import QuantRecipe

__all__ = ["Int4Linear", "IntLinear", "QuantRecipe", "attach_int_runtime", "attach_runtime"]
