"""Export formats by name: each checks in ``setup`` that it can express the student, and writes a folded one.

Minimal registry for the serving formats (:mod:`caq_lightning.export.serving`); the lead reconciles it with the
structure branch's registry, which has exactly this interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from caq_lightning.errors import CAQError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from caq_lightning.config import QuantConfig
    from caq_lightning.fold import QuantRecipe


class ExportFormat:
    """One way to write a folded student. Subclasses set ``name`` and register with :func:`register_format`."""

    name: ClassVar[str]

    def check(self, quant: QuantConfig) -> None:
        """Raise CAQError naming the setting to change when this format cannot express ``quant`` (called in setup)."""

    def write(
        self, model: PreTrainedModel, recipe: QuantRecipe, tokenizer: Any, target: Path, overwrite: bool
    ) -> Path:
        raise NotImplementedError


FORMATS: dict[str, type[ExportFormat]] = {}


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str) -> ExportFormat:
    """A new instance of the format called ``name``."""
    import caq_lightning.export.serving  # noqa: F401  registers its formats (it imports this module)

    if name not in FORMATS:
        raise CAQError(f"unknown export format '{name}': choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]()
