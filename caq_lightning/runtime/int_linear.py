"""Integer W4A4 runtime of an int4 export: int8 x int8 -> int32 matmuls (``torch._int_mm``), an integer KV cache.

Each decoder Linear becomes an :class:`IntLinear`. Its input (after the online R4 Hadamard for ``down_proj``) is
quantized per token straight to integer codes, with the same scale/zero formula and rounding as the fake-quant
student (:func:`caq_lightning.quant.quantizer.quantize`), so the codes are the same. The product of codes is exact
in int32; only the rescale is float:

    x ≈ s_x (q_x - z_x),  W ≈ s_w (q_w - z_w)   =>   y = s_x s_w (q_x - z_x)(q_w - z_w)ᵀ + b

Codes minus zero point lie in [-15, 15] for 4-bit codes, so both sides are kept centered in int8 and the
asymmetric zero points cost nothing. Only 8-bit asymmetric activations, whose centered codes do not fit int8, are
shifted by 128 and corrected with the weight row sums: y = s_x s_w (c_x q_wᵀ - (z_x - 128) rowsum(q_w)) + b.
Weights and activations may be grouped along the input dimension when one group size divides the other: the
product then runs per block.

Attention keeps its float matmuls (SDPA) over an integer KV cache (:mod:`caq_lightning.runtime.int_kv`).

Where ``_int_mm`` cannot run (a backend or shape it rejects, activations left in full precision or wider than
8 bits), that Linear falls back to dequantizing, with a one-line warning.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caq_lightning.quant.hadamard import apply_hadamard
from caq_lightning.quant.quantizer import QuantSpec, grouped, code_range, fake_quantize, quant_params
from caq_lightning.runtime.packing import SYMMETRIC_OFFSET, Int4Linear, unpack_int4

Residency = Literal["int8", "packed"]
Hadamard = Callable[[Tensor], Tensor]  # x @ H (R4: apply_hadamard, or the serving profile's sylvester_blocks)
CHUNK_ELEMENTS = 1 << 20  # quantize ~1M activations at a time: the elementwise passes stay in cache
SMALL_M = 64  # on CPU, _int_mm with few rows runs several times faster as W @ xᵀ than as x @ Wᵀ
FUSE_MIN_ROWS = 256  # from here on (prefill), quantize and rescale run as torch.compile'd kernels; eager below
logger = logging.getLogger("caq_lightning.runtime")  # one channel for the whole runtime
_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def fused(fn: Callable) -> Callable:
    """``fn`` compiled with torch.compile, which fuses its elementwise passes (the same numbers, tested); ``fn``
    itself when CAQ_INT_COMPILE=0 or compiling failed once (one warning)."""
    if os.environ.get("CAQ_INT_COMPILE", "1") == "0" or _compiled.get(fn) is False:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    compiled = _compiled[fn]

    def run(*args):  # noqa: ANN002
        try:
            return compiled(*args)
        except Exception as err:  # no C++ compiler / triton, or an unsupported backend
            _compiled[fn] = False
            warn_once(f"int runtime: torch.compile failed ({type(err).__name__}); quantizing and rescaling eagerly")
            return fn(*args)

    return run


_compiled: dict[Callable, Callable | bool] = {}


# ---- pure functions -----------------------------------------------------------------------------------------------


def centered(spec: QuantSpec) -> bool:
    """Whether codes minus zero point fit int8 (all but asymmetric codes of 8 bits)."""
    lo, hi = code_range(spec)
    return spec.symmetric or hi <= 127


def quantize_codes(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor | None]:
    """The codes of ``quantize(x, spec)`` as int8: x (R, n) -> codes (R, n), scale (R, G) fp32, zero (R, G) or None.

    :func:`centered` specs give codes - zero and no zero; otherwise codes - 2^(b-1) and zero - 2^(b-1).
    """
    xg = grouped(x.float(), spec.group_size)
    scale, zero = quant_params(xg, spec)
    lo, hi = code_range(spec)
    codes = (xg / scale).round_()  # quantize()'s round_ste(v) is v.round(), bitwise
    if spec.symmetric:
        return codes.clamp_(lo, hi).to(torch.int8).flatten(-2), scale.squeeze(-1), None
    if centered(spec):  # clamp(q + z, lo, hi) - z, in exact small-integer float arithmetic
        return codes.clamp_(lo - zero, hi - zero).to(torch.int8).flatten(-2), scale.squeeze(-1), None
    offset = 2 ** (spec.bits - 1)
    codes = codes.add_(zero).clamp_(lo, hi).sub_(offset)
    return codes.to(torch.int8).flatten(-2), scale.squeeze(-1), (zero - offset).squeeze(-1)


def quantize_rows(x: Tensor, spec: QuantSpec, hadamard: Hadamard | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`quantize_codes` of x (R, n), after ``hadamard(x)`` (x @ H) when given: fused when R is large, else
    eagerly in chunks of rows (the same result)."""
    if x.shape[0] >= FUSE_MIN_ROWS:
        return fused(quantize_codes)(x if hadamard is None else hadamard(x), spec)
    rows = max(1, CHUNK_ELEMENTS // x.shape[-1])
    parts = [quantize_codes(c if hadamard is None else hadamard(c), spec) for c in x.split(rows)]
    if len(parts) == 1:
        return parts[0]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def rescale(acc: Tensor, s_x: Tensor, s_w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """int32 (M, N) products of centered codes -> s_x (M, 1) * s_w (1, N) * acc + bias, in ``dtype``."""
    y = acc * s_x * s_w
    return (y if bias is None else y + bias).to(dtype)


def int_mm(a: Tensor, w: Tensor) -> Tensor:
    """a int8 (M, K) times w int8 (N, K) transposed -> int32 (M, N), exact."""
    m = a.shape[0]
    if a.is_cuda:  # cuBLASLt int8 needs more than 16 rows (and K, N multiples of 8, checked when building)
        rows = max(32, -(-m // 8) * 8)
        padded = a if rows == m else torch.cat([a, a.new_zeros(rows - m, a.shape[1])])
        return torch._int_mm(padded, w.t())[:m]
    if 1 < m <= SMALL_M:  # contiguous: a transposed view would reach lm_head, whose matmul then copies its weight
        return torch._int_mm(w, a.t().contiguous()).t().contiguous()
    return torch._int_mm(a, w.t())


# ---- integer Linear -----------------------------------------------------------------------------------------------


class InputCodes:
    """The activation codes of the last input, shared by sibling Linears that read the same tensor (q/k/v, gate/up)."""

    def __init__(self) -> None:
        self.key: tuple[Tensor, Hadamard | None] | None = None
        self.value: tuple[Tensor, Tensor, Tensor | None] | None = None

    def get(self, x: Tensor, spec: QuantSpec, hadamard: Hadamard | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.key is None or self.key[0] is not x or self.key[1] != hadamard:
            self.key, self.value = (x, hadamard), quantize_rows(x.reshape(-1, x.shape[-1]), spec, hadamard)
        return self.value


class IntLinear(nn.Module):
    """A decoder Linear on integer codes: per-token activation codes times int8 weight codes with ``_int_mm``.

    ``residency="int8"`` keeps the centered weight codes as int8 (out, in); ``"packed"`` keeps the export's nibbles
    (out, in/2) and unpacks them every forward. ``hadamard``: x @ H before quantizing (R4, ``down_proj``): a
    function, True for :func:`apply_hadamard`, or None/False.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_groups: int,
        a_spec: QuantSpec,
        hadamard: Hadamard | bool | None,
        residency: Residency,
        symmetric: bool,
        bias: Tensor | None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if isinstance(hadamard, bool):  # True: the full-size R4 of apply_hadamard
            hadamard = apply_hadamard if hadamard else None
        self.a_spec, self.hadamard, self.residency, self.symmetric = a_spec, hadamard, residency, symmetric
        self.w_group = in_features // w_groups
        a_group = a_spec.group_size or in_features
        self.block = min(self.w_group, a_group)
        self.a_group = a_group
        self.register_buffer("weight_scales", torch.empty(out_features, w_groups))
        self.register_buffer("row_sums", torch.empty(out_features, in_features // self.block))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.shared_input = InputCodes()
        self.int_path = self._unsupported_reason() is None

    def _unsupported_reason(self) -> str | None:
        if not self.a_spec.enabled:
            return "activations are not quantized (a_bits=16)"
        if self.a_spec.bits > 8:
            return f"a_bits={self.a_spec.bits} codes do not fit int8"
        if max(self.w_group, self.a_group) % self.block:
            return f"weight groups of {self.w_group} and activation groups of {self.a_group} do not nest"
        return None

    @classmethod
    def from_int4(
        cls, layer: Int4Linear, a_spec: QuantSpec, hadamard: Hadamard | bool | None, residency: Residency
    ) -> IntLinear:
        groups = layer.scales.shape[1]
        bias = None if layer.bias is None else layer.bias.data
        new = cls(layer.in_features, layer.out_features, groups, a_spec, hadamard, residency, layer.symmetric, bias)
        new.to(layer.scales.device)
        new.weight_scales.copy_(layer.scales)
        if residency == "int8":
            new.register_buffer("weight_codes", centered_codes(layer.qweight, layer.zeros, groups))
        else:
            new.register_buffer("qweight", layer.qweight)
            new.register_buffer("zeros", layer.zeros)
        codes = new.weight_int8()
        new.row_sums.copy_(codes.unflatten(-1, (-1, new.block)).sum(-1, dtype=torch.int32).float())
        reason = new._unsupported_reason() or _backend_reason(codes)
        if reason is not None:
            new.int_path = False
            warn_once(f"int runtime: {reason}; those Linears dequantize instead")
        return new

    def weight_int8(self) -> Tensor:
        """(out, in) int8: code - zero."""
        if self.residency == "int8":
            return self.weight_codes
        return centered_codes(self.qweight, self.zeros, self.weight_scales.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.int_path:
            try:
                return self._int_forward(x)
            except RuntimeError as err:  # a backend or shape _int_mm rejects: dequantize from now on
                self.int_path = False
                warn_once(f"int runtime: torch._int_mm failed ({str(err).splitlines()[0]}); dequantizing instead")
        return self._dequant_forward(x)

    def _int_forward(self, x: Tensor) -> Tensor:
        codes, s_x, z_x = self.shared_input.get(x, self.a_spec, self.hadamard)
        w = self.weight_int8()
        blocks = self.row_sums.shape[1]
        if blocks == 1 and z_x is None:
            scale = fused(rescale) if codes.shape[0] >= FUSE_MIN_ROWS else rescale
            out = scale(int_mm(codes, w), s_x, self.weight_scales.T, self.bias, x.dtype)
            return out.view(*x.shape[:-1], self.out_features)
        out = torch.empty(codes.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if blocks == 1:  # 8-bit asymmetric activations: shifted codes, zero-point corrected with the row sums
            y = torch.mul(int_mm(codes, w), s_x)
            y.addcmul_(z_x * s_x, self.row_sums.T, value=-1)
            torch.mul(y, self.weight_scales.T, out=out)
        else:
            y = torch.zeros(codes.shape[0], self.out_features, device=x.device)
            for b in range(blocks):
                cols = slice(b * self.block, (b + 1) * self.block)
                ga, gw = b * self.block // self.a_group, b * self.block // self.w_group
                acc = torch.mul(int_mm(codes[:, cols].contiguous(), w[:, cols].contiguous()), s_x[:, ga : ga + 1])
                if z_x is not None:
                    acc.addcmul_(z_x[:, ga : ga + 1] * s_x[:, ga : ga + 1], self.row_sums[:, b], value=-1)
                y.addcmul_(acc, self.weight_scales[:, gw])
            out.copy_(y)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _dequant_forward(self, x: Tensor) -> Tensor:
        if self.hadamard is not None:
            x = self.hadamard(x)
        x = fake_quantize(x, self.a_spec)
        w = self.weight_int8().float().unflatten(-1, (self.weight_scales.shape[1], -1))
        w = (w * self.weight_scales.unsqueeze(-1)).flatten(-2)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        path = "int" if self.int_path else "dequant"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.residency}, {path}"


def centered_codes(qweight: Tensor, zeros: Tensor | None, groups: int) -> Tensor:
    """Packed nibbles (out, in/2) uint8 and zeros (out, G) (None: symmetric, stored code + 8) -> (out, in) int8."""
    nibbles = unpack_int4(qweight).to(torch.int8)
    if zeros is None:
        return nibbles.sub_(SYMMETRIC_OFFSET)
    grouped = nibbles.unflatten(-1, (groups, -1)).sub_(zeros.to(torch.int8).unsqueeze(-1))
    return grouped.flatten(-2)


def _backend_reason(codes: Tensor) -> str | None:
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    if codes.is_cuda and (codes.shape[0] % 8 or codes.shape[1] % 8):
        return f"CUDA _int_mm needs in/out features that are multiples of 8, got {tuple(codes.shape)}"
    return None
