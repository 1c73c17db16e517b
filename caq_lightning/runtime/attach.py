"""Attach the online parts of a folded model: what cannot be folded into its weights runs as hooks.

:func:`attach_runtime` fake-quantizes (the student's own numbers, on float weights or :class:`Int4Linear`);
:func:`attach_int_runtime` runs the decoder Linears on integer codes and keeps an integer KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from caq_lightning.errors import CAQError
from caq_lightning.models import get_adapter
from caq_lightning.quant.attention import AttnQuant, use_caq_attention
from caq_lightning.quant.hadamard import online_r4
from caq_lightning.quant.mode import Mode
from caq_lightning.quant.quantizer import QuantSpec, fake_quantize
from caq_lightning.runtime.int_kv import int_attention, use_int_kv_layer
from caq_lightning.runtime.int_linear import InputCodes, IntLinear, Residency
from caq_lightning.runtime.packing import Int4Linear
from caq_lightning.runtime.recipe import QuantRecipe

ATTN_IMPLEMENTATION = "caq_int_sdpa"


def attach_runtime(
    model: PreTrainedModel, recipe: QuantRecipe, linear_types: tuple[type[nn.Module], ...] = (nn.Linear,)
) -> PreTrainedModel:
    """Install the online parts: R4 + per-token activation quantization before each decoder Linear, R3 + KV quant.

    ``linear_types``: the module classes that count as decoder Linears (the int4 loader passes its packed Linear).
    """
    adapter = get_adapter(model.config)
    for name, module in adapter.layers(model).named_modules():
        if isinstance(module, linear_types):
            role = adapter.role(name)
            r4 = recipe.online_hadamard and role is not None and role.online_r4
            module.register_forward_pre_hook(_input_hook(online_r4(recipe.profile) if r4 else None, recipe.a_spec))
    use_caq_attention(model, recipe.kv_spec, recipe.hadamard_qk, Mode(transform=True, quant=True))
    return model


def _input_hook(hadamard: Callable[[Tensor], Tensor] | None, a_spec: QuantSpec):
    def hook(module: nn.Module, args: tuple[Tensor, ...]):
        x = args[0]
        if hadamard is not None:
            x = hadamard(x)
        return (fake_quantize(x, a_spec),)

    return hook


def attach_int_runtime(model: nn.Module, recipe, residency: Residency = "int8") -> nn.Module:  # noqa: ANN001
    """Replace every :class:`Int4Linear` of the decoder by an :class:`IntLinear`, and switch attention to R3 on q
    plus the integer KV cache. ``recipe``: the export's :class:`QuantRecipe`."""
    if residency not in ("int8", "packed"):
        raise CAQError(f"residency must be 'int8' or 'packed', got {residency!r}")
    adapter = get_adapter(model.config)
    for parent in adapter.layers(model).modules():
        shared = InputCodes()  # children of one module (self_attn, mlp) that read the same tensor share codes
        for leaf, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                role = adapter.role(leaf)
                r4 = recipe.online_hadamard and role is not None and role.online_r4
                layer = IntLinear.from_int4(child, recipe.a_spec, online_r4(recipe.profile) if r4 else None, residency)
                layer.shared_input = shared
                setattr(parent, leaf, layer)
    AttentionInterface.register(ATTN_IMPLEMENTATION, int_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # without it padded batches go silently wrong
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for layer in adapter.layers(model):
        attention = adapter.attention(layer)
        attention.caq_attn = AttnQuant(kv_spec=recipe.kv_spec, hadamard_qk=recipe.hadamard_qk, mode=Mode())
        attention.register_forward_pre_hook(use_int_kv_layer, with_kwargs=True)
    return model
