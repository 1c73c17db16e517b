"""Two 4-bit codes per byte, and the Linear that computes from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caq_lightning.errors import CAQError

SYMMETRIC_OFFSET = 8  # symmetric codes in [-8, 7] are stored as unsigned nibbles in [0, 15]


def pack_int4(nibbles: Tensor) -> Tensor:
    """(out, in) integers in [0, 15] -> (out, in/2) uint8, even column in the low nibble, odd column in the high."""
    if nibbles.shape[-1] % 2:
        raise CAQError(f"int4 packing needs an even number of input features, got {nibbles.shape[-1]}")
    if nibbles.min() < 0 or nibbles.max() > 15:
        raise CAQError("int4 packing got codes outside [0, 15]: the weights were not quantized to 4 bits or fewer")
    n = nibbles.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (out, in/2) uint8 -> (out, in) uint8 in [0, 15]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


class Int4Linear(nn.Module):
    """A Linear stored as packed 4-bit codes with fp32 group scales (and zeros when asymmetric).

    ``forward`` unpacks and dequantizes exactly as :func:`caq_lightning.quant.quantizer.dequantize` does in the
    fake-quant student, so the result matches it bit for bit before the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.symmetric = in_features, out_features, symmetric
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        zeros = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, symmetric: bool) -> Int4Linear:
        """From fold()'s codes (out, G, g), scale (out, G, 1) and zero (out, G, 1)."""
        out_features, groups, group = codes.shape
        dtype = torch.float32 if bias is None else bias.dtype
        layer = cls(groups * group, out_features, groups, symmetric, bias is not None, dtype)
        offset = SYMMETRIC_OFFSET if symmetric else 0
        layer.qweight.copy_(pack_int4(codes.flatten(1).to(torch.int16) + offset))
        layer.scales.copy_(scale.squeeze(-1))
        if not symmetric:
            if zero.min() < 0 or zero.max() > 255 or not torch.equal(zero, zero.round()):
                raise CAQError("asymmetric zero points must be integers in [0, 255] to be stored as uint8")
            layer.zeros.copy_(zero.squeeze(-1).to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def dequantized_weight(self) -> Tensor:
        """(out, in) fp32: (code - zero) * scale per group."""
        groups = self.scales.shape[1]
        codes = unpack_int4(self.qweight).float().unflatten(-1, (groups, -1))  # (out, G, g)
        zero = SYMMETRIC_OFFSET if self.symmetric else self.zeros.float().unsqueeze(-1)
        return ((codes - zero) * self.scales.unsqueeze(-1)).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.scales.shape[1]}"
