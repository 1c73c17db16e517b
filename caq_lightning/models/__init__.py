"""Per-family adapters. Add a family by declaring its :class:`DecoderAdapter` and listing it here."""

from transformers import PretrainedConfig

from caq_lightning.errors import CAQError
from caq_lightning.models.adapter import ATTN_INPUTS, MLP_INPUTS, DecoderAdapter
from caq_lightning.models.llama import LLAMA
from caq_lightning.models.mistral import MISTRAL
from caq_lightning.models.qwen2 import QWEN2

ADAPTERS = {a.model_type: a for a in (LLAMA, QWEN2, MISTRAL)}


def get_adapter(config: PretrainedConfig) -> DecoderAdapter:
    """The adapter for a model config, or a CAQError naming the supported families."""
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        raise CAQError(
            f"unsupported architecture '{config.model_type}': CAQ supports {', '.join(ADAPTERS)}"
        ) from None


__all__ = ["ADAPTERS", "ATTN_INPUTS", "MLP_INPUTS", "DecoderAdapter", "get_adapter"]
