"""Mistral decoders: LLaMA layout with sliding-window attention, which the registered SDPA mask handles."""

from caq_lightning.models import register
from caq_lightning.models.adapter import DecoderAdapter

MISTRAL = register(DecoderAdapter(model_type="mistral"))
