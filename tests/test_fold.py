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


@pytest.mark.parametrize("hessians", ["sequential", "one_pass"])
@pytest.mark.parametrize("a_bits, kv_bits", [(16, 16), (8, 8)])
def test_gptq_rounding_beats_rtn_on_calibration_data(tiny_pairs, hessians, a_bits, kv_bits):
    student = perturbed_student(tiny_pairs["llama"][0], w_bits=3, a_bits=a_bits, kv_bits=kv_bits)
    ids, mask = padded_batch(student.model.config.vocab_size)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad(), student.mode(False, False):
        teacher = student(input_ids=ids, attention_mask=mask).logits
    rtn, _ = fold(student)
    gptq, recipe = fold(student, calibration=batches, rounding="gptq", hessians=hessians)
    with torch.no_grad():
        kl_rtn = kl_div(teacher, rtn(input_ids=ids, attention_mask=mask).logits, mask)
        kl_gptq = kl_div(teacher, gptq(input_ids=ids, attention_mask=mask).logits, mask)
    assert recipe.rounding == "gptq" and kl_gptq < kl_rtn
    assert len(recipe.weights) == 7 * student.model.config.num_hidden_layers


def test_sequential_hessians_see_the_rounded_layers_before(tiny_pairs):
    """The first stage (q/k/v of layer 0) sees the same inputs either way; everything after sees rounded inputs."""
    student = perturbed_student(tiny_pairs["llama"][0], w_bits=3, a_bits=16, kv_bits=16)
    ids, mask = padded_batch(student.model.config.vocab_size)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    _, seq = fold(student, calibration=batches, rounding="gptq", hessians="sequential")
    _, one = fold(student, calibration=batches, rounding="gptq", hessians="one_pass")
    names = list(seq.weights)
    same = [n for n in names if torch.equal(seq.weights[n][0], one.weights[n][0])]
    first = [n for n in names if ".layers.0.self_attn." in n and n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
    assert set(first) <= set(same) and len(same) < len(names)


def test_searched_clip_and_act_order_stay_on_the_grid_and_beat_the_fixed_clip(tiny_pairs):
    """w_clip_search=mse and gptq_act_order change only how GPTQ chooses the codes: the layout and runtime stay."""
    opts = dict(w_bits=3, a_bits=16, kv_bits=16, w_rounding="gptq")
    base = perturbed_student(tiny_pairs["llama"][0], **opts, w_clip_search="none", gptq_act_order=False)
    tuned = perturbed_student(tiny_pairs["llama"][0], **opts, w_clip_search="mse", gptq_act_order=True)
    ids, mask = padded_batch(base.model.config.vocab_size)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    with torch.no_grad(), base.mode(False, False):
        teacher = base(input_ids=ids, attention_mask=mask).logits
    kls = []
    for student in (base, tuned):
        model, recipe = fold(student, calibration=batches)
        for name, (codes, scale, zero) in recipe.weights.items():
            torch.testing.assert_close(model.get_submodule(name).weight, dequantize(codes.float(), scale, zero))
        with torch.no_grad():
            kls.append(float(kl_div(teacher, model(input_ids=ids, attention_mask=mask).logits, mask)))
    assert kls[1] < kls[0]


def test_gptq_default_rounding_needs_calibration(tiny_pairs):
    from caq_lightning.errors import CAQError

    student = perturbed_student(tiny_pairs["llama"][0], w_rounding="gptq")
    with pytest.raises(CAQError, match="calibration"):
        fold(student)


def test_fp_weight_training_leaves_the_student_weights_unquantized(tiny_pairs):
    """w_train=fp (the AAQ way): the student computes with FP transformed weights; only the export rounds them."""
    fp = perturbed_student(tiny_pairs["llama"][0], w_train="fp")
    w16 = perturbed_student(tiny_pairs["llama"][0], w_bits=16)
    rtn = perturbed_student(tiny_pairs["llama"][0], w_train="rtn")
    ids, mask = padded_batch(fp.model.config.vocab_size)
    with torch.no_grad():
        a, b, c = (s(input_ids=ids, attention_mask=mask).logits for s in (fp, w16, rtn))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not any("clip_logit" in n for n, p in fp.named_parameters() if p.requires_grad)


def test_folded_model_generates(tiny_pairs):
    model, _ = fold(perturbed_student(tiny_pairs["qwen2"][0]))
    ids, _ = padded_batch(model.config.vocab_size)
    out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
