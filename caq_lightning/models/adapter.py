"""What CAQ needs to know about a decoder family: where its blocks, norms and projections live."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

ATTN_INPUTS = ("q_proj", "k_proj", "v_proj")
MLP_INPUTS = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class DecoderAdapter:
    """Module layout of a LLaMA-style decoder (pre-norm, RMSNorm, gated MLP, RoPE, GQA)."""

    model_type: str
    qkv_bias: bool = False

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    def embed(self, model: PreTrainedModel) -> nn.Embedding:
        return model.model.embed_tokens

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: PreTrainedModel) -> nn.Linear:
        return model.lm_head

    def dims(self, config: PretrainedConfig) -> dict[str, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return {
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": head_dim,
        }
