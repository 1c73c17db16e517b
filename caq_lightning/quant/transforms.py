"""Learnable equivalence transforms and the weight algebra that folds them.

Conventions: a Linear computes y = x W^T + b with W (out, in). The residual stream of the student lives in the
rotated basis x R1. Each helper returns the weight that gives the same output for the transformed input,
so the transformed model is exact in full precision:

- input side   W' = W diag(g) R1 diag(s)          (norm weight g fused, smoothing s divides the activation)
- output side  W' = R1^T W,  b' = b R1            (o_proj, down_proj write back into the rotated residual)
- value heads  v' = v_h R2 / s_vo,  o_proj columns get R2 and s_vo
- up -> down   up rows / s_down, down columns * s_down, then the online Hadamard R4 on down's input
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from caq_lightning.quant.hadamard import apply_hadamard

if TYPE_CHECKING:
    from caq_lightning.models.adapter import ProjectionRole


class Rotation(nn.Module):
    """An (n, n) orthogonal matrix, learnable through torch's Cayley orthogonal parametrization.

    Kept in fp32: the Cayley map's solve has no bf16 kernel on CPU and orthogonality drifts in low precision.
    """

    def __init__(self, init: Tensor, learnable: bool = True):
        super().__init__()
        self.linear = nn.Linear(init.shape[0], init.shape[0], bias=False)
        self.learnable = learnable
        if learnable:
            parametrizations.orthogonal(self.linear, "weight", orthogonal_map="cayley")
            with torch.no_grad():
                self.linear.weight = init.float()  # right_inverse keeps `init` as the base, trainable part at 0
        else:
            self.linear.weight.requires_grad_(False)
            self.linear.weight.data.copy_(init.float())

    @property
    def matrix(self) -> Tensor:
        return self.linear.weight

    def bake(self) -> None:
        """Replace the parametrization by its current value (no more training)."""
        if parametrize.is_parametrized(self.linear):
            parametrize.remove_parametrizations(self.linear, "weight", leave_parametrized=True)
        self.linear.weight.requires_grad_(False)


def _log_scale(n: int, enabled: bool) -> nn.Parameter | None:
    # Log-parameterised so the scale stays positive; init 0 means identity.
    return nn.Parameter(torch.zeros(n)) if enabled else None


class LayerTransforms(nn.Module):
    """The learnable transforms of one decoder block: R2 and the smoothing scales ``log_s_<slot>``.

    ``slots``: smoothing scale -> the width it scales (a key of ``dims``), from the family's adapter.
    """

    def __init__(
        self, dims: dict[str, int], slots: dict[str, str], rotate_head: bool, smooth: bool, online_hadamard: bool,
        hadamard: Callable[[Tensor], Tensor] = apply_hadamard,  # x @ H4 (quant.hadamard.online_r4)
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims["heads"], dims["kv_heads"], dims["head_dim"]
        self.r2 = Rotation(torch.eye(self.head_dim)) if rotate_head else None
        for slot, width in slots.items():
            setattr(self, f"log_s_{slot}", _log_scale(dims[width], smooth))
        self.online_hadamard, self.hadamard = online_hadamard, hadamard

    @staticmethod
    def scale(log_s: nn.Parameter | None) -> Tensor | None:
        return None if log_s is None else log_s.exp()

    def smoothing(self, name: str) -> Tensor | None:
        """The smoothing scale ``name`` (a slot as a ProjectionRole names it), or None."""
        return self.scale(getattr(self, f"log_s_{name}", None))

    def weight(self, role: ProjectionRole, w: Tensor, b: Tensor | None, g: Tensor | None, r1: Tensor | None):
        """Effective (W', b') in fp32 of a projection with this ``role`` in this block."""
        b = None if b is None else b.float()
        if role.r1_side == "input":
            w = input_side(w, g, r1, self.smoothing(role.smoothing))
            if role.output_scale == "vo":
                w, b = self._value_heads(w, b)
            elif role.output_scale == "down" and (s_down := self.smoothing("down")) is not None:
                w = w / s_down[:, None]
                b = None if b is None else b / s_down
            return w, b
        # R1^T on the rows first: the column transforms commute with it, and R1^T W (W frozen) needs no gradient
        # but R1's, where R1^T (W S) would also backpropagate a (D, D) x (D, in) product into S.
        w, b = output_side(w.float(), b, r1)
        if role.smoothing == "vo":
            w = self._output_heads(w)
        elif role.smoothing == "down" and (s_down := self.smoothing("down")) is not None:
            w = w * s_down
        if role.online_r4 and self.online_hadamard:
            w = self.hadamard(w)  # rows of W times H4 pair with the online x @ H4
        return w, b

    def _value_heads(self, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """v' = v_h R2 / s_vo for each kv head: rows of W_v (kv_heads*head_dim, in) -> R2^T W_h."""
        if self.r2 is not None:
            r2 = self.r2.matrix
            w = torch.einsum("ji,hjd->hid", r2, w.unflatten(0, (self.kv_heads, self.head_dim))).flatten(0, 1)
            b = None if b is None else (b.unflatten(0, (self.kv_heads, self.head_dim)) @ r2).flatten()
        s_vo = self.smoothing("vo")
        if s_vo is not None:
            w = w / s_vo[:, None]
            b = None if b is None else b / s_vo
        return w, b

    def _output_heads(self, w: Tensor) -> Tensor:
        """Columns of W_o (out, heads*head_dim) -> W_o blockdiag(R2) diag(s_vo expanded over GQA groups)."""
        if self.r2 is not None:
            w = (w.unflatten(1, (self.heads, self.head_dim)) @ self.r2.matrix).flatten(1)
        s_vo = self.smoothing("vo")
        if s_vo is not None:
            groups = self.heads // self.kv_heads
            s_exp = s_vo.unflatten(0, (self.kv_heads, 1, self.head_dim)).expand(-1, groups, -1).flatten()
            w = w * s_exp
        return w


def input_side(w: Tensor, g: Tensor | None, r1: Tensor | None, s: Tensor | None) -> Tensor:
    """W (out, in) -> W diag(g) R1 diag(s) in fp32: the weight for input (x R1 / rms) / s."""
    w = w.float() if g is None else w * g.float()  # a bf16 W promotes to fp32 in the product: one pass, not two
    if r1 is not None:
        w = w @ r1
    if s is not None:
        w = w * s
    return w


def output_side(w: Tensor, b: Tensor | None, r1: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """W (out, in) -> R1^T W and b -> b R1: write the output into the rotated residual stream."""
    if r1 is None:
        return w, b
    return r1.T @ w, None if b is None else b @ r1
