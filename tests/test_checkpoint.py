"""What a CAQ checkpoint holds, and the pieces that make a resume exact (the kill test is tests/test_resume.py)."""

import io
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from caq_lightning.checkpoint import check_readable, rng_state, set_rng_state
from caq_lightning.config import OptimConfig
from caq_lightning.data import CalibrationData, ResumableLoader
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule


@pytest.fixture(scope="module")
def trained(tiny_pairs, text_file, tmp_path_factory):
    """(module, path of last.ckpt) after 2 real steps on the tiny llama pair."""
    pair, root = tiny_pairs["llama"], tmp_path_factory.mktemp("ckpt")
    module = CAQModule(
        teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, optim=OptimConfig(lr_rotation=0.05, lr_scale=0.05)
    )
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=8, seq_len=32, batch_size=2)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)],
    )  # fmt: skip
    trainer.fit(module, data)
    return module, root / "last.ckpt"


def test_checkpoint_holds_only_trainable_tensors(trained):
    module, path = trained
    state = torch.load(path, weights_only=True)["state_dict"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable <= state.keys()
    frozen = [k for k in state if k.startswith(("student.model.", "base.")) and k not in trainable]
    assert frozen == []
    total = sum(p.numel() for p in module.parameters())
    assert sum(v.numel() for v in state.values()) < total / 2  # the frozen teacher/base are most of the module


def test_load_from_checkpoint_restores_transforms_and_frozen_weights(trained):
    module, path = trained
    loaded = CAQModule.load_from_checkpoint(path, map_location="cpu")
    own, new = module.state_dict(), loaded.state_dict()
    assert own.keys() == new.keys()
    # Rotations start at exactly 0 (the Cayley parametrization's free part): trained ones show the load happened.
    assert any(k.endswith(".original") and own[k].abs().sum() > 0 for k in own)
    assert all(torch.equal(own[k], new[k]) for k in own)


def test_checkpoint_of_another_model_is_refused(trained, tiny_pairs):
    _, path = trained
    qwen = tiny_pairs["qwen2"]
    with pytest.raises(CAQError, match=r"was made for teacher .*llama.*, not .*qwen2.*--model\.teacher="):
        CAQModule.load_from_checkpoint(path, map_location="cpu", teacher=str(qwen[0]), base=str(qwen[1]))


def test_rng_state_round_trips_through_a_weights_only_load():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resumable_loader_skips_trained_batches_once():
    loader = ResumableLoader(torch.arange(10), batch_size=2)
    loader.load_state_dict({"batches_trained": 3})
    assert [b.tolist() for b in loader] == [[6, 7], [8, 9]]
    assert len(list(loader)) == 5  # the next epoch is whole again


def test_resumable_loader_refuses_a_position_beyond_the_data():
    loader = ResumableLoader(torch.arange(4), batch_size=2)
    loader.load_state_dict({"batches_trained": 3})
    with pytest.raises(CAQError, match="resume with the same --data settings"):
        iter(loader)


def test_checkpoint_of_the_flat_settings_layout_is_refused(tmp_path):
    old = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"teacher": "builtin:tiny", "w_bits": 4, "loss": "cal_full"}, "state_dict": {}}, old)
    with pytest.raises(CAQError, match="flat settings of an earlier caq-lightning .* calibrate again"):
        check_readable(str(old))
