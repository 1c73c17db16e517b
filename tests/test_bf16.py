"""bf16 autocast on CPU (``precision="bf16-mixed"``): the forward matmuls run in bf16, the transforms stay fp32."""

import lightning as L
import pytest
import torch
from tiny import perturbed_student

from caq_lightning.config import LossConfig
from caq_lightning.data import CalibrationData
from caq_lightning.module import CAQModule, rotations_once
from caq_lightning.student import QuantLinear


def bf16_autocast():
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def student(tiny_pairs):
    return perturbed_student(tiny_pairs["llama"][0])


def test_folded_quantized_weights_are_fp32_and_identical_under_autocast(student):
    linears = [m for m in student.model.modules() if isinstance(m, QuantLinear)]
    for linear in linears:
        expected, _ = linear.quantized_weight()
        with bf16_autocast():
            got, _ = linear.quantized_weight()
        assert got.dtype == torch.float32 and torch.equal(got, expected), linear.role


def test_residual_rotation_of_activations_is_fp32_under_autocast(student):
    hidden = torch.randn(2, 5, student.dims["hidden"])
    expected = student.unrotate(hidden)
    with bf16_autocast():
        assert torch.equal(student.unrotate(hidden), expected)
    ids = torch.randint(0, student.model.config.vocab_size, (1, 6))
    with torch.no_grad(), student.capture_blocks({0}) as blocks:
        student(input_ids=ids)
        reference = blocks[0].clone()
    with torch.no_grad(), bf16_autocast(), student.capture_blocks({0}) as blocks:
        student(input_ids=ids)
    assert blocks[0].dtype == torch.float32  # the residual stream stays fp32; only the matmuls in it went bf16
    assert not torch.equal(blocks[0], reference)  # ... and they did go bf16


def test_cayley_map_is_computed_in_fp32_under_autocast(tiny_pairs):
    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=None, loss=LossConfig(name="kl"))
    with torch.no_grad():
        module.student.r1.linear.parametrizations.weight.original.add_(0.01)  # a non-trivial Cayley argument
    matrix = rotations_once(lambda self: self.student.r1.matrix.clone())
    expected = matrix(module)
    with bf16_autocast():
        got = matrix(module)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_bf16_mixed_fit_trains_with_fp32_transforms(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    kl = {}
    for precision in ("32-true", "bf16-mixed"):
        module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
        data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=6, seq_len=32, batch_size=2)
        trainer = L.Trainer(
            max_steps=3, accelerator="cpu", devices=1, precision=precision, default_root_dir=tmp_path, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, data)
        kl[precision] = float(trainer.callback_metrics["kl_teacher"])
        assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)
    assert kl["bf16-mixed"] == pytest.approx(kl["32-true"], rel=0.25), kl
