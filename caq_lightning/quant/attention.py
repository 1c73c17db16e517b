"""KV-cache quantization and the online Q/K Hadamard (R3) through transformers' attention-function hook.

The modeling code is untouched: every attention module whose ``caq_attn`` attribute is set routes its
post-RoPE q/k/v through :func:`caq_attention`, which then delegates to transformers' own SDPA path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from caq_lightning.models import get_adapter
from caq_lightning.quant.hadamard import apply_hadamard
from caq_lightning.quant.mode import Mode
from caq_lightning.quant.quantizer import QuantSpec, fake_quantize

ATTN_IMPLEMENTATION = "caq_sdpa"


@dataclass
class AttnQuant:
    """Per-attention-module settings read by :func:`caq_attention`."""

    kv_spec: QuantSpec
    hadamard_qk: bool
    mode: Mode  # which parts are live


def caq_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """q, k, v: (B, H, T, head_dim) after RoPE (k, v include the cache). Quantizes K and V per token and head."""
    cfg: AttnQuant | None = getattr(module, "caq_attn", None)
    if cfg is not None:
        if cfg.mode.transform and cfg.hadamard_qk:
            # q·k is unchanged by a shared orthogonal map, but K's outliers are spread before quantization.
            query, key = apply_hadamard(query), apply_hadamard(key)
        if cfg.mode.quant and cfg.kv_spec.enabled:
            # Per-token quantization is idempotent, so re-quantizing cached entries each step changes nothing.
            key, value = fake_quantize(key, cfg.kv_spec), fake_quantize(value, cfg.kv_spec)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the hook and its mask function (without the mask function, padded batches go silently wrong)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, caq_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def use_caq_attention(model: nn.Module, kv_spec: QuantSpec, hadamard_qk: bool, mode: Mode) -> None:
    """Switch a transformers model to the CAQ attention function and attach per-module settings."""
    model.set_attn_implementation(register_attention())
    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        adapter.attention(layer).caq_attn = AttnQuant(kv_spec=kv_spec, hadamard_qk=hadamard_qk, mode=mode)
