"""Uniform integer quantizers with a straight-through estimator.

Everything quantizes along the last dimension, in groups of ``group_size`` (0 = the whole row):
weights (out, in) per output channel or per group, activations (..., d) per token, and the KV cache
(B, H, T, head_dim) per token and head. One code path means the int4 export reproduces the fake-quant
student bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from caq_lightning.errors import CAQError

logger = logging.getLogger("caq_lightning.quant")
ScaleRule = Literal["qmax", "half_range"]
SCALE_RULES = ("qmax", "half_range")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. ``bits >= 16`` means it stays in full precision."""

    bits: int = 4
    symmetric: bool = True
    group_size: int = 0  # 0: one group per row (per channel / per token)
    clip_ratio: float = 1.0  # fixed clipping of the range; weights may also learn theirs
    # symmetric scale = absmax / 2^(b-1)-1 ("qmax"), or absmax / ((2^b - 1) / 2) ("half_range", the rule of
    # compressed-tensors' dynamic quantizer, so a checkpoint loaded through it computes the student's codes)
    scale_rule: ScaleRule = "qmax"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise CAQError(f"bits={self.bits} is outside 2-16: use 2..8 to quantize or 16 to keep full precision")
        if self.group_size < 0:
            raise CAQError(f"group_size={self.group_size} is negative: use 0 (per row) or a positive divisor")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise CAQError(f"clip_ratio={self.clip_ratio} must be in (0, 1]")
        if self.scale_rule not in SCALE_RULES:
            raise CAQError(f"scale_rule={self.scale_rule!r} is unknown: use one of {', '.join(SCALE_RULES)}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


def grouped(x: Tensor, group_size: int) -> Tensor:
    """(..., n) -> (..., n // group_size, group_size); group_size 0 keeps one group per row."""
    n = x.shape[-1]
    if group_size == 0 or group_size == n:
        return x.unsqueeze(-2)
    if n % group_size:
        raise CAQError(f"group_size={group_size} does not divide the dimension {n}: pick a divisor of {n} or 0")
    return x.unflatten(-1, (n // group_size, group_size))


def quant_params(x_grouped: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Scale and zero point for each group of ``x_grouped`` (..., G, g) -> two (..., G, 1) tensors.

    ``clip`` (broadcastable to (..., G, 1)) shrinks the range; it multiplies ``spec.clip_ratio``.
    """
    clip = clip * spec.clip_ratio
    lo, hi = code_range(spec)
    if spec.symmetric:
        absmax = x_grouped.abs().amax(dim=-1, keepdim=True) * clip
        scale = absmax.clamp(min=1e-8) / (hi if spec.scale_rule == "qmax" else (hi - lo) / 2)
        return scale, torch.zeros_like(scale)
    qmax = hi - lo
    xmax = x_grouped.amax(dim=-1, keepdim=True).clamp(min=0) * clip
    xmin = x_grouped.amin(dim=-1, keepdim=True).clamp(max=0) * clip
    scale = (xmax - xmin).clamp(min=1e-8) / qmax
    zero = round_ste(-xmin / scale)
    return scale, zero


def code_range(spec: QuantSpec) -> tuple[int, int]:
    """Smallest and largest integer code: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    if spec.symmetric:
        return -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    return 0, 2**spec.bits - 1


def quantize(x: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes, scales and zeros: (..., n) -> codes (..., G, g), scale (..., G, 1), zero (..., G, 1).

    Symmetric codes lie in [-2^(b-1), 2^(b-1)-1]; asymmetric ones in [0, 2^b-1].
    """
    xg = grouped(x, spec.group_size)
    scale, zero = quant_params(xg, spec, clip)
    lo, hi = code_range(spec)
    codes = torch.clamp(round_ste(xg / scale) + zero, lo, hi)
    return codes, scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Inverse of :func:`quantize`: grouped codes (..., G, g) -> values (..., G*g)."""
    return ((codes - zero) * scale).flatten(-2)


def _fake_quantize(x: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> Tensor:
    codes, scale, zero = quantize(x.float(), spec, clip)
    return dequantize(codes, scale, zero).to(x.dtype)


def fake_quantize(x: Tensor, spec: QuantSpec, clip: Tensor | float = 1.0) -> Tensor:
    """Quantize-dequantize ``x`` along its last dimension with a straight-through gradient.

    From FUSE_MIN_NUMEL elements on it runs torch.compile'd: its dozen elementwise passes (and as many in the
    backward) fuse into a few, and the backward keeps far fewer temporaries. The same values and gradients up to
    float summation order (tested); eager when CAQ_FAKE_QUANT_COMPILE=0 or compiling failed once (one warning).
    """
    if not spec.enabled:
        return x
    if x.numel() >= FUSE_MIN_NUMEL and (compiled := _compiled.get("fake_quantize")) is not False:
        if compiled is None:
            on = os.environ.get("CAQ_FAKE_QUANT_COMPILE", "1") != "0"
            compiled = _compiled["fake_quantize"] = on and torch.compile(_fake_quantize, dynamic=True)
            if on:  # one graph per spec x dtype x grad mode x clip kind: more than dynamo's default 8
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if compiled:
            try:
                return compiled(x.view_as(x) if isinstance(x, nn.Parameter) else x, spec, clip)  # a plain tensor
            except Exception as err:  # no C++ compiler / triton, or an unsupported backend or tensor subclass
                _compiled["fake_quantize"] = False
                logger.warning(f"fake quantizer: torch.compile failed ({type(err).__name__}); running it eagerly")
    return _fake_quantize(x, spec, clip)


FUSE_MIN_NUMEL = 1 << 16  # smaller tensors (decode steps, the tiny test models) stay eager: no compile time
_compiled: dict[str, Callable | bool] = {}  # False: switched off, or compiling failed once


class WeightQuantizer(nn.Module):
    """Symmetric per-channel (or grouped) weight quantizer with learnable clipping.

    The clip factor of each output channel/group is ``sigmoid(clip_logit)`` (OmniQuant-style LWC), so it stays
    in (0, 1) and always has a gradient.
    """

    def __init__(self, spec: QuantSpec, out_features: int, in_features: int, learn_clip: bool, clip_init: float):
        super().__init__()
        self.spec = spec
        groups = 1 if spec.group_size in (0, in_features) else in_features // max(spec.group_size, 1)
        if spec.enabled and spec.group_size and in_features % spec.group_size:
            raise CAQError(
                f"w_group_size={spec.group_size} does not divide in_features={in_features}: pick a divisor or 0"
            )
        self.clip_logit = None
        if spec.enabled and learn_clip:
            logit = torch.logit(torch.tensor(clip_init)).item()
            self.clip_logit = nn.Parameter(torch.full((out_features, groups, 1), logit))

    def clip(self) -> Tensor | float:
        return 1.0 if self.clip_logit is None else torch.sigmoid(self.clip_logit)

    def forward(self, weight: Tensor) -> Tensor:
        """(out, in) -> fake-quantized (out, in)."""
        return fake_quantize(weight, self.spec, self.clip())


class ActQuantizer(nn.Module):
    """Dynamic per-token activation quantizer (asymmetric by default), applied at a Linear's input."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        """(..., d) -> fake-quantized (..., d), one range per token (or per group within the token)."""
        return fake_quantize(x, self.spec)
