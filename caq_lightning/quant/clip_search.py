"""Weight clip by grid search: the per-group range shrink with the least rounding error (GPTQ/QuaRot's ``mse``)."""

from __future__ import annotations

import torch
from torch import Tensor

from caq_lightning.quant.quantizer import QuantSpec, dequantize, grouped, quantize


@torch.no_grad()
def mse_clip(
    weight: Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> Tensor:
    """Per-group clip ratio (out, G, 1) in [1 - max_shrink, 1] minimising sum |W - Q(W)|^norm over each group.

    Ratios 1, 1 - 1/grid, ... are tried (QuaRot's weight quantizer: grid 100, shrink 0.8, norm 2.4); a later ratio
    replaces an earlier one only when strictly better, so a ratio of 1 wins ties.
    """
    w = weight.float()
    target = grouped(w, spec.group_size)
    best_err = torch.full(target.shape[:-1] + (1,), float("inf"))
    best = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid)):
        ratio = 1 - i / grid
        codes, scale, zero = quantize(w, spec, ratio)
        err = (dequantize(codes, scale, zero).view_as(target) - target).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best
