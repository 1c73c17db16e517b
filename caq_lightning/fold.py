"""Fold a calibrated student into a plain transformers model plus the runtime that reproduces it.

After folding: embeddings are E R1, norms carry only their smoothing (1/s), every decoder Linear holds its
transformed weight already rounded to the integer grid (RTN with the learned clip, or GPTQ), and lm_head holds
W diag(g) R1. What cannot be folded stays online and is attached by :func:`caq_lightning.runtime.attach_runtime`:
per-token activation quantization at each decoder Linear, the Hadamard before down_proj (R4), and R3 + KV
quantization in attention.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from caq_lightning.config import GptqHessians, WeightRounding
from caq_lightning.errors import CAQError
from caq_lightning.models import get_adapter
from caq_lightning.progress import progress
from caq_lightning.quant.clip_search import mse_clip
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
    student: CAQStudent,
    calibration: Iterable[dict[str, Tensor]] | None = None,
    rounding: WeightRounding | None = None,
    hessians: GptqHessians | None = None,
) -> Folded:
    """Bake the student's transforms into a new plain model with the runtime attached.

    ``rounding`` (default ``student.config.w_rounding``): ``gptq`` rounds the weights by GPTQ with Hessians of the
    runtime's Linear inputs on ``calibration`` batches; ``rtn`` rounds to nearest with the learned clip.
    ``hessians`` (default ``student.config.gptq_hessians``): ``sequential`` collects each Linear's Hessian with
    every Linear before it already rounded (as GPTQ, QuaRot and llm-compressor do); ``one_pass`` from one pass over
    the unrounded model. GPTQ's clip and column order come from ``w_clip_search`` and ``gptq_act_order``.
    """
    cfg = student.config
    rounding = rounding or cfg.w_rounding
    hessians = hessians or cfg.gptq_hessians
    gptq = rounding == "gptq" and cfg.w_spec.enabled
    if gptq and calibration is None:
        raise CAQError("GPTQ rounding needs calibration batches: pass calibration=<batches> or use rounding='rtn'")
    recipe = QuantRecipe(
        cfg.w_spec, cfg.a_spec, cfg.kv_spec, cfg.online_hadamard, rounding, online_r3=cfg.hadamard_qk,
        profile=cfg.profile,
    )  # fmt: skip
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
    if not recipe.w_spec.enabled:
        return Folded(model, recipe)

    def round_weight(name: str, hessian: Tensor | None) -> None:
        w, _, clip, _ = folded[name]
        if hessian is None:  # RTN keeps the student's clip, so the fold computes what the student computed
            codes, scale, zero = quantize(w, recipe.w_spec, clip)
        else:
            if cfg.w_clip_search == "mse":
                clip = mse_clip(w, recipe.w_spec)
            codes, scale, zero = gptq_quantize(w, hessian, recipe.w_spec, clip, act_order=cfg.gptq_act_order)
        recipe.weights[name] = (codes.to(torch.int8), scale, zero)
        model.get_submodule(name).weight.copy_(dequantize(codes, scale, zero))

    if not gptq:
        for name in folded:
            round_weight(name, None)
    elif hessians == "one_pass":
        batches = [(b["input_ids"].to(model.device), b["attention_mask"].to(model.device)) for b in calibration]
        found = _collect_hessians(list(folded), lambda: [model(input_ids=i, attention_mask=m) for i, m in batches],
                                  model)  # fmt: skip
        for name in progress(folded, "GPTQ", unit="linear"):
            round_weight(name, found[name])
    else:
        _round_sequentially(model, list(folded), calibration, round_weight)
    return Folded(model, recipe)


def _collect_hessians(names: list[str], run: Callable[[], Any], model: nn.Module) -> dict[str, Tensor]:
    """Sum of x^T x over the inputs each named Linear sees while ``run()`` runs."""
    hessians: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):  # noqa: ANN001
            # Registered after the runtime's pre-hook, so args[0] is the Hadamard-rotated, quantized input.
            x = args[0].flatten(0, -2).float()
            hessians[name] = hessians[name] + x.T @ x if name in hessians else x.T @ x

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return hessians


class _Captured(Exception):
    """Stops the forward pass once the first decoder layer's inputs are captured."""


def _round_sequentially(
    model: PreTrainedModel, names: list[str], calibration: Iterable[dict[str, Tensor]],
    round_weight: Callable[[str, Tensor], None],
) -> None:  # fmt: skip
    """GPTQ layer by layer: each layer runs on the outputs of the already-rounded layers before it, and within a
    layer the Linears round in stages (q/k/v, o, gate/up, down: the adapter's smoothing groups, in table order), each
    stage's Hessians taken with the earlier stages rounded."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    inputs: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):  # noqa: ANN001
        inputs.append((args, kwargs))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in calibration:
            try:
                ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    qualified = {id(m): n for n, m in model.named_modules()}
    stage_of = {name: i for i, name in enumerate(dict.fromkeys(r.smoothing for r in adapter.projections.values()))}
    wanted = set(names)

    def run_layer(layer: nn.Module) -> list[Tensor]:
        return [_hidden(layer(*args, **kwargs)) for args, kwargs in inputs]

    for layer in progress(layers, "GPTQ", unit="layer"):
        mine = [qualified[id(m)] for m in layer.modules() if qualified.get(id(m)) in wanted]
        stages: dict[int, list[str]] = {}
        for name in mine:
            stages.setdefault(stage_of[adapter.role(name).smoothing], []).append(name)
        for stage in sorted(stages):
            hessians = _collect_hessians(stages[stage], lambda: run_layer(layer), model)
            for name in stages[stage]:
                round_weight(name, hessians[name])
        outputs = run_layer(layer)
        inputs = [((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out})
                  for (args, kwargs), out in zip(inputs, outputs)]  # fmt: skip


def _hidden(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output
