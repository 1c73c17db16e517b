"""Integer runtime: the same activation codes as the fake quantizer, exact int32 products, logits of the fake-quant
student, an integer KV cache, and a dequantizing fallback with one warning."""

import logging

import pytest
import torch
from tiny import padded_batch, perturbed_student
from transformers import AutoTokenizer

import caq_lightning.runtime.int_linear as int_runtime
from caq_lightning.errors import CAQError
from caq_lightning.evaluate import parse_args
from caq_lightning.export import Int4Linear, load_quantized, write_export
from caq_lightning.fold import fold
from caq_lightning.quant.hadamard import apply_hadamard
from caq_lightning.quant.quantizer import QuantSpec, dequantize, fake_quantize, quantize
from caq_lightning.runtime.int_kv import IntKVLayer, kv_codes, kv_values
from caq_lightning.runtime.int_linear import IntLinear, int_mm, quantize_codes, quantize_rows

SPECS = [QuantSpec(4, False, 0), QuantSpec(4, True, 0), QuantSpec(8, False, 0), QuantSpec(4, False, 16)]


def _export(pair, out, **cfg):
    student = perturbed_student(pair[0], **cfg)
    model, recipe = fold(student)
    return student, write_export(model, recipe, AutoTokenizer.from_pretrained(pair[0]), out)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_are_the_fake_quantizers_codes(spec, dtype, monkeypatch):
    torch.manual_seed(0)
    x = (torch.randn(70, 64) * torch.rand(70, 1) * 5).to(dtype)
    x[3] = 0  # an all-zero token: the scale clamp
    codes, scale, zero = quantize(x.float(), spec)
    monkeypatch.setattr(int_runtime, "CHUNK_ELEMENTS", 64 * 8)  # several row chunks
    got_codes, got_scale, got_zero = quantize_rows(x, spec)
    assert got_codes.dtype == torch.int8 and torch.equal(got_scale, scale.squeeze(-1))
    if int_runtime.centered(spec):  # codes - zero, no zero point left
        assert got_zero is None and torch.equal(got_codes.float(), (codes - zero).flatten(-2))
    else:  # 8-bit asymmetric: codes and zero both shifted by 128
        assert torch.equal(got_codes.float() + 128, codes.flatten(-2)) and torch.equal(got_zero + 128, zero[..., 0])
    assert torch.equal(quantize_codes(x, spec)[0], got_codes)


@pytest.mark.parametrize("m", [1, 2, 17, 64, 65, 300])
def test_int_mm_is_exact_in_every_layout(m):
    torch.manual_seed(m)
    a = torch.randint(-8, 8, (m, 96), dtype=torch.int8)
    w = torch.randint(-15, 16, (40, 96), dtype=torch.int8)
    got = int_mm(a, w)
    assert got.dtype == torch.int32 and got.shape == (m, 40)
    assert got.is_contiguous()  # a transposed view made the lm_head's matmul copy its weight once per row
    assert torch.equal(got, a.int() @ w.int().T)
    assert torch.equal(got.double(), a.double() @ w.double().T)  # the float product of the same codes


@pytest.mark.parametrize(
    "w_spec,a_spec,hadamard",
    [
        (QuantSpec(4, True, 0), QuantSpec(4, False, 0), False),  # the default recipe
        (QuantSpec(4, True, 0), QuantSpec(4, False, 0), True),  # R4 before down_proj
        (QuantSpec(4, False, 0), QuantSpec(4, True, 0), False),  # asymmetric weights, symmetric activations
        (QuantSpec(4, True, 16), QuantSpec(4, False, 32), False),  # grouped: blocks of 16
        (QuantSpec(3, False, 32), QuantSpec(8, False, 16), False),  # 8-bit asymmetric codes shifted into int8
    ],
    ids=["default", "r4", "asym-w", "grouped", "a8"],
)
@pytest.mark.parametrize("residency", ["int8", "packed"])
def test_int_linear_matches_dequantized_weights_times_fake_quantized_input(w_spec, a_spec, hadamard, residency):
    torch.manual_seed(0)
    w, x, bias = torch.randn(48, 64), torch.randn(2, 7, 64) * 3, torch.randn(48)
    codes, scale, zero = quantize(w, w_spec, 0.9)
    int4 = Int4Linear.from_codes(codes.to(torch.int8), scale, zero, bias, w_spec.symmetric)
    layer = IntLinear.from_int4(int4, a_spec, hadamard, residency)
    assert layer.int_path
    xin = apply_hadamard(x) if hadamard else x
    expected = torch.nn.functional.linear(fake_quantize(xin, a_spec), dequantize(codes, scale, zero), bias)
    got = layer(x)
    assert got.shape == (2, 7, 48)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(layer.weight_int8().float(), (codes - zero).flatten(-2))  # resident codes are exact


def test_exported_model_runs_on_integer_codes(tiny_pairs, tmp_path):
    student, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    model, _ = load_quantized(out)  # the default runtime
    layers = model.model.layers
    assert all(isinstance(m, IntLinear) and m.int_path for m in layers.modules() if hasattr(m, "in_features"))
    assert layers[0].mlp.down_proj.hadamard and not layers[0].mlp.up_proj.hadamard
    assert layers[0].mlp.down_proj.weight_codes.dtype == torch.int8
    calls = []
    real = torch._int_mm
    torch._int_mm = lambda a, b: calls.append(a.dtype) or real(a, b)
    try:
        ids, mask = padded_batch(model.config.vocab_size)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
            expected = student(input_ids=ids, attention_mask=mask).logits
    finally:
        torch._int_mm = real
    assert len(calls) == 7 * len(layers) and set(calls) == {torch.int8}  # every decoder Linear, int8 inputs
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3


def test_kv_cache_holds_integer_codes_and_decodes_like_a_full_forward(tiny_pairs, tmp_path):
    _, out = _export(tiny_pairs["qwen2"], tmp_path / "int4", kv_group_size=8)
    model, _ = load_quantized(out)
    ids, _ = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :20], use_cache=True)
        cache = prefill["cache"] if "cache" in prefill else prefill["past_key_values"]
        step = model(input_ids=ids[:, 20:21], **{_cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
        full = model(input_ids=ids[:, :21], use_cache=False).logits[:, -1]
    layer = cache.layers[0]
    assert isinstance(layer, IntKVLayer) and layer.keys.dtype == torch.int8 and layer.values.dtype == torch.int8
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert layer.keys.shape == (2, model.config.num_key_value_heads, 21, head_dim)
    assert layer.key_scales.shape == (2, model.config.num_key_value_heads, 21, head_dim // 8)
    assert layer.key_zeros is None and layer.keys.min() >= -15 and layer.keys.max() <= 15  # centered 4-bit codes
    assert (step - full).abs().max() <= 1e-4


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kv_codes_roundtrip_is_the_fake_quantizer(spec):
    k = torch.randn(2, 3, 5, 16)
    assert torch.equal(kv_values(*kv_codes(k, spec), torch.float32), fake_quantize(k, spec))


def test_generate_matches_the_dequant_runtime(tiny_pairs, tmp_path):
    _, out = _export(tiny_pairs["mistral"], tmp_path / "int4")
    generated = {}
    for runtime in ("int", "dequant"):
        model, _ = load_quantized(out, runtime=runtime)
        ids, _ = padded_batch(model.config.vocab_size)
        generated[runtime] = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(generated["int"], generated["dequant"])


def test_missing_int_mm_falls_back_to_dequant_with_one_warning(tiny_pairs, tmp_path, monkeypatch, caplog):
    student, out = _export(tiny_pairs["llama"], tmp_path / "int4")

    def rejected(a, b):
        raise RuntimeError("_int_mm: this backend does not support int8 matmul\nsecond line")

    monkeypatch.setattr(torch, "_int_mm", rejected)
    monkeypatch.setattr(int_runtime, "_warned", set())
    model, _ = load_quantized(out)
    ids, mask = padded_batch(model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="caq_lightning.runtime"), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids, attention_mask=mask)
        expected = student(input_ids=ids, attention_mask=mask).logits
    assert [r.getMessage() for r in caplog.records] == [
        "int runtime: torch._int_mm failed (_int_mm: this backend does not support int8 matmul); dequantizing instead"
    ]
    assert not any(m.int_path for m in model.model.layers.modules() if isinstance(m, IntLinear))
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3


def test_unquantized_activations_use_the_dequant_path(tiny_pairs, tmp_path, monkeypatch, caplog):
    student, out = _export(tiny_pairs["llama"], tmp_path / "int4", a_bits=16)
    monkeypatch.setattr(int_runtime, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="caq_lightning.runtime"):
        model, _ = load_quantized(out)
    assert len(caplog.records) == 1 and "a_bits=16" in caplog.records[0].getMessage()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        diff = model(input_ids=ids, attention_mask=mask).logits - student(input_ids=ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() <= 1e-3


def test_bad_runtime_or_residency_is_one_clear_error(tiny_pairs, tmp_path):
    _, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    with pytest.raises(CAQError, match="runtime must be 'int' or 'dequant', got 'fast'"):
        load_quantized(out, runtime="fast")
    with pytest.raises(CAQError, match="residency must be 'int8' or 'packed'"):
        load_quantized(out, residency="int4")


def test_a_filled_float_cache_is_refused(tiny_pairs, tmp_path):
    from transformers import DynamicCache

    _, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    model, _ = load_quantized(out)
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(CAQError, match="keeps its own integer KV cache"), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2]]), **{_cache_kwarg(model): cache}, use_cache=True)


def test_evaluate_selects_the_runtime():
    assert parse_args(["--model", "x"]).runtime == "int"
    assert parse_args(["--model", "x", "--runtime", "dequant"]).runtime == "dequant"
    with pytest.raises(SystemExit):
        parse_args(["--model", "x", "--runtime", "fast"])


def test_fused_prefill_path_gives_the_same_codes_and_logits(tiny_pairs, tmp_path, monkeypatch):
    """Prefill-sized inputs run quantize and rescale through torch.compile: the codes must not change."""
    monkeypatch.delenv("CAQ_INT_COMPILE", raising=False)
    torch.manual_seed(0)
    for spec in (QuantSpec(4, False, 0), QuantSpec(4, True, 0)):
        x = torch.randn(300, 64).bfloat16() * 4
        eager, fused = quantize_codes(x, spec), int_runtime.fused(quantize_codes)(x, spec)
        assert torch.equal(eager[0], fused[0]) and torch.equal(eager[1], fused[1])
    student, out = _export(tiny_pairs["qwen2"], tmp_path / "int4")  # q/k/v biases go through the fused rescale
    model, _ = load_quantized(out)
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(int_runtime, "FUSE_MIN_ROWS", 1)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert int_runtime._compiled.get(int_runtime.rescale) not in (None, False)  # the compiled kernel ran
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(int_runtime, "_compiled", {})
    monkeypatch.setattr(int_runtime, "_warned", set())
    monkeypatch.delenv("CAQ_INT_COMPILE", raising=False)
    x = torch.randn(300, 64)
    with caplog.at_level(logging.WARNING, logger="caq_lightning.runtime"):
        first = int_runtime.fused(quantize_codes)(x, SPECS[0])
        int_runtime.fused(quantize_codes)(x, SPECS[0])
    assert torch.equal(first[0], quantize_codes(x, SPECS[0])[0])
    assert [r.getMessage() for r in caplog.records] == [
        "int runtime: torch.compile failed (RuntimeError); quantizing and rescaling eagerly"
    ]
