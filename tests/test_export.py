"""Int4 export: packing, export -> load -> same logits as the fake-quant student, manifest check, atomic writes."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import caq_lightning
import caq_lightning.export.writer as writer
from caq_lightning.errors import CAQError
from caq_lightning.export import Int4Linear, load_quantized, pack_int4, unpack_int4, verify_manifest, write_export
from caq_lightning.fold import fold
from caq_lightning.quant.quantizer import QuantSpec, dequantize, quantize
from tiny import padded_batch, perturbed_student

VARIANTS = {  # family -> weight quantization exercised
    "llama": {"w_group_size": 16},  # symmetric, grouped
    "qwen2": {"w_symmetric": False},  # asymmetric (zeros stored), per channel, q/k/v biases
    "mistral": {"w_bits": 3},  # fewer bits still fit a nibble
}


def _export(pair, out, **cfg):
    student = perturbed_student(pair[0], **cfg)
    model, recipe = fold(student)
    return student, write_export(model, recipe, AutoTokenizer.from_pretrained(pair[0]), out)


def test_pack_unpack_roundtrip_two_codes_per_byte():
    codes = torch.randint(0, 16, (5, 12))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble = even column
    assert torch.equal(unpack_int4(packed).long(), codes)


def test_int4_linear_dequantizes_exactly_like_the_fake_quantizer():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    for spec in (QuantSpec(4, True, 8), QuantSpec(4, False, 0)):
        codes, scale, zero = quantize(w, spec, 0.9)
        layer = Int4Linear.from_codes(codes.to(torch.int8), scale, zero, None, spec.symmetric)
        assert torch.equal(layer.dequantized_weight(), dequantize(codes, scale, zero))


@pytest.mark.parametrize("runtime,residency", [("int", "int8"), ("int", "packed"), ("dequant", "int8")])
@pytest.mark.parametrize("family", list(VARIANTS))
def test_exported_model_reproduces_the_student(tiny_pairs, tmp_path, family, runtime, residency):
    from caq_lightning.runtime.int_linear import IntLinear

    student, out = _export(tiny_pairs[family], tmp_path / "int4", **VARIANTS[family])
    ids, mask = padded_batch(student.model.config.vocab_size)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
    model, tokenizer = load_quantized(out, runtime=runtime, residency=residency)
    layers = model.model.layers
    down = layers[0].mlp.down_proj
    if runtime == "dequant":
        assert isinstance(down, Int4Linear) and down.qweight.dtype == torch.uint8
    else:
        assert isinstance(down, IntLinear) and down.int_path
        stored = down.weight_codes if residency == "int8" else down.qweight
        assert stored.dtype == (torch.int8 if residency == "int8" else torch.uint8)
    assert not any(isinstance(m, torch.nn.Linear) for m in layers.modules())  # every decoder Linear stays integer
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    diff = (got - expected)[mask.bool()].abs().max().item()
    assert diff <= 1e-3, diff
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_pairs[family][0]).get_vocab()


def test_loaded_model_generates_and_quantizes_the_kv_cache(tiny_pairs, tmp_path):
    _, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    model, _ = load_quantized(out)
    ids, _ = padded_batch(model.config.vocab_size)
    generated = model.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)
    attn = model.model.layers[0].self_attn.caq_attn
    assert attn.kv_spec.bits == 4 and attn.mode.quant and model.config._attn_implementation == "caq_int_sdpa"
    model, _ = load_quantized(out, runtime="dequant")
    assert model.generate(ids[:1, :8], max_new_tokens=5, do_sample=False).shape == (1, 13)
    assert model.config._attn_implementation == "caq_sdpa"


def test_config_and_manifest_describe_the_export(tiny_pairs, tmp_path):
    student, out = _export(tiny_pairs["qwen2"], tmp_path / "int4", w_symmetric=False, a_bits=8)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["weights"]["bits"] == 4 and q["weights"]["symmetric"] is False and q["activations"]["bits"] == 8
    assert q["online_hadamard"] == {"q_k_after_rope_R3": True, "down_proj_input_R4": True}
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= manifest.keys()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.0.self_attn.q_proj"
        assert {f"{name}.qweight", f"{name}.scales", f"{name}.zeros", f"{name}.bias"} <= keys
        assert f"{name}.weight" not in keys and f.get_tensor(f"{name}.zeros").dtype == torch.uint8


def test_corrupted_export_fails_clearly(tiny_pairs, tmp_path):
    _, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    verify_manifest(out)
    (out / "special_tokens_map.json").write_text("{}")  # an unlisted file could change what loads
    with pytest.raises(CAQError, match=r"has files not in manifest.json \(special_tokens_map.json\)"):
        load_quantized(out)
    (out / "special_tokens_map.json").unlink()
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CAQError, match="sha256 of model.safetensors does not match manifest.json; re-export it"):
        load_quantized(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CAQError, match="model.safetensors listed in manifest.json is missing"):
        load_quantized(out)
    (out / "manifest.json").unlink()
    with pytest.raises(CAQError, match="has no manifest.json"):
        load_quantized(out)


def test_non_empty_target_needs_overwrite(tiny_pairs, tmp_path):
    student = perturbed_student(tiny_pairs["llama"][0])
    model, recipe = fold(student)
    target = tmp_path / "int4"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CAQError, match="is not empty: pass --overwrite or choose another --out"):
        write_export(model, recipe, None, target)
    assert (target / "notes.txt").read_text() == "keep me"
    write_export(model, recipe, None, target, overwrite=True)
    assert not (target / "notes.txt").exists() and verify_manifest(target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # old copy and temp dir are gone


def _crash_mid_write(monkeypatch):
    """safetensors writes half of the file, then the process 'dies'."""
    real = writer.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(writer, "save_file", save_file)


def test_crash_mid_export_leaves_no_partial_target(tiny_pairs, tmp_path, monkeypatch):
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    _crash_mid_write(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_export(model, recipe, None, tmp_path / "int4")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory


def test_crash_during_overwrite_keeps_the_old_export(tiny_pairs, tmp_path, monkeypatch):
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    target = write_export(model, recipe, None, tmp_path / "int4")
    before = verify_manifest(target)
    _crash_mid_write(monkeypatch)
    with pytest.raises(OSError):
        write_export(model, recipe, None, target, overwrite=True)
    assert verify_manifest(target) == before and [p.name for p in tmp_path.iterdir()] == ["int4"]


def test_quantized_linears_take_at_most_028_of_fp16(tiny_pairs, tmp_path):
    from tiny import save_tiny_pair

    pair = save_tiny_pair(tmp_path, "llama", hidden_size=128, intermediate_size=256)
    _, out = _export(pair, tmp_path / "int4")
    packed = fp16 = 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".qweight", ".scales", ".zeros")):
                t = f.get_tensor(key)
                packed += t.numel() * t.element_size()
            if key.endswith(".qweight"):
                fp16 += t.numel() * 2 * 2  # two weights per byte, 2 bytes each in fp16
    assert packed / fp16 <= 0.28, packed / fp16


def test_load_quantized_is_exported_lazily_from_the_package():
    assert caq_lightning.load_quantized is load_quantized


@pytest.mark.parametrize("family,cfg", [("llama", {"w_group_size": 16}), ("qwen2", {"w_symmetric": False})])
def test_compressed_tensors_w4a16_view_loads_in_transformers(tiny_pairs, tmp_path, family, cfg):
    pytest.importorskip("compressed_tensors", reason="the W4A16 view needs pip install 'caq-lightning[interop]'")
    from transformers import CompressedTensorsConfig

    from caq_lightning.export import write_compressed_tensors

    student, out = _export(tiny_pairs[family], tmp_path / "int4", a_bits=16, kv_bits=16, **cfg)
    view = write_compressed_tensors(out, tmp_path / "w4a16")
    verify_manifest(view)
    # transformers 5.x mis-sizes packed zero points on a compressed load; dequantize=True reads them right
    kwargs = {} if cfg.get("w_symmetric", True) else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(view, **kwargs).eval()
    ids, mask = padded_batch(student.model.config.vocab_size)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3
    with safe_open(str(view / "model.safetensors"), "pt") as f, safe_open(str(out / "model.safetensors"), "pt") as g:
        name = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.int32
        if cfg.get("w_symmetric", True):  # the same bytes: eight nibbles per int32, little-endian, code + 8
            assert torch.equal(f.get_tensor(f"{name}.weight_packed"), g.get_tensor(f"{name}.qweight").view(torch.int32))
        assert f"model.layers.0.mlp.down_proj.weight" in f.keys()  # R4 folded in: stored dense


def test_compressed_tensors_view_needs_the_package(tiny_pairs, tmp_path, monkeypatch):
    import sys

    from caq_lightning.export import write_compressed_tensors

    _, out = _export(tiny_pairs["llama"], tmp_path / "int4")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", None)
    with pytest.raises(CAQError, match=r"pip install 'caq-lightning\[interop\]'"):
        write_compressed_tensors(out, tmp_path / "w4a16")
