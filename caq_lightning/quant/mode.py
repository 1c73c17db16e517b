"""Which parts of a CAQ model are live: shared by the fake-quant student, its attention hook and the runtime."""

from __future__ import annotations


class Mode:
    """Which parts of the student are live: ``transform`` (R1, R2, smoothing, R3/R4) and ``quant`` (fake quantizers).

    (False, False) is the FP teacher, (False, True) plain RTN, (True, False) the FP-transformed model, (True, True)
    the student. A decoder block's mode ``follows`` the student's, narrowed by its own ``quantize``: False keeps the
    block in full precision in student passes (transforms stay on, so it still reads the rotated residual stream
    exactly); teacher and RTN passes (transform off) ignore it, so ``student.mode(...)`` always wins.
    """

    def __init__(self, transform: bool = True, quant: bool = True, follows: Mode | None = None):
        self._transform, self._quant, self.follows = transform, quant, follows
        self.quantize = True

    @property
    def transform(self) -> bool:
        return self._transform if self.follows is None else self.follows.transform

    @property
    def quant(self) -> bool:
        if self.follows is None:
            return self._quant
        return self.follows.quant and (self.quantize or not self.follows.transform)

    def set(self, transform: bool, quant: bool) -> None:
        self._transform, self._quant = transform, quant
