"""Adding a model family is one adapter registration: a Llama-shaped model under a model_type CAQ has never seen,
registered here and nowhere else, calibrates, folds and exports through the same code as the shipped families; a
family whose norm is another kind (Gemma's) or that has other smoothing scales differs only in its adapter's data."""

import lightning as L
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from caq_lightning import models
from caq_lightning.config import LossConfig, OptimConfig, QuantConfig
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.export import Int4Linear, load_quantized, write_export
from caq_lightning.fold import fold
from caq_lightning.models import DecoderAdapter, RMSNorm, register
from caq_lightning.module import CAQModule
from caq_lightning.student import CAQStudent, StudentView
from tiny import build_tokenizer, padded_batch

MODEL_TYPE = "caq_test_llama"


class ToyConfig(LlamaConfig):
    model_type = MODEL_TYPE


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """A saved model of the new family; its adapter is registered for this test only."""
    AutoConfig.register(MODEL_TYPE, ToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)
    monkeypatch.setattr(models, "ADAPTERS", dict(models.ADAPTERS))  # the registration below is undone afterwards
    tok = build_tokenizer()
    config = ToyConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.08, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path / "toy"
    ToyForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_unregistered_family_is_refused(toy_family):
    with pytest.raises(CAQError, match=f"unsupported architecture '{MODEL_TYPE}'.*CAQ supports llama, qwen2, mistral"):
        CAQModule(teacher=str(toy_family), base=None, loss=LossConfig(name="kl"))


def test_a_fourth_family_calibrates_folds_and_exports(toy_family, text_file, tmp_path):
    register(DecoderAdapter(model_type=MODEL_TYPE))
    module = CAQModule(
        teacher=str(toy_family), base=None, loss=LossConfig(name="kl"), rtn_kl_every=0,
        optim=OptimConfig(lr_rotation=0.05, lr_scale=0.05), quant=QuantConfig(w_train="rtn", w_rounding="rtn"),
    )  # fmt: skip
    init = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    data = CalibrationData(source=str(text_file), tokenizer=str(toy_family), num_samples=8, seq_len=32, batch_size=2)
    L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    ).fit(module, data)  # fmt: skip
    assert any(not torch.equal(p, init[n]) for n, p in module.named_parameters() if p.requires_grad)  # calibrated

    ids, mask = padded_batch(module.student.model.config.vocab_size)
    with torch.no_grad():
        expected = StudentView(module.student, True, True)(input_ids=ids, attention_mask=mask).logits
    model, recipe = module.fold()
    assert isinstance(model, ToyForCausalLM) and len(recipe.weights) == 7 * 2  # every decoder Linear on the grid
    with torch.no_grad():
        folded = model(input_ids=ids, attention_mask=mask).logits
    assert (folded - expected)[mask.bool()].abs().max() < 1e-4

    out = write_export(model, recipe, None, tmp_path / "export")
    loaded, _ = load_quantized(out, runtime="dequant")
    assert isinstance(loaded, ToyForCausalLM) and isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3


class GemmaNorm(RMSNorm):
    """Gemma's RMSNorm, x / rms(x) * (1 + g) with its epsilon in ``eps``: the factor that folds is 1 + g."""

    def normalize(self, norm, x):
        h = x.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)

    def scale(self, norm):
        return 1 + norm.weight

    def folded_weight(self, norm, divisor):
        return super().folded_weight(norm, divisor) - 1  # the folded norm still multiplies by 1 + w


def test_another_norm_kind_and_other_smoothing_scales_are_adapter_data(monkeypatch):
    monkeypatch.setattr(models, "ADAPTERS", dict(models.ADAPTERS))  # the registration below is undone afterwards
    slots = {"qkv": "hidden", "down": "intermediate", "vo": "kv_width"}  # none between post-attention norm and MLP
    register(DecoderAdapter(model_type="gemma", norm_kind=GemmaNorm(), smoothing=slots))
    vocab = len(build_tokenizer())
    config = GemmaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GemmaForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's norms start at g = 0 (a factor of 1): make the fold rule matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ids, mask = padded_batch(vocab)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    student = CAQStudent(model, QuantConfig(w_train="rtn", w_rounding="rtn"))  # RTN: the fold is exact
    transforms = student.layer_transforms[0]
    assert transforms.log_s_qkv is not None and not hasattr(transforms, "log_s_upgate")
    with torch.no_grad():  # calibrated-looking transforms, so the fold has something to carry
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        fp_transformed = StudentView(student, True, False)(input_ids=ids, attention_mask=mask).logits
        expected = StudentView(student, True, True)(input_ids=ids, attention_mask=mask).logits
        folded, _ = fold(student)
        got = folded(input_ids=ids, attention_mask=mask).logits
    mask = mask.bool()
    assert (fp_transformed - reference)[mask].abs().max() < 1e-4  # the transforms are exact in full precision
    assert (got - expected)[mask].abs().max() < 1e-4
