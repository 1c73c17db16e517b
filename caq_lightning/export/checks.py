"""What an int4 export can hold, as pure checks on the run's settings: export callbacks call them in ``setup``, so a
setting the export cannot write fails before the first step, not after calibration."""

from __future__ import annotations

from caq_lightning.config import QuantConfig
from caq_lightning.errors import CAQError

MAX_WEIGHT_BITS = 4  # codes are stored as nibbles; symmetric and asymmetric weights, any group size, fit


def check_exportable(quant: QuantConfig) -> None:
    """Raise CAQError naming the setting of ``quant`` that an int4 export cannot hold.

    Activation and KV bits are not limited: the integer runtime falls back to dequantizing where codes do not fit
    int8. Sharding is the callback's own check (it depends on the strategy, not the settings).
    """
    if quant.w_bits > MAX_WEIGHT_BITS:
        state = "leaves weights in full precision" if quant.w_bits == 16 else f"gives {quant.w_bits}-bit codes"
        raise CAQError(
            f"the int4 export holds weights of at most {MAX_WEIGHT_BITS} bits, but quant.w_bits={quant.w_bits} "
            f"{state}: calibrate with --model.quant.w_bits={MAX_WEIGHT_BITS} (or fewer), or remove Int4Export from "
            "trainer.callbacks"
        )
