"""DivergenceGuard and the module's non-finite-loss stop, on real runs that really diverge."""

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.divergence_guard import DivergenceGuard
from caq_lightning.config import LossConfig, OptimConfig
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 12


def test_runaway_push_stops_the_run_and_writes_no_export(tiny_pairs, text_file, tmp_path):
    int4_export = pytest.importorskip("callbacks.int4_export")
    pair = tiny_pairs["llama"]
    # An unbounded push with a large lambda and learning rate: KL(base || student) grows every step (measured:
    # push -1.1 -> -7.5 in 9 steps while KL(teacher || student) rose 13x), i.e. the student runs away from both.
    module = CAQModule(
        teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0,
        loss=LossConfig(lambda_push=20.0, push_bound="none", recon_weight=0.0),
        optim=OptimConfig(lr_rotation=0.3, lr_scale=0.3, lr_clip=0.3, lr_schedule="constant"),
    )  # fmt: skip
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=8, seq_len=32, batch_size=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    export = int4_export.Int4Export(out_dir=str(tmp_path / "export"))
    trainer = L.Trainer(
        max_steps=MAX_STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints, DivergenceGuard(max_push=3.0), export],
    )  # fmt: skip
    with pytest.raises(CAQError) as err:
        trainer.fit(module, data)
    message = str(err.value)
    pattern = r"push=(-[\d.]+) ran past -max_push=-3 at step (\d+) \((.*)\): .*last good checkpoint: (\S+);"
    match = re.match(pattern, message)
    assert match, message
    push, step, terms, last = float(match[1]), int(match[2]), match[3], match[4]
    assert push < -3.0 and 0 < step < MAX_STEPS - 1
    assert all(f"{name}=" in terms for name in ("loss", "kl_teacher", "kl_base", "push", "cal", "recon"))
    assert "\n" not in message and "lambda_push" in message
    assert trainer.state.status == "interrupted"  # fit ended with the error: no on_fit_end, no export
    # Lightning runs checkpoint callbacks after the guard: the last checkpoint is the step before the divergence.
    assert torch.load(last, weights_only=True)["global_step"] == step
    assert not (tmp_path / "export").exists()


def test_nan_loss_exits_the_cli_with_one_error_line(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    # A huge smoothing-scale learning rate overflows exp(log_s) after one update: a real NaN loss at step 1.
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "llama_w4a4.yaml"),
         f"--model.teacher={pair[0]}", f"--model.base={pair[1]}", "--model.dtype=float32", "--model.optim.lr_scale=1e4",
         "--model.loss.top_k=16", "--model.loss.push_top_k=16",  # the config's k = 500 exceeds the tiny vocab of 320
         "--model.rtn_kl_every=0", f"--data.source={text_file}", "--data.num_samples=8", "--data.seq_len=32",
         "--data.batch_size=2", "--trainer.max_steps=4", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.match(r"error: loss is not finite at step 1 \(loss=nan, .*\): lower the learning rates", errors[0])
    assert "no export was written" in errors[0]


def test_guard_rejects_a_non_positive_bound():
    with pytest.raises(CAQError, match="max_push=0 must be positive"):
        DivergenceGuard(max_push=0)
