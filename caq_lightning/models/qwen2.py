"""Qwen2 / Qwen2.5 decoders: q/k/v carry biases, which rotate with the v heads (R2) and smoothing."""

from caq_lightning.models import register
from caq_lightning.models.adapter import DecoderAdapter

QWEN2 = register(DecoderAdapter(model_type="qwen2"))
