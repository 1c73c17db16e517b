"""Fold a calibrated student into a plain transformers model plus the runtime that reproduces it.

After folding: embeddings are E R1, norms carry only their smoothing (1/s), every decoder Linear holds its
transformed weight already rounded to the integer grid (RTN with the learned clip, or GPTQ), and lm_head holds
W diag(g) R1. What cannot be folded stays online and is attached by :func:`caq_lightning.runtime.attach_runtime`:
per-token activation quantization at each decoder Linear, the Hadamard before down_proj (R4), and R3 + KV
quantization in attention.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedModel

from caq_lightning.quant.gptq import gptq_quantize
from caq_lightning.quant.quantizer import dequantize, quantize
from caq_lightning.runtime import QuantRecipe, attach_runtime
from caq_lightning.student import CAQStudent, FoldSpec, QuantLinear, TransformNorm


class Folded(NamedTuple):
    """A folded student: the plain model with its runtime attached, and the recipe the export needs."""

    model: PreTrainedModel
    recipe: QuantRecipe


@torch.no_grad()
def fold(
    student: CAQStudent, calibration: Iterable[dict[str, Tensor]] | None = None, gptq: bool = False
) -> Folded:
    """Bake the student's transforms into a new plain model with the runtime attached.

    With ``gptq=True`` the weights are rounded by GPTQ using Hessians of the runtime's Linear inputs on
    ``calibration`` batches (one pass over the FP-folded model); otherwise by RTN with the learned clip.
    """
    cfg = student.config
    recipe = QuantRecipe(cfg.w_spec, cfg.a_spec, cfg.kv_spec, cfg.online_hadamard, "gptq" if gptq else "rtn")
    source = student.model
    state: dict[str, Tensor] = {}
    folded: dict[str, FoldSpec] = {}  # the decoder Linears, to round onto the integer grid below
    with student.mode(transform=True, quant=True):
        r1 = student.r1_matrix()
        for name, module in source.named_modules():
            if isinstance(module, QuantLinear):
                spec = module.fold_spec()
                state[f"{name}.weight"] = spec.weight
                if spec.bias is not None:
                    state[f"{name}.bias"] = spec.bias
                if spec.quantized:
                    folded[name] = spec
            elif isinstance(module, TransformNorm):
                state[f"{name}.weight"] = module.fold_weight()
        embed = student.adapter.embed(source).weight
        state[student.adapter.embed_key] = embed.float() if r1 is None else embed.float() @ r1

    config = source.config.__class__.from_dict(source.config.to_dict())
    config.tie_word_embeddings = False  # embeddings (E R1) and lm_head (W diag(g) R1) now differ
    dtype = source.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    source_buffers = dict(source.named_buffers())
    for name, _ in list(model.named_buffers()):  # e.g. RoPE inv_freq: not in the state dict, same in both models
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = source_buffers[name].clone()
    model.eval().requires_grad_(False)
    attach_runtime(model, recipe)

    hessians = _collect_hessians(model, {n: f.weight for n, f in folded.items()}, calibration) if gptq else {}
    for name, (w, _, clip, _) in folded.items():
        if not recipe.w_spec.enabled:
            continue
        if gptq:
            codes, scale, zero = gptq_quantize(w, hessians[name], recipe.w_spec, clip)
        else:
            codes, scale, zero = quantize(w, recipe.w_spec, clip)
        recipe.weights[name] = (codes.to(torch.int8), scale, zero)
        model.get_submodule(name).weight.copy_(dequantize(codes, scale, zero))
    return Folded(model, recipe)


def _collect_hessians(
    model: PreTrainedModel, names: dict[str, Tensor], calibration: Iterable[dict[str, Tensor]] | None
) -> dict[str, Tensor]:
    if calibration is None:
        raise ValueError("GPTQ needs calibration batches: pass calibration=<iterable of batches>")
    hessians = {n: torch.zeros(w.shape[1], w.shape[1]) for n, w in names.items()}
    handles = []
    for name in names:
        def hook(module, args, name=name):  # noqa: ANN001
            # Registered after the runtime's pre-hook, so args[0] is the Hadamard-rotated, quantized input.
            x = args[0].flatten(0, -2).float()
            hessians[name] += x.T @ x

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    for batch in calibration:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return hessians
