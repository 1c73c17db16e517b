"""Orthogonal Hadamard matrices of any size, for rotations R1 (init) and the online transforms R3/R4.

A size n = 2^k * m gets an exact Hadamard when m is 1 or a Paley order divides it with a power-of-two cofactor
(e.g. 14336 = 28 * 512); otherwise a block-diagonal of 2^k Sylvester blocks, which is still orthogonal
(e.g. 11008 = 43 blocks of 256). The serving profile's R4 is always blocks of Sylvester (:func:`sylvester_blocks`),
the form compressed-tensors and vLLM apply.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor


def sylvester(n: int) -> Tensor:
    """Unnormalised ±1 Hadamard of power-of-two order n."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(math.isqrt(q)) + 1))


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> Tensor:
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    table = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float32)
    return table[diff]


def paley(n: int) -> Tensor | None:
    """Unnormalised ±1 Hadamard of order n from a Paley construction with a prime q, or None."""
    q = n - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I
        c = torch.zeros(n, n)
        c[0, 1:] = 1
        c[1:, 0] = -1
        c[1:, 1:] = _jacobsthal(q)
        return c + torch.eye(n)
    if n % 2 == 0:
        q = n // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II
            c = torch.zeros(q + 1, q + 1)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            block_pos = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
            block_zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
            out = torch.kron(c, block_pos)
            zero_mask = torch.kron((c == 0).float(), torch.ones(2, 2))
            return out * (1 - zero_mask) + torch.kron(torch.eye(q + 1), block_zero) * zero_mask
    return None


MAX_PALEY = 1024  # larger Paley factors cost more per token than they mix; fall back to block-diagonal


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[Tensor | None, Tensor]:
    """Orthogonal float64 factors (A, B) with H = kron(A, B); A is None for a block-diagonal H = kron(I, B).

    B is a normalised Sylvester matrix of the largest power of two dividing n; A is a normalised Paley
    matrix when one exists (size <= MAX_PALEY) for the rest.
    """
    pow2 = n & -n  # largest power of two dividing n
    m = n // pow2
    if m == 1:
        return None, sylvester(n).double() / math.sqrt(n)
    j = 0
    while m * 2**j <= min(n, MAX_PALEY):
        a = paley(m * 2**j)
        if a is not None:
            b_size = n // (m * 2**j)
            return a.double() / math.sqrt(a.shape[0]), sylvester(b_size).double() / math.sqrt(b_size)
        j += 1
    return None, sylvester(pow2).double() / math.sqrt(pow2)


def hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Dense orthogonal (n, n) Hadamard-like matrix: H @ H.T == I."""
    a, b = hadamard_factors(n)
    h = torch.block_diag(*([b] * (n // b.shape[0]))) if a is None else torch.kron(a, b)
    return h.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _operands(n: int, dtype: torch.dtype, device: torch.device, transpose: bool) -> tuple[Tensor | None, Tensor]:
    # x @ H = A^T X B and x @ H^T = A X B^T; cached per dtype and device, so no copy per call (a GPU upload)
    a, b = hadamard_factors(n)
    left, right = (a, b.T) if transpose else (None if a is None else a.T, b)
    return (None if left is None else left.to(dtype=dtype, device=device)), right.to(dtype=dtype, device=device)


def apply_hadamard(x: Tensor, transpose: bool = False) -> Tensor:
    """x @ H (or x @ H^T with ``transpose``) for x (..., n) without building the dense (n, n) matrix.

    With H = kron(A, B) and x viewed as (..., m, p): x @ H = A^T X B (row-major), A = I when block-diagonal. The
    one implementation of R3/R4 for the student, both runtimes and the export formats, so all compute the same bits.
    One 2-D matmul by B over all rows: a broadcast matmul on a non-contiguous x (q/k heads) copies B once per row.
    """
    n = x.shape[-1]
    left, right = _operands(n, x.dtype, x.device, transpose)
    p = right.shape[0]
    y = x.reshape(-1, p) @ right
    if left is not None:
        y = left @ y.view(-1, n // p, p)
    return y.view(x.shape)


def random_hadamard(n: int, seed: int = 0) -> Tensor:
    """H @ diag(±1) with random signs: the QuaRot/SpinQuant initialisation of the residual rotation R1."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return hadamard(n) * signs[None, :]


def sylvester_blocks(x: Tensor) -> Tensor:
    """x @ H, H = diagonal blocks of the k x k Sylvester Hadamard, k the largest power of two dividing n: the
    serving profile's R4, which compressed-tensors writes as its ``hadamard`` transform (``head_dim=k`` when k < n)
    and vLLM runs with its Hadamard kernel. Computed as compressed-tensors computes it, (x @ S_k) / sqrt(k) in fp32,
    so activation codes after it agree with a compressed-tensors checkpoint's bit for bit."""
    n = x.shape[-1]
    k = n & -n
    s = _sylvester_fp32(k, x.device)
    y = x.float() @ s if k == n else (x.float().unflatten(-1, (n // k, k)) @ s).flatten(-2)
    return (y / torch.tensor(k, dtype=torch.float64).sqrt()).to(x.dtype)


@functools.lru_cache(maxsize=8)
def _sylvester_fp32(k: int, device: torch.device) -> Tensor:
    return sylvester(k).to(device)


def online_r4(profile: str) -> Callable[[Tensor], Tensor]:
    """The R4 Hadamard (x @ H4) of a student of this profile: the full-size one, or the serving profile's blocks."""
    return sylvester_blocks if profile == "serve" else apply_hadamard
