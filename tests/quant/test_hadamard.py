import pytest
import torch

from caq_lightning.quant.hadamard import apply_hadamard, hadamard, hadamard_factors, random_hadamard


@pytest.mark.parametrize("n", [1, 8, 12, 28, 64, 96, 172, 688, 2816, 3584])
def test_hadamard_is_orthogonal(n):
    h = hadamard(n, dtype=torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [64, 96, 172, 3584])
def test_apply_hadamard_equals_dense_matmul(n):
    x = torch.randn(2, 3, n, dtype=torch.float64)
    torch.testing.assert_close(apply_hadamard(x), x @ hadamard(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 96, 172, 12 * 16])  # Sylvester, Paley x Sylvester, block-diagonal
def test_apply_hadamard_transpose_is_the_dense_transpose_and_inverts_it(n):
    x = torch.randn(5, 3, n, dtype=torch.float64).transpose(0, 1)  # non-contiguous, as q and k after the transpose
    torch.testing.assert_close(apply_hadamard(x, transpose=True), x @ hadamard(n, dtype=torch.float64).T)
    torch.testing.assert_close(apply_hadamard(apply_hadamard(x), transpose=True), x)


def test_llama_and_mistral_mlp_sizes_get_structured_factors():
    # 11008 = 43 * 256 (no small Paley factor: block-diagonal), 14336 = 28 * 512 (Paley x Sylvester).
    a, b = hadamard_factors(11008)
    assert a is None and b.shape == (256, 256)
    a, b = hadamard_factors(14336)
    assert a.shape == (28, 28) and b.shape == (512, 512)
    x = torch.randn(2, 14336, dtype=torch.float64)
    torch.testing.assert_close(apply_hadamard(x).norm(dim=-1), x.norm(dim=-1))  # orthogonal: norms preserved


def test_full_hadamard_spreads_an_outlier_evenly():
    x = torch.zeros(1, 64)
    x[0, 3] = 8.0
    y = apply_hadamard(x)
    torch.testing.assert_close(y.abs(), torch.full_like(y, 1.0))


def test_random_hadamard_is_orthogonal_and_seeded():
    r = random_hadamard(32, seed=1)
    torch.testing.assert_close(r @ r.T, torch.eye(32), atol=1e-6, rtol=0)
    assert torch.equal(r, random_hadamard(32, seed=1)) and not torch.equal(r, random_hadamard(32, seed=2))
