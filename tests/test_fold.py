"""fold(): a plain transformers model (+ runtime) with the fake-quant student's logits."""

import pytest
import torch

from caq_lightning.fold import fold
from caq_lightning.losses import kl_div
from caq_lightning.quant.quantizer import dequantize
from tiny import padded_batch, perturbed_student


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_folded_model_reproduces_student_logits(tiny_pairs, family):
    student = perturbed_student(tiny_pairs[family][0], w_group_size=16)
    ids, mask = padded_batch(student.model.config.vocab_size)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits
    model, recipe = fold(student)
    assert type(model).__name__.endswith("ForCausalLM") and not any("linear" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() < 1e-4


def test_folded_weights_lie_on_the_integer_grid(tiny_pairs):
    student = perturbed_student(tiny_pairs["llama"][0])
    model, recipe = fold(student)
    name, (codes, scale, zero) = next(iter(recipe.weights.items()))
    assert codes.dtype == torch.int8 and codes.abs().max() <= 8
    torch.testing.assert_close(model.get_submodule(name).weight, dequantize(codes.float(), scale, zero))
    assert len(recipe.weights) == 7 * student.model.config.num_hidden_layers


def test_gptq_rounding_beats_rtn_on_calibration_data(tiny_pairs):
    student = perturbed_student(tiny_pairs["llama"][0], w_bits=3, a_bits=16, kv_bits=16)
    ids, mask = padded_batch(student.model.config.vocab_size)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad(), student.mode(False, False):
        teacher = student(input_ids=ids, attention_mask=mask).logits
    rtn, _ = fold(student)
    gptq, recipe = fold(student, calibration=batches, gptq=True)
    with torch.no_grad():
        kl_rtn = kl_div(teacher, rtn(input_ids=ids, attention_mask=mask).logits, mask)
        kl_gptq = kl_div(teacher, gptq(input_ids=ids, attention_mask=mask).logits, mask)
    assert recipe.rounding == "gptq" and kl_gptq < kl_rtn


def test_folded_model_generates(tiny_pairs):
    model, _ = fold(perturbed_student(tiny_pairs["qwen2"][0]))
    ids, _ = padded_batch(model.config.vocab_size)
    out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
