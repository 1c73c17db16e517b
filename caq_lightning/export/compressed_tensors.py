"""The compressed-tensors-w4a16 format: the W4A16 view of an int4 export in compressed-tensors' ``pack-quantized``
layout (transformers, vLLM)."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from caq_lightning.errors import CAQError
from caq_lightning.export.formats import ExportFormat, atomic_dir, check_target, register_format, write_manifest
from caq_lightning.export.runtime import load_quantized
from caq_lightning.export.writer import PACKED_SUFFIXES, write_export
from caq_lightning.models import get_adapter
from caq_lightning.quant.hadamard import apply_hadamard
from caq_lightning.runtime import QuantRecipe
from caq_lightning.runtime.packing import Int4Linear, unpack_int4

if TYPE_CHECKING:
    from caq_lightning.config import QuantConfig

VIEW = "compressed-tensors-w4a16"
NEEDS_PACKAGE = "the W4A16 view needs the compressed-tensors package: pip install 'caq-lightning[interop]'"


def check_view_weights(w_bits: int) -> None:
    """Raise unless the weights are 4-bit: the view stores compressed-tensors' signed 4-bit codes."""
    if w_bits != 4:
        raise CAQError(
            f"the compressed-tensors W4A16 view holds 4-bit weights, got w_bits={w_bits}: calibrate with "
            "model.quant.w_bits=4 or choose the caq-int4 format"
        )


def write_compressed_tensors(
    export_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a W4A16 view of an int4 export in compressed-tensors' ``pack-quantized`` layout, which
    ``AutoModelForCausalLM.from_pretrained`` (with the compressed-tensors package) and vLLM read.

    The view has the export's 4-bit weight codes and scales. What it cannot express is dropped or folded: activation
    and KV-cache quantization are dropped (A16, FP cache), R3 is dropped (exact without KV quantization), and with
    the online R4 each ``down_proj`` is stored dense as W H^T (exact without activation quantization, but not 4-bit):
    transformers does not run compressed-tensors' online transforms. Asymmetric weights load in transformers only
    with ``CompressedTensorsConfig(dequantize=True)``.
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise CAQError(NEEDS_PACKAGE) from None

    source, tokenizer = load_quantized(export_dir, runtime="dequant")
    qcfg = source.config.quantization_config
    recipe = QuantRecipe.from_config_dict(qcfg)
    check_view_weights(recipe.w_spec.bits)
    dense_down = recipe.online_hadamard  # R4 pairs with the online x @ H, which the view has no place for
    state, codes, scales, zeros = _view_state(source, qcfg["modules"], dense_down)
    adapter = get_adapter(source.config)
    dtype = state[adapter.embed_key].dtype
    r4 = [name for name, role in adapter.projections.items() if role.online_r4]  # stored dense with R4 folded

    config = source.config.__class__.from_dict(source.config.to_dict())
    del config.quantization_config
    config._attn_implementation = "sdpa"
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    spec = recipe.w_spec
    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric,
        strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None,
    )  # fmt: skip
    ignore = [adapter.head_name] + ([f"re:.*{name}$" for name in r4] if dense_down else [])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    for name in codes:
        module = model.get_submodule(name)
        module.weight_scale = nn.Parameter(scales[name].clone(), requires_grad=False)  # fp32, as exported
        if not spec.symmetric:  # compressed-tensors codes are signed: ours minus 8, zero points too
            module.weight_zero_point.data.copy_(zeros[name].to(torch.int16) - 8)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for name, expected in codes.items():  # compressed-tensors re-derives the codes: they must be ours, bit for bit
        module = model.get_submodule(name)
        got = unpack_from_int32(module.weight_packed, spec.bits, tuple(module.weight_shape.tolist())) + 8
        if not torch.equal(got.to(torch.uint8), expected):
            raise CAQError(f"compressed-tensors re-quantized {name} to other codes than the export: report this")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        compressor.update_config(str(folder))
        config_path = folder / "config.json"
        data = json.loads(config_path.read_text())
        data["caq_w4a16_view"] = {
            "source_quantization": qcfg,
            "dropped": "activation and KV-cache quantization, R3 (exact without KV quantization)",
            "dense": "down_proj stores W H^T (R4 folded; not 4-bit)" if dense_down else None,
        }
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_manifest(folder, format=VIEW)

    return atomic_dir(out_dir, overwrite, write)


def _view_state(source: PreTrainedModel, modules: list[str], dense_down: bool) -> tuple[dict, dict, dict, dict]:
    """The view's float state dict (decoder Linears dequantized, R4 folded into the dense ones) and the export's
    codes (+ 8 for symmetric), scales and zeros of the Linears that stay 4-bit, by module name."""
    state = {key: value for key, value in source.state_dict().items() if not key.endswith(PACKED_SUFFIXES)}
    adapter = get_adapter(source.config)
    dtype = state[adapter.embed_key].dtype
    codes, scales, zeros = {}, {}, {}
    for name in modules:
        layer: Int4Linear = source.get_submodule(name)
        w = layer.dequantized_weight()
        if dense_down and adapter.role(name).online_r4:
            w = apply_hadamard(w, transpose=True)
        else:
            codes[name], scales[name], zeros[name] = unpack_int4(layer.qweight), layer.scales, layer.zeros
        state[f"{name}.weight"] = w.to(dtype)
    return state, codes, scales, zeros


@register_format
class CompressedTensorsW4A16(ExportFormat):
    """The W4A16 view, written from the folded model through a temporary int4 export (the view is defined on it)."""

    name = VIEW
    title = "compressed-tensors W4A16 view"

    def check(self, quant: QuantConfig) -> None:
        check_view_weights(quant.w_bits)
        if importlib.util.find_spec("compressed_tensors") is None:
            raise CAQError(NEEDS_PACKAGE)

    def write(self, model: PreTrainedModel, recipe: QuantRecipe, tokenizer, target: Path, overwrite: bool) -> Path:
        target = check_target(target, overwrite)  # before the int4 export is written
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-int4-") as tmp:
            int4 = write_export(model, recipe, tokenizer, Path(tmp) / "int4")
            return write_compressed_tensors(int4, target, overwrite)
