"""What CAQ knows about a decoder family, as data: where its layers, attention, MLP, norms, embeddings and head
live, what part each projection plays in the transforms, which smoothing scales there are and how its norm
normalises and folds. Nothing else in the package reads the layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel


class ProjectionRole(NamedTuple):
    """The part one decoder Linear plays in the transforms (see :mod:`caq_lightning.quant.transforms`).

    block:        "attention" or "mlp": the submodule of the layer that holds it.
    fused_norm:   the layer norm whose weight moves into this Linear's input columns (None: no norm before it).
    smoothing:    the smoothing scale on its input side: "qkv"/"upgate" divide the norm output, "vo" (with R2)
                  and "down" scale the input columns of o_proj / down_proj.
    output_scale: the scale that divides its output rows, pairing with the next Linear's input: "vo" (v heads,
                  with R2) or "down"; None if none.
    r1_side:      "input" (reads the rotated residual stream: W R1) or "output" (writes it: R1^T W).
    online_r4:    an online Hadamard on its input (R4), folded into its weight.
    """

    block: Literal["attention", "mlp"]
    fused_norm: str | None
    smoothing: Literal["qkv", "upgate", "vo", "down"]
    output_scale: Literal["vo", "down"] | None
    r1_side: Literal["input", "output"]
    online_r4: bool


LLAMA_PROJECTIONS: dict[str, ProjectionRole] = {
    "q_proj": ProjectionRole("attention", "input_layernorm", "qkv", None, "input", False),
    "k_proj": ProjectionRole("attention", "input_layernorm", "qkv", None, "input", False),
    "v_proj": ProjectionRole("attention", "input_layernorm", "qkv", "vo", "input", False),
    "o_proj": ProjectionRole("attention", None, "vo", None, "output", False),
    "gate_proj": ProjectionRole("mlp", "post_attention_layernorm", "upgate", None, "input", False),
    "up_proj": ProjectionRole("mlp", "post_attention_layernorm", "upgate", "down", "input", False),
    "down_proj": ProjectionRole("mlp", None, "down", None, "output", True),
}
# layer norm -> the smoothing scale that divides its output
LLAMA_NORMS = {"input_layernorm": "qkv", "post_attention_layernorm": "upgate"}
# smoothing scale -> the width it scales (a key of DecoderAdapter.dims), in the order the parameters are made
LLAMA_SMOOTHING = {"qkv": "hidden", "upgate": "hidden", "down": "intermediate", "vo": "kv_width"}


class RMSNorm:
    """The norm kind y = x / rms(x) * g (LLaMA, Qwen2, Mistral) and its fold rule: the per-channel factor g moves
    into the next Linears' input columns, and the folded norm keeps only the smoothing, 1 / s.

    Another kind (e.g. Gemma's x / rms(x) * (1 + g)) is a subclass that overrides what differs.
    """

    def normalize(self, norm: nn.Module, x: Tensor) -> Tensor:
        """The norm's output without its per-channel factor, fp32: x / rms(x)."""
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    def scale(self, norm: nn.Module) -> Tensor:
        """The per-channel factor the norm applies after normalising, which folds into the next Linears."""
        return norm.weight

    def folded_weight(self, norm: nn.Module, divisor: Tensor | None) -> Tensor:
        """The weight that makes the folded norm output x / rms(x) / s (x / rms(x) without smoothing), fp32."""
        return torch.ones_like(norm.weight, dtype=torch.float32) if divisor is None else 1 / divisor


@dataclass(frozen=True)
class DecoderAdapter:
    """Module layout of a LLaMA-style decoder (pre-norm, RMSNorm, gated MLP, RoPE, GQA), by attribute name."""

    model_type: str
    decoder: str = "model"  # the decoder stack under the causal LM
    layers_name: str = "layers"
    embed_name: str = "embed_tokens"
    final_norm_name: str = "norm"
    head_name: str = "lm_head"
    attention_name: str = "self_attn"
    mlp_name: str = "mlp"
    projections: dict[str, ProjectionRole] = field(default_factory=lambda: dict(LLAMA_PROJECTIONS))
    norms: dict[str, str] = field(default_factory=lambda: dict(LLAMA_NORMS))
    smoothing: dict[str, str] = field(default_factory=lambda: dict(LLAMA_SMOOTHING))
    norm_kind: RMSNorm = field(default_factory=RMSNorm)

    # ---- getters and setters --------------------------------------------------------------------------------------

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return getattr(getattr(model, self.decoder), self.layers_name)

    def embed(self, model: PreTrainedModel) -> nn.Embedding:
        return getattr(getattr(model, self.decoder), self.embed_name)

    @property
    def embed_key(self) -> str:
        """State-dict key of the input embedding."""
        return f"{self.decoder}.{self.embed_name}.weight"

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return getattr(getattr(model, self.decoder), self.final_norm_name)

    def set_final_norm(self, model: PreTrainedModel, module: nn.Module) -> None:
        setattr(getattr(model, self.decoder), self.final_norm_name, module)

    def lm_head(self, model: PreTrainedModel) -> nn.Module:
        return getattr(model, self.head_name)

    def set_lm_head(self, model: PreTrainedModel, module: nn.Module) -> None:
        setattr(model, self.head_name, module)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def norm(self, layer: nn.Module, name: str) -> nn.Module:
        return getattr(layer, name)

    def set_norm(self, layer: nn.Module, name: str, module: nn.Module) -> None:
        setattr(layer, name, module)

    def _block(self, layer: nn.Module, name: str) -> nn.Module:
        return self.attention(layer) if self.projections[name].block == "attention" else self.mlp(layer)

    def projection(self, layer: nn.Module, name: str) -> nn.Module:
        return getattr(self._block(layer, name), name)

    def set_projection(self, layer: nn.Module, name: str, module: nn.Module) -> None:
        setattr(self._block(layer, name), name, module)

    def role(self, module_name: str) -> ProjectionRole | None:
        """The role of a decoder Linear from its (qualified) module name; None for any other module."""
        return self.projections.get(module_name.rpartition(".")[2])

    def dims(self, config: PretrainedConfig) -> dict[str, int]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return {
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": head_dim,
            "kv_width": config.num_key_value_heads * head_dim,
        }
