"""``Int4Export``: the caq-int4 :class:`~callbacks.export.Export` under the class path earlier configs name."""

from __future__ import annotations

from callbacks.export import Export
from caq_lightning.export import FORMAT


class Int4Export(Export):
    """:class:`~callbacks.export.Export` with ``format="caq-int4"`` and its earlier arguments.

    Args:
        out_dir: export directory; default ``<trainer.log_dir>/export``.
        gptq: GPTQ rounding on the training data instead of RTN.
        overwrite: replace a non-empty ``out_dir``.
    """

    def __init__(self, out_dir: str | None = None, gptq: bool = False, overwrite: bool = False):
        super().__init__(FORMAT, out_dir, gptq, overwrite)
