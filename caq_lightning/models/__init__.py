"""Per-family adapters: add a family with one module here that calls :func:`register` (it is imported
automatically); nothing else in the package changes."""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PretrainedConfig

from caq_lightning.errors import CAQError
from caq_lightning.models.adapter import DecoderAdapter, ProjectionRole, RMSNorm

ADAPTERS: dict[str, DecoderAdapter] = {}


def register(adapter: DecoderAdapter) -> DecoderAdapter:
    """Make ``adapter.model_type`` a supported family."""
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def get_adapter(config: PretrainedConfig) -> DecoderAdapter:
    """The adapter for a model config, or a CAQError naming the supported families."""
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        raise CAQError(
            f"unsupported architecture '{config.model_type}': CAQ supports {', '.join(ADAPTERS)}"
        ) from None


def check_architecture(model_type: str | None, where: str, kind: str = "architecture") -> None:
    """Raise unless ``model_type`` is a family CAQ has an adapter for; ``where`` names the file or directory.

    One rule for every source (config directories, safetensors checkpoints, GGUF files), before any weight loads.
    """
    supported = supported_model_types()  # the families with an adapter
    if model_type not in supported:
        raise CAQError(
            f"unsupported {kind} '{model_type}' in {where}: CAQ supports {', '.join(supported)}"
        )


# Every family module registers its adapter on import: the first ones in the order error messages list them, then
# any other module of this package.
_FIRST = ("llama", "qwen2", "mistral")
for _name in (*_FIRST, *sorted({m.name for m in pkgutil.iter_modules(__path__)} - {*_FIRST, "adapter"})):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "ADAPTERS", "DecoderAdapter", "ProjectionRole", "RMSNorm", "check_architecture", "get_adapter", "register",
    "supported_model_types",
]  # fmt: skip
