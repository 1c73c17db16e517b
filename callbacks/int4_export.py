"""``Int4Export``: the caq-int4 :class:`~callbacks.export.Export` under the class path earlier configs name."""

from __future__ import annotations

from callbacks.export import Export
from caq_lightning.export import FORMAT


class Int4Export(Export):
    """:class:`~callbacks.export.Export` with ``format="caq-int4"`` and its earlier arguments.

    Args:
        out_dir: export directory; default ``<trainer.log_dir>/export``.
        gptq: kept for older configs; the rounding is ``model.quant.w_rounding`` (a different value is refused).
        overwrite: replace a non-empty ``out_dir``.
        format: another export format by name (``compressed-tensors-w4a4``, ``compressed-tensors-w4a8``: see
            docs/serve.md) instead of the packed int4 one; it checks the student in ``setup``.
    """

    def __init__(
        self, out_dir: str | None = None, gptq: bool | None = None, overwrite: bool = False, format: str = FORMAT
    ):
        super().__init__(format, out_dir, gptq, overwrite)
