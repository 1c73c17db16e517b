"""Int4Export callback and `python -m caq_lightning.export`: a real fit ends with an int4 export that reproduces it."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.int4_export import Int4Export
from caq_lightning.config import OptimConfig
from caq_lightning.data import CalibrationData
from caq_lightning.export import load_quantized, main, sha256
from caq_lightning.module import CAQModule


@pytest.fixture(scope="module")
def fitted(tiny_pairs, text_file, tmp_path_factory):
    """A 3-step CAQ fit of the tiny llama pair with Int4Export and a last checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    pair = tiny_pairs["llama"]
    module = CAQModule(
        teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, optim=OptimConfig(lr_rotation=0.05, lr_scale=0.05)
    )
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=8, seq_len=16, batch_size=2)
    export = Int4Export()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, default_root_dir=root, logger=L.pytorch.loggers.CSVLogger(root),
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True), export],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    return module, trainer, export, root


def test_fit_ends_with_a_gptq_export_that_reproduces_the_evaluated_model(fitted):
    """By default the export is GPTQ-rounded, and it is the very model the reports evaluate (module.exported())."""
    module, trainer, export, _ = fitted
    assert export.path == Path(trainer.log_dir).absolute() / "export"  # the default: <log_dir>/export
    model, tokenizer = load_quantized(export.path)
    ids = tokenizer(["The river runs past the old mill", "Farmers bring grain"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = module.exported().model(**ids).logits
        got = model(**ids).logits
        fp_weights = module.student(**ids).logits  # the student trains with FP weights: not what is exported
    mask = ids["attention_mask"].bool()
    assert (got - expected)[mask].abs().max() <= 1e-3
    assert (got - fp_weights)[mask].abs().max() > 1e-3
    assert json.loads((export.path / "config.json").read_text())["quantization_config"]["rounding"] == "gptq"


def test_an_export_gptq_setting_that_contradicts_the_model_is_refused(tiny_pairs, text_file, tmp_path):
    from caq_lightning.config import QuantConfig
    from caq_lightning.errors import CAQError

    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, quant=QuantConfig(w_rounding="rtn"))
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=16, batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                        callbacks=[Int4Export(gptq=True)], enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CAQError, match="w_rounding=gptq"):
        trainer.fit(module, data)
    assert trainer.global_step == 0  # refused in setup, before any step


def test_cli_export_of_the_last_checkpoint_is_byte_identical(fitted, tmp_path, capsys):
    _, _, export, root = fitted
    main(["--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "cli")])
    assert f"int4 export written to {tmp_path / 'cli'}" in capsys.readouterr().out
    assert sha256(tmp_path / "cli" / "model.safetensors") == sha256(export.path / "model.safetensors")


def test_cli_gptq_export_uses_the_runs_calibration_data(fitted, tmp_path):
    _, _, _, root = fitted
    main(["--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "gptq"), "--gptq"])
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["rounding"] == "gptq"
    load_quantized(tmp_path / "gptq")


def test_cli_refuses_a_non_empty_target_and_a_missing_checkpoint(fitted, tmp_path, capsys):
    _, _, export, root = fitted
    for argv, message in (
        (["--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(export.path)], "is not empty: pass --overwrite"),
        (["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")], "nope.ckpt' does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_diverged_run_writes_nothing(fitted, tmp_path):
    module, _, _, _ = fitted
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    trainer.caq_diverged = True
    callback = Int4Export(out_dir=str(tmp_path / "int4"))
    with pytest.warns(UserWarning, match="diverged: no int4 export written"):
        callback.on_fit_end(trainer, module)
    assert callback.path is None and not (tmp_path / "int4").exists()


def test_export_path_is_printed(fitted, tmp_path, capsys):
    module, _, _, _ = fitted
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    Int4Export(out_dir=str(tmp_path / "int4")).on_fit_end(trainer, module)
    assert f"int4 export written to {tmp_path / 'int4'}" in capsys.readouterr().out


def test_cli_also_writes_the_w4a16_view(fitted, tmp_path, capsys):
    pytest.importorskip("compressed_tensors", reason="the W4A16 view needs pip install 'caq-lightning[interop]'")
    from transformers import AutoModelForCausalLM

    _, _, _, root = fitted
    ckpt = str(root / "ckpt" / "last.ckpt")
    main(["--ckpt", ckpt, "--out", str(tmp_path / "int4"), "--w4a16-out", str(tmp_path / "view")])
    assert f"compressed-tensors W4A16 view written to {tmp_path / 'view'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "view" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "view")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
