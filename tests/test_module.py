"""The LightningModule with a real Trainer on tiny real models."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from caq_lightning.config import LossConfig, OptimConfig
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule
from tiny import grouped


def _data(pair, text_file, **kw) -> CalibrationData:
    return CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=16, seq_len=32, batch_size=4, **kw)


def _fit(module, data, steps, root=None):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(root) if root else False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def _metrics(root: Path) -> list[dict]:
    (path,) = root.rglob("metrics.csv")
    return list(csv.DictReader(path.open()))


def _frozen_state(module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in module.named_parameters()
        if n.startswith(("student.model.", "base.")) and "clip_logit" not in n
    }  # fmt: skip


def test_no_weight_of_the_three_models_changes(tiny_pairs, text_file):
    pair = tiny_pairs["llama"]
    module = CAQModule(
        teacher=str(pair[0]), base=str(pair[1]), optim=OptimConfig(lr_rotation=0.1, lr_scale=0.1), rtn_kl_every=0
    )
    before = _frozen_state(module)
    trainable_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    _fit(module, _data(pair, text_file), steps=3)
    after = _frozen_state(module)
    assert before.keys() == after.keys() and len(before) > 10
    assert all(torch.equal(before[n], after[n]) for n in before)  # teacher (= student weights) and base
    changed = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert changed  # ... while the transforms did train


def test_training_step_logs_every_loss_term(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["qwen2"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=1)
    _fit(module, _data(pair, text_file), steps=2, root=tmp_path)
    row = _metrics(tmp_path)[-1]
    for key in ("loss", "kl_teacher", "kl_base", "push", "recon", "cal", "kl_teacher_rtn"):
        assert row.get(key) not in (None, ""), key
    assert float(row["push"]) < 0  # the push term rewards distance from the base


def test_calibration_lowers_kl_below_rtn(tiny_pairs, text_file):
    pair = tiny_pairs["llama"]
    torch.manual_seed(0)
    module = CAQModule(teacher=str(pair[0]), base=None, loss=LossConfig(name="kl", recon_weight=0.0), rtn_kl_every=0)
    data = _data(pair, text_file)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        rtn = module.rtn_kl(batch).item()
        start = module.compute_loss(batch).kl_teacher.item()
    _fit(module, data, steps=20)
    with torch.no_grad():
        end = module.compute_loss(batch).kl_teacher.item()
    assert end < start and end < rtn, (rtn, start, end)


def test_bounded_push_does_not_diverge_where_unbounded_does(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    runs = {}
    for bound in ("none", "clamp"):
        torch.manual_seed(0)
        module = CAQModule(
            teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0,
            loss=LossConfig(name="cal_full", lambda_push=20.0, push_bound=bound, push_margin=0.05, recon_weight=0.0),
            optim=OptimConfig(lr_rotation=0.05, lr_scale=0.1, lr_schedule="constant"),
        )  # fmt: skip
        _fit(module, _data(pair, text_file), steps=30, root=tmp_path / bound)
        runs[bound] = _metrics(tmp_path / bound)
    unbounded_kl = float(runs["none"][-1]["kl_teacher"])
    bounded = runs["clamp"]
    assert all(float(r["push"]) >= -20.0 * 0.05 - 1e-5 for r in bounded)  # the push term is bounded below
    assert unbounded_kl > 5 * float(bounded[-1]["kl_teacher"]), (unbounded_kl, bounded[-1]["kl_teacher"])


def test_base_with_other_vocabulary_is_rejected(tiny_pairs, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import build_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(vocab_size=300)
    other = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(CAQError, match="vocab"):
        CAQModule(teacher=str(tiny_pairs["llama"][0]), base=str(tmp_path / "other"))


def test_base_with_other_architecture_is_rejected(tiny_pairs):
    with pytest.raises(CAQError, match="teacher is 'llama' but base is 'qwen2'"):
        CAQModule(teacher=str(tiny_pairs["llama"][0]), base=str(tiny_pairs["qwen2"][1]))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"loss": "nope"}, "unknown loss"), ({"lambda_push": -1.0}, "negative"), ({"w_bits": 1}, "outside 2-16"),
     ({"loss": "cal_topk", "top_k": 10**6}, "exceeds the vocabulary")],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(tiny_pairs, kwargs, message):
    pair = tiny_pairs["llama"]
    with pytest.raises(CAQError, match=message):
        CAQModule(teacher=str(pair[0]), base=str(pair[1]), **grouped(**kwargs))
