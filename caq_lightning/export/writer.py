"""The caq-int4 format: packed 4-bit weights, config with its quantization_config, tokenizer and a manifest of
sha256 sums, written atomically (the layout is described in :mod:`caq_lightning.export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.errors import CAQError
from caq_lightning.export.formats import ExportFormat, atomic_dir, register_format, write_manifest
from caq_lightning.quant.quantizer import QuantSpec
from caq_lightning.runtime import QuantRecipe
from caq_lightning.runtime.packing import SYMMETRIC_OFFSET, Int4Linear

if TYPE_CHECKING:
    from caq_lightning.config import QuantConfig

FORMAT = "caq-int4"
FORMAT_VERSION = 1  # of the layout below; a loader refuses a newer one
WEIGHTS = "model.safetensors"
PACKED_SUFFIXES = (".qweight", ".scales", ".zeros")  # kept as stored; every other tensor takes the model dtype


def check_int4_weights(w_spec: QuantSpec) -> None:
    """Raise unless the weights are quantized to at most 4 bits, so their codes fit a nibble."""
    if not w_spec.enabled or w_spec.bits > 4:
        full = " (quant.w_bits=16 leaves weights in full precision)" if not w_spec.enabled else ""
        raise CAQError(
            f"int4 export needs weights quantized to at most 4 bits, got w_bits={w_spec.bits}{full}: calibrate with "
            "model.quant.w_bits=4 or choose another export format"
        )


def export_state_dict(model: PreTrainedModel, recipe: QuantRecipe) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``: packed decoder Linears plus every other tensor of the folded model."""
    w = recipe.w_spec
    check_int4_weights(w)
    if not recipe.weights:
        raise CAQError("the recipe has no quantized weights: fold the student first (module.fold())")
    packed = {f"{name}.weight" for name in recipe.weights}
    state = {k: v for k, v in model.state_dict().items() if k not in packed}
    for name, (codes, scale, zero) in recipe.weights.items():
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.cpu()
        layer = Int4Linear.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), bias, w.symmetric)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def quantization_config(recipe: QuantRecipe) -> dict[str, Any]:
    """``config.json``'s quantization_config: the recipe plus how the weights are packed."""
    return {
        **recipe.config_dict(),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "packing": {
            "qweight": "uint8 (out, in/2): two 4-bit codes per byte, low nibble = even input column",
            "code_offset": SYMMETRIC_OFFSET if recipe.w_spec.symmetric else 0,
            "scales": "float32 (out, groups)",
            "zeros": None if recipe.w_spec.symmetric else "uint8 (out, groups)",
        },
        "folded": "R1, R2, smoothing scales and norm weights are baked into the weights",
        "modules": sorted(recipe.weights),
    }


def _write_files(
    folder: Path, model: PreTrainedModel, recipe: QuantRecipe, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    save_file(export_state_dict(model, recipe), str(folder / WEIGHTS), metadata={"format": "pt"})
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = quantization_config(recipe)
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_manifest(folder, FORMAT, FORMAT_VERSION)


def write_export(
    model: PreTrainedModel,
    recipe: QuantRecipe,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write an int4 export of a folded model atomically (:func:`caq_lightning.export.formats.atomic_dir`)."""
    return atomic_dir(out_dir, overwrite, lambda folder: _write_files(folder, model, recipe, tokenizer))


@register_format
class CAQInt4(ExportFormat):
    """Two 4-bit codes per byte plus the recipe; :func:`caq_lightning.export.load_quantized` runs it on integers."""

    name, title = FORMAT, "int4 export"

    def check(self, quant: QuantConfig) -> None:
        check_int4_weights(quant.w_spec)

    def write(self, model: PreTrainedModel, recipe: QuantRecipe, tokenizer, target: Path, overwrite: bool) -> Path:
        return write_export(model, recipe, tokenizer, target, overwrite)
