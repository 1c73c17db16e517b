"""LLaMA (1/2/3.x) decoders: no q/k/v bias."""

from caq_lightning.models.adapter import DecoderAdapter

LLAMA = DecoderAdapter(model_type="llama", qkv_bias=False)
