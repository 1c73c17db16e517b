"""LLaMA (1/2/3.x) decoders: no q/k/v bias."""

from caq_lightning.models import register
from caq_lightning.models.adapter import DecoderAdapter

LLAMA = register(DecoderAdapter(model_type="llama"))
