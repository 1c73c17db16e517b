import pytest
import torch

from caq_lightning.errors import CAQError
from caq_lightning.quant.quantizer import QuantSpec, WeightQuantizer, dequantize, fake_quantize, quantize


def test_symmetric_per_channel_matches_direct_formula():
    w = torch.randn(5, 16)
    spec = QuantSpec(bits=4, symmetric=True)
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    expected = torch.clamp(torch.round(w / scale), -8, 7) * scale
    torch.testing.assert_close(fake_quantize(w, spec), expected)


def test_asymmetric_per_token_matches_direct_formula():
    x = torch.randn(2, 3, 12) + 0.5
    spec = QuantSpec(bits=4, symmetric=False)
    xmax, xmin = x.amax(-1, keepdim=True).clamp(min=0), x.amin(-1, keepdim=True).clamp(max=0)
    scale = (xmax - xmin) / 15
    zero = torch.round(-xmin / scale)
    expected = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
    torch.testing.assert_close(fake_quantize(x, spec), expected)


def test_grouped_quantization_uses_one_range_per_group():
    w = torch.randn(4, 32)
    w[:, :8] *= 100  # a huge first group must not coarsen the others
    grouped = fake_quantize(w, QuantSpec(bits=4, group_size=8))
    per_row = fake_quantize(w, QuantSpec(bits=4))
    assert (grouped[:, 8:] - w[:, 8:]).abs().mean() < (per_row[:, 8:] - w[:, 8:]).abs().mean() / 10


def test_codes_fit_in_the_bit_width_and_roundtrip():
    x = torch.randn(6, 24)
    for spec in (QuantSpec(4, True, 8), QuantSpec(4, False, 0), QuantSpec(3, True, 0)):
        codes, scale, zero = quantize(x, spec)
        lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
        assert codes.min() >= lo and codes.max() <= hi and torch.equal(codes, codes.round())
        torch.testing.assert_close(dequantize(codes, scale, zero), fake_quantize(x, spec))


def test_straight_through_gradient_is_identity_inside_range():
    x = torch.randn(3, 8, requires_grad=True)
    fake_quantize(x, QuantSpec(bits=8, symmetric=False)).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x), atol=0.05)


def test_sixteen_bits_is_a_no_op():
    x = torch.randn(3, 8)
    assert fake_quantize(x, QuantSpec(bits=16)) is x


def test_learned_clip_receives_gradient_and_shrinks_range():
    w = torch.randn(4, 16)
    quant = WeightQuantizer(QuantSpec(bits=4), 4, 16, learn_clip=True, clip_init=0.9)
    out = quant(w)
    assert out.max() <= 0.9 * w.abs().max() + 1e-6  # the positive side tops out at 7 steps of the clipped scale
    (out - w).pow(2).sum().backward()
    assert quant.clip_logit.grad is not None and quant.clip_logit.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [1, 17])
def test_bits_outside_range_raise(bits):
    with pytest.raises(CAQError, match="outside 2-16"):
        QuantSpec(bits=bits)


def test_group_size_must_divide_dimension():
    with pytest.raises(CAQError, match="does not divide"):
        fake_quantize(torch.randn(2, 10), QuantSpec(bits=4, group_size=4))


@pytest.mark.slow
def test_compiled_fake_quantizer_matches_eager(monkeypatch):
    """The torch.compile'd fake quantizer (large tensors) gives the eager values bit for bit and the same gradients."""
    import caq_lightning.quant.quantizer as quantizer

    monkeypatch.setenv("CAQ_FAKE_QUANT_COMPILE", "1")
    monkeypatch.setattr(quantizer, "_compiled", {})
    torch.manual_seed(0)
    cases = [  # a weight with a learned clip; bf16 activations per token with a fixed clip ratio
        (torch.randn(384, 256) * torch.rand(384, 1), QuantSpec(4, True, 0), torch.rand(384, 1, 1) * 0.5 + 0.5),
        (torch.randn(2, 128, 512).bfloat16() + 0.3, QuantSpec(4, False, 128, clip_ratio=0.9), 1.0),
    ]
    for x, spec, clip in cases:
        assert x.numel() >= quantizer.FUSE_MIN_NUMEL
        results = []
        for compiled in (False, True):
            monkeypatch.setattr(quantizer, "FUSE_MIN_NUMEL", 1 if compiled else x.numel() + 1)
            xi = x.clone().requires_grad_()
            ci = clip.clone().requires_grad_() if isinstance(clip, torch.Tensor) else clip
            out = fake_quantize(xi, spec, ci)
            (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
            results.append((out, xi.grad, None if isinstance(ci, float) else ci.grad))
        assert quantizer._compiled["fake_quantize"] is not False  # it compiled and ran
        (eager, eager_x, eager_clip), (fused, fused_x, fused_clip) = results
        assert torch.equal(fused, eager)
        torch.testing.assert_close(fused_x, eager_x, rtol=1e-4, atol=1e-5)
        if eager_clip is not None:
            torch.testing.assert_close(fused_clip, eager_clip, rtol=1e-4, atol=1e-4)


def test_compiled_fake_quantizer_serves_every_variant_a_run_uses_without_hitting_the_recompile_limit(monkeypatch):
    """Activations, KV and weights (three specs) x fp32/bf16 x grad on/off x a Parameter with a learned clip: more
    graphs than dynamo's default limit of 8, past which it warns and falls back to eager for the rest of the run."""
    from torch import nn

    import logging

    import caq_lightning.quant.quantizer as quantizer

    monkeypatch.setenv("CAQ_FAKE_QUANT_COMPILE", "1")
    monkeypatch.setattr(quantizer, "_compiled", {})

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    torch_logger = logging.getLogger("torch._dynamo.convert_frame")  # where it warns; torch logs skip the root
    torch_logger.addHandler(records)
    specs = [QuantSpec(4, False, 0), QuantSpec(4, True, 0), QuantSpec(8, False, 0)]
    for spec in specs:
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                x = torch.randn(64, 1024, dtype=dtype, requires_grad=grad)
                with torch.set_grad_enabled(grad):
                    fake_quantize(x, spec)
    weight = nn.Parameter(torch.randn(64, 1024))
    out = fake_quantize(weight, specs[1], torch.full((64, 1, 1), 0.9))
    torch_logger.removeHandler(records)
    assert quantizer._compiled["fake_quantize"] is not False  # it compiled and ran
    assert out.requires_grad and type(out) is torch.Tensor
    assert not [m for m in records.messages if "recompile_limit" in m]
