"""The integer KV cache of the W4A4 runtime: :class:`IntKVLayer` holds R3-rotated keys and values as int8 codes plus
fp32 scales per token and head (and zeros only for 8-bit asymmetric codes) and dequantizes them on read; attention
itself keeps its float matmuls (SDPA)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from caq_lightning.errors import CAQError
from caq_lightning.quant.attention import AttnQuant
from caq_lightning.quant.hadamard import apply_hadamard
from caq_lightning.quant.quantizer import QuantSpec, dequantize
from caq_lightning.runtime.int_linear import centered, quantize_rows


def kv_codes(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, H, T, D) -> codes int8 (B, H, T, D), scale fp32 (B, H, T, G), zero (B, H, T, G) or None (centered)."""
    codes, scale, zero = quantize_rows(x.reshape(-1, x.shape[-1]), spec)
    lead = x.shape[:-1]
    return codes.view(*lead, -1), scale.view(*lead, -1), None if zero is None else zero.view(*lead, -1)


def kv_values(codes: Tensor, scale: Tensor, zero: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`kv_codes`, as :func:`caq_lightning.quant.quantizer.dequantize` (the same numbers)."""
    grouped = codes.float().unflatten(-1, (scale.shape[-1], -1))
    zero = 0.0 if zero is None else zero.unsqueeze(-1)
    return dequantize(grouped, scale.unsqueeze(-1), zero).to(dtype)


class IntKVLayer(DynamicLayer):
    """A cache layer holding keys (after R3) and values as int8 codes plus fp32 scales (and zeros for 8-bit
    asymmetric codes); with ``kv_bits=16`` it holds the rotated keys and the values in the model dtype."""

    def __init__(self, spec: QuantSpec, hadamard_k: bool):
        DynamicLayer.__init__(self)  # not super(): in IntKVSlidingLayer that would be the sliding layer's __init__
        self.spec, self.hadamard_k = spec, hadamard_k
        self.state = ("keys", "values")
        if spec.enabled:
            self.state += ("key_scales", "value_scales") + (() if centered(spec) else ("key_zeros", "value_zeros"))
        self.key_zeros = self.value_zeros = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        codes = torch.int8 if self.spec.enabled else key_states.dtype
        for name in self.state:  # empty 1-d tensors concatenate with any shape, as in DynamicLayer
            dtype = codes if name in ("keys", "values") else torch.float32  # (cat would promote int8 to float)
            setattr(self, name, torch.tensor([], dtype=dtype, device=self.device))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.hadamard_k:
            key_states = apply_hadamard(key_states)
        if self.spec.enabled:
            names = ("keys", "key_scales", "key_zeros", "values", "value_scales", "value_zeros")
            new = dict(zip(names, (*kv_codes(key_states, self.spec), *kv_codes(value_states, self.spec))))
        else:
            new = {"keys": key_states, "values": value_states}
        for name in self.state:
            setattr(self, name, torch.cat([getattr(self, name), new[name]], dim=-2))
        return self.read()

    def read(self) -> tuple[Tensor, Tensor]:
        """The cached keys and values, dequantized to the model dtype (B, H, T, D)."""
        if not self.spec.enabled:
            return self.keys, self.values
        return (
            kv_values(self.keys, self.key_scales, self.key_zeros, self.dtype),
            kv_values(self.values, self.value_scales, self.value_zeros, self.dtype),
        )

    def _map(self, fn) -> None:  # noqa: ANN001
        if self.get_seq_length() > 0:
            for name in self.state:
                setattr(self, name, fn(getattr(self, name)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove:
            self._map(lambda t: t[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        for name in self.state:
            setattr(self, name, None)
        self.is_initialized = False


class IntKVSlidingLayer(IntKVLayer, DynamicSlidingWindowLayer):
    """:class:`IntKVLayer` for sliding-window attention (Mistral): keeps the codes of the last window - 1 tokens."""

    def __init__(self, spec: QuantSpec, hadamard_k: bool, sliding_window: int):
        DynamicSlidingWindowLayer.__init__(self, sliding_window)
        IntKVLayer.__init__(self, spec, hadamard_k)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.cumulative_length += key_states.shape[-2]
        full = IntKVLayer.update(self, key_states, value_states)
        self._map(lambda t: t[..., -self.sliding_window + 1 :, :])
        return full


def use_int_kv_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Attention pre-hook: the call's cache gets an :class:`IntKVLayer` at this layer (``cache`` in transformers
    >= 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    module.caq_kv_cached = cache is not None
    if cache is None:
        return
    idx, cfg = module.layer_idx, module.caq_attn
    while len(cache.layers) <= idx:  # a cache built without a config grows its layers lazily
        cache.layers.append(DynamicLayer())
    layer = cache.layers[idx]
    if isinstance(layer, IntKVLayer):
        return
    if type(layer) is DynamicSlidingWindowLayer and not layer.is_initialized:
        cache.layers[idx] = IntKVSlidingLayer(cfg.kv_spec, cfg.hadamard_qk, layer.sliding_window)
        return
    if type(layer) is not DynamicLayer or layer.is_initialized:
        raise CAQError(
            f"the int runtime keeps its own integer KV cache, but got a filled or non-dynamic {type(layer).__name__}:"
            " pass no cache (or an empty DynamicCache), or load with runtime='dequant'"
        )
    cache.layers[idx] = IntKVLayer(cfg.kv_spec, cfg.hadamard_qk)


def int_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """q (after R3 here), k, v (B, H, T, D) from the integer cache; without a cache, K and V go through the same
    rotation and codes here. The attention itself is SDPA in the model dtype."""
    cfg: AttnQuant = module.caq_attn
    if cfg.hadamard_qk:
        query = apply_hadamard(query)
    if not getattr(module, "caq_kv_cached", False):
        layer = IntKVLayer(cfg.kv_spec, cfg.hadamard_qk)
        key, value = layer.update(key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
