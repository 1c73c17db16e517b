"""GPTQ rounding (Frantar et al. 2022) of one folded weight on the same integer grid as the fake quantizer."""

from __future__ import annotations

import torch
from torch import Tensor

from caq_lightning.quant.quantizer import QuantSpec, grouped, code_range, quant_params


@torch.no_grad()
def gptq_quantize(
    weight: Tensor, hessian: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0, damp: float = 0.01, block: int = 128,
    act_order: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Quantize W (out, in) column by column, spreading each column's error over the columns not yet quantized.

    hessian: (in, in) sum of x^T x over calibration inputs. Returns codes (out, G, g), scale and zero (out, G, 1),
    the layout of :func:`caq_lightning.quant.quantizer.quantize`, so export and runtime need no special case.
    ``act_order`` takes the columns in decreasing order of the Hessian's diagonal (GPTQ's desc_act); the groups'
    grids are then fixed up front from the unquantized weights (static groups), so the layout does not change.
    """
    w = weight.float().clone()
    out_features, n = w.shape
    group = spec.group_size or n
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    clip_t = torch.as_tensor(clip, dtype=torch.float32).expand(out_features, n // group, 1) if torch.is_tensor(clip) else None
    scales = torch.zeros(out_features, n // group, 1)
    zeros = torch.zeros_like(scales)
    order = torch.arange(n)
    if act_order:
        scales, zeros = quant_params(grouped(w, spec.group_size), spec, clip)
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    lo, hi = code_range(spec)
    group_of = (order // group).tolist()  # the (weight-order) group of each column in the order GPTQ takes them
    codes = torch.zeros_like(w)
    for start in range(0, n, block):
        end = min(start + block, n)
        w_blk, err_blk = w[:, start:end].clone(), torch.zeros(out_features, end - start)
        for i in range(end - start):
            col = start + i
            g_idx = group_of[col]
            if not act_order and col % group == 0:  # the grid of a group is fixed by its error-updated weights
                g_clip = clip if clip_t is None else clip_t[:, g_idx : g_idx + 1]
                ws = torch.cat([w_blk[:, i:], w[:, end:]], dim=1)[:, : group]
                s, z = quant_params(grouped(ws, 0), spec, g_clip)
                scales[:, g_idx], zeros[:, g_idx] = s[:, 0], z[:, 0]
            s, z = scales[:, g_idx, 0], zeros[:, g_idx, 0]
            q = torch.clamp(torch.round(w_blk[:, i] / s) + z, lo, hi)
            codes[:, col] = q
            err = (w_blk[:, i] - (q - z) * s) / h_inv[col, col]
            w_blk[:, i:] -= err[:, None] * h_inv[col, col:end][None, :]
            err_blk[:, i] = err
        w[:, end:] -= err_blk @ h_inv[start:end, end:]
    if act_order:
        codes = codes[:, torch.argsort(order)]  # back to the weight's column order
    return grouped(codes, spec.group_size), scales, zeros
