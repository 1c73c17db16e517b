"""The serving formats: a folded ``profile=serve`` student as a compressed-tensors W4A4 or W4A8 checkpoint.

Written with compressed-tensors' own classes: the ``W4A4``/``W4A8`` preset's activation arguments (int, symmetric,
dynamic, per token), :class:`QuantizationScheme`/:class:`QuantizationConfig` with the student's weight grouping,
``apply_quantization_config``, a :class:`TransformConfig` for R4 (an online Hadamard on ``down_proj``'s input,
``apply_transform_config``) and :class:`ModelCompressor` (``pack-quantized``: eight 4-bit codes per int32). The
codes compressed-tensors derives are checked to be the student's, bit for bit.

The serving profile's R4 is blocks of the largest power-of-two Sylvester Hadamard dividing the intermediate size
(1536 -> 3 x 512, 14336 -> 7 x 2048): compressed-tensors' ``hadamard`` transform with ``head_dim`` the block,
which vLLM runs with its Hadamard kernel. vLLM serves the checkpoints with ``CompressedTensorsWNA4Int`` /
``CompressedTensorsWNA8Int`` plus ``CompressedTensorsLinearTransformMethod`` (docs/serve.md).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from caq_lightning.config import QuantConfig, serving_problem
from caq_lightning.errors import CAQError
from caq_lightning.export.formats import ExportFormat, atomic_dir, register_format, write_manifest
from caq_lightning.models import get_adapter
from caq_lightning.quant.hadamard import sylvester
from caq_lightning.quant.quantizer import dequantize
from caq_lightning.runtime import QuantRecipe

FORMAT_VERSION = 1
R4_GROUP = "R4"  # the transform config group; compressed-tensors names the module down_proj.R4_input


class CompressedTensorsServing(ExportFormat):
    """int4 symmetric weights (per channel or group), dynamic symmetric per-token int activations of ``a_bits``,
    the online R4 Hadamard; 16-bit KV cache, no R3 (vLLM has neither an int KV cache nor a transform after RoPE)."""

    a_bits: ClassVar[int]

    def check(self, quant: QuantConfig) -> None:
        _import_compressed_tensors()
        if problem := serving_problem(quant):
            raise CAQError(f"export format {self.name}: {problem}")
        if quant.a_bits != self.a_bits:
            other = next(f.name for f in SERVING_FORMATS if f.a_bits == quant.a_bits)
            raise CAQError(
                f"export format {self.name} serves {self.a_bits}-bit activations, the student has a_bits="
                f"{quant.a_bits}: set a_bits={self.a_bits} or export with format {other}"
            )
        if quant.profile != "serve":
            raise CAQError(
                f"export format {self.name} needs the student calibrated with compressed-tensors' activation scale "
                "rule: set profile=serve"
            )

    def write(
        self, model: PreTrainedModel, recipe: QuantRecipe, tokenizer: Any, target: Path, overwrite: bool
    ) -> Path:
        """Write the checkpoint of a folded student (``fold()``'s model and recipe) atomically to ``target``."""
        self.check(_quant_config(recipe))
        if not recipe.weights:
            raise CAQError("the recipe has no quantized weights: fold the student first (module.fold())")
        ct_model, compressor = compressed_model(model, recipe, self.a_bits)

        def write_files(folder: Path) -> None:
            ct_model.save_pretrained(folder)
            compressor.update_config(str(folder))  # quantization_config, with the transform_config inside
            config_path = folder / "config.json"
            data = json.loads(config_path.read_text())
            data["caq_serving"] = {"format": self.name, "format_version": FORMAT_VERSION, **recipe.config_dict()}
            config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            write_manifest(folder, format=self.name, format_version=FORMAT_VERSION)

        return atomic_dir(target, overwrite, write_files)


@register_format
class CompressedTensorsW4A4(CompressedTensorsServing):
    name = "compressed-tensors-w4a4"
    a_bits = 4


@register_format
class CompressedTensorsW4A8(CompressedTensorsServing):
    name = "compressed-tensors-w4a8"
    a_bits = 8


SERVING_FORMATS = (CompressedTensorsW4A4, CompressedTensorsW4A8)


def _quant_config(recipe: QuantRecipe) -> QuantConfig:
    """The settings a recipe was folded with, as far as the serving formats look at them."""
    w, a, kv = recipe.w_spec, recipe.a_spec, recipe.kv_spec
    profile = recipe.profile
    if profile == "serve" and a.scale_rule != "half_range":
        profile = "full"  # a hand-made recipe: not the serving rule
    try:
        return QuantConfig(
            w_bits=w.bits, a_bits=a.bits, kv_bits=kv.bits, w_group_size=w.group_size, a_group_size=a.group_size,
            kv_group_size=kv.group_size, w_symmetric=w.symmetric, a_symmetric=a.symmetric,
            kv_symmetric=kv.symmetric, a_clip_ratio=a.clip_ratio, kv_clip_ratio=kv.clip_ratio,
            online_hadamard=recipe.online_hadamard, online_r3=recipe.online_r3, profile=profile,
        )  # fmt: skip
    except CAQError as err:
        raise CAQError(f"the folded student cannot be served: {err}") from None


def _import_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise CAQError(
            "the compressed-tensors formats need the compressed-tensors package: pip install 'caq-lightning[interop]'"
        ) from None


@contextlib.contextmanager
def _quiet_compressed_tensors() -> Iterator[None]:
    """Silence compressed-tensors' per-module warning that a forced pack-quantized format differs from the
    int-quantized one it would infer (vLLM's int4 kernels read pack-quantized)."""
    from loguru import logger

    logger.disable("compressed_tensors")
    try:
        yield
    finally:
        logger.enable("compressed_tensors")


def compressed_model(model: PreTrainedModel, recipe: QuantRecipe, a_bits: int) -> tuple[PreTrainedModel, Any]:
    """A plain transformers model of the folded weights with compressed-tensors' quantization and R4 transform
    applied and its Linears compressed (pack-quantized), and the :class:`ModelCompressor` that wrote them."""
    _import_compressed_tensors()
    from accelerate import init_empty_weights
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config, preset_name_to_scheme,
    )  # fmt: skip

    adapter = get_adapter(model.config)
    spec = recipe.w_spec
    packed = {f"{name}.weight" for name in recipe.weights}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in packed}
    for name, (codes, scale, zero) in recipe.weights.items():  # fp32 on the grid: compressed-tensors re-derives codes
        state[f"{name}.weight"] = dequantize(codes.float(), scale.float(), zero.float()).cpu()
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = "sdpa"  # not the runtime's caq_sdpa: the checkpoint runs on transformers' own
    dtype = state[adapter.embed_key].dtype
    with init_empty_weights():
        ct_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ct_model.load_state_dict(state, strict=True, assign=True)

    preset = preset_name_to_scheme(f"W4A{a_bits}", ["Linear"])
    act = preset.input_activations  # int, symmetric, dynamic, per token: the student's activation quantizer
    if (act.num_bits, act.symmetric, act.dynamic, act.strategy) != (a_bits, True, True, "token"):
        raise CAQError(f"compressed-tensors' W4A{a_bits} preset changed ({act}): pin compressed-tensors 0.20")
    weights = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=True, dynamic=False,
        strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None,
    )  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=act)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=[adapter.head_name])
    apply_quantization_config(ct_model, qconfig, show_progress=False)
    for name, (_, scale, _) in recipe.weights.items():
        ct_model.get_submodule(name).weight_scale = nn.Parameter(scale.squeeze(-1).float().cpu(), requires_grad=False)
    if recipe.online_hadamard:
        _apply_r4(ct_model, [name for name, role in adapter.projections.items() if role.online_r4])

    with _quiet_compressed_tensors():
        compressor = ModelCompressor.from_pretrained_model(ct_model, quantization_format="pack-quantized")
        compressor.compress_model(ct_model)
    for name, (codes, _, _) in recipe.weights.items():  # compressed-tensors re-derived the codes: they must be ours
        module = ct_model.get_submodule(name)
        got = unpack_from_int32(module.weight_packed, spec.bits, tuple(module.weight_shape.tolist()))
        if not torch.equal(got.to(torch.int8), codes.flatten(1).to(torch.int8).cpu()):
            raise CAQError(f"compressed-tensors packed {name} to other codes than the student's: report this")
    return ct_model, compressor


def _apply_r4(model: PreTrainedModel, projections: list[str]) -> None:
    """The serving profile's R4 (:func:`~caq_lightning.quant.hadamard.sylvester_blocks`) on the input of each
    ``projections`` Linear (down_proj) as compressed-tensors' ``hadamard`` transform, checked to be the student's."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config

    modules = [m for name, m in model.named_modules() if name.rpartition(".")[2] in projections]
    sizes = {m.in_features for m in modules}
    if len(sizes) != 1:
        raise CAQError(f"R4 Linears of several input sizes {sorted(sizes)}: the serving formats need one")
    n = sizes.pop()
    k = n & -n  # blocks of the largest power-of-two Sylvester Hadamard
    scheme = TransformScheme(
        type="hadamard",
        apply=[TransformArgs(targets=[f"re:.*{p}$" for p in projections], location="input")],
        head_dim=None if k == n else k,
    )
    apply_transform_config(model, TransformConfig(config_groups={R4_GROUP: scheme}))
    for module in modules:
        weight = getattr(module, f"{R4_GROUP}_input").weight
        if not torch.equal(weight.detach().float().cpu(), sylvester(k)):
            raise CAQError(f"compressed-tensors' Hadamard of size {k} is not the student's R4: report this")
