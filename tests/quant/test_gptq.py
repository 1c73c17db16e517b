"""GPTQ's column order and the searched weight clip, on one Linear with correlated inputs."""

import torch

from caq_lightning.quant.clip_search import mse_clip
from caq_lightning.quant.gptq import gptq_quantize
from caq_lightning.quant.quantizer import QuantSpec, dequantize, quantize


def _layer(seed: int = 0, out: int = 48, n: int = 64, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g)
    w[:, :4] *= 6  # a few outlier input channels, as real layers have
    scales = torch.rand(n, generator=g) * 3 + 0.1  # inputs of very different magnitude: act_order has work to do
    x = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g).mul(0.3).add(torch.eye(n)) * scales
    return w, x


def _output_error(w, x, codes, scale, zero) -> float:
    return float(((dequantize(codes, scale, zero) - w) @ x.T).pow(2).sum())


def test_act_order_lowers_the_output_error_and_keeps_the_layout():
    spec = QuantSpec(4, True, 0)
    wins = 0
    for seed in range(4):
        w, x = _layer(seed)
        h = x.T @ x
        plain = gptq_quantize(w, h, spec, 0.98)
        ordered = gptq_quantize(w, h, spec, 0.98, act_order=True)
        assert ordered[0].shape == plain[0].shape and ordered[1].shape == plain[1].shape
        torch.testing.assert_close(ordered[1], plain[1])  # per-row grids: the same scale either way
        wins += _output_error(w, x, *ordered) < _output_error(w, x, *plain)
    assert wins >= 3


def test_act_order_with_groups_uses_each_columns_own_group():
    spec = QuantSpec(4, True, 16)
    w, x = _layer(1)
    codes, scale, zero = gptq_quantize(w, x.T @ x, spec, 1.0, act_order=True)
    # static groups: each group's grid is the RTN grid of the unquantized weights
    _, rtn_scale, rtn_zero = quantize(w, spec, 1.0)
    torch.testing.assert_close(scale, rtn_scale)
    assert codes.shape == (48, 4, 16)
    err = _output_error(w, x, codes, scale, zero)
    assert err < _output_error(w, x, *quantize(w, spec, 1.0))


def test_mse_clip_never_loses_to_no_clip_and_shrinks_outlier_rows():
    spec = QuantSpec(4, True, 0)
    w, _ = _layer(2)
    clip = mse_clip(w, spec)
    assert clip.shape == (48, 1, 1) and bool((clip <= 1).all()) and bool((clip >= 0.2).all())

    def err(c):
        codes, scale, zero = quantize(w, spec, c)
        return (dequantize(codes, scale, zero) - w).abs().pow(2.4).sum(-1)

    assert bool((err(clip) <= err(1.0) + 1e-4).all())
    assert float(err(clip).sum()) < 0.95 * float(err(1.0).sum())
    assert bool((clip < 1).any())
