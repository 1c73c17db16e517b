"""Every equivalence transform is exact in full precision: transformed-but-unquantized logits == teacher's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from caq_lightning.quant.transforms import Rotation
from caq_lightning.student import CAQStudent, QuantConfig


def _perturb(student: CAQStudent, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _batch(vocab: int):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding exercises the attention-mask path of the hook
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_transformed_fp_student_matches_teacher(tiny_pairs, family):
    aligned_dir, _ = tiny_pairs[family]
    model = AutoModelForCausalLM.from_pretrained(aligned_dir).eval()
    ids, mask = _batch(model.config.vocab_size)
    reference = model(input_ids=ids, attention_mask=mask).logits
    student = CAQStudent(model, QuantConfig())
    _perturb(student)  # non-identity R1, R2 and smoothing scales
    with torch.no_grad(), student.mode(transform=True, quant=False):
        transformed = student(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (transformed - reference)[real].abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_teacher_mode_is_bitwise_the_original_model(tiny_pairs, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_pairs[family][0]).eval()
    ids, mask = _batch(model.config.vocab_size)
    reference = model(input_ids=ids, attention_mask=mask).logits
    student = CAQStudent(model, QuantConfig())
    with torch.no_grad(), student.mode(transform=False, quant=False):
        assert torch.equal(student(input_ids=ids, attention_mask=mask).logits, reference)


def test_quantized_student_differs_and_kv_quant_is_live(tiny_pairs):
    model = AutoModelForCausalLM.from_pretrained(tiny_pairs["llama"][0]).eval()
    ids, mask = _batch(model.config.vocab_size)
    student = CAQStudent(model, QuantConfig(w_bits=16, a_bits=16, kv_bits=4))
    with torch.no_grad():
        with student.mode(True, False):
            fp = student(input_ids=ids, attention_mask=mask).logits
        with student.mode(True, True):
            kv_only = student(input_ids=ids, attention_mask=mask).logits
    assert (fp - kv_only).abs().max() > 1e-3  # only the KV cache is quantized, and it changes the output


def test_only_transform_and_clip_parameters_are_trainable(tiny_pairs):
    model = AutoModelForCausalLM.from_pretrained(tiny_pairs["qwen2"][0])
    student = CAQStudent(model, QuantConfig())
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(("r1" in n or "layer_transforms." in n or "clip_logit" in n) for n in trainable)
    groups = student.param_groups()
    assert len(groups["rotation"]) == 1 + model.config.num_hidden_layers  # R1 + one R2 per block
    assert sum(map(len, groups.values())) == len(trainable)


def test_rotation_stays_orthogonal_under_adam():
    rot = Rotation(torch.linalg.qr(torch.randn(16, 16))[0])
    opt = torch.optim.Adam(rot.parameters(), lr=0.1)
    target = torch.randn(16, 16)
    for _ in range(20):
        opt.zero_grad()
        (rot.matrix - target).pow(2).sum().backward()
        opt.step()
    m = rot.matrix.detach()
    torch.testing.assert_close(m @ m.T, torch.eye(16), atol=1e-5, rtol=0)


def test_head_rotates_its_input_back_instead_of_folding_r1(tiny_pairs, monkeypatch):
    """A training forward computes the head as (x R1^T diag(g)) W^T: no (V, D) x (D, D) fold of R1 every step, and
    the logits of the folded weight that evaluation (frozen_weights) and the export use."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pairs["llama"][0]).eval()
    ids, mask = _batch(model.config.vocab_size)
    student = CAQStudent(model, QuantConfig())
    _perturb(student)
    head, folds = student.model.lm_head, []
    fold = head.effective_weight
    monkeypatch.setattr(head, "effective_weight", lambda: folds.append(1) or fold())
    logits = student(input_ids=ids, attention_mask=mask).logits
    assert logits.requires_grad and not folds
    with torch.no_grad(), student.frozen_weights():
        frozen = student(input_ids=ids, attention_mask=mask).logits
    assert folds == [1]
    torch.testing.assert_close(logits[mask.bool()], frozen[mask.bool()], atol=1e-4, rtol=1e-4)
