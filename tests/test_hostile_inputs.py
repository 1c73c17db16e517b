"""Issue 22: what a hostile new user tried that did not hold. Each test fails on the code before the fix.

The CLIs run in-process (``caq_lightning.cli.main``, ``caq_lightning.export.main``, ``caq_lightning.evaluate.main``):
a traceback or a wrong success fails the test, as it would at the terminal. Real tiny models throughout.
"""

import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from tiny import REPO, TEXT, build_tokenizer, perturbed_student
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from caq_lightning import evaluate
from caq_lightning.cli import main
from caq_lightning.config import LossConfig, OptimConfig
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.export import main as export_main
from caq_lightning.export import write_export
from caq_lightning.fold import fold
from caq_lightning.module import CAQModule

CONFIG = REPO / "configs" / "llama_w4a4.yaml"


def _args(root, pair, text_file, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG), f"--model.teacher={pair[0]}", f"--model.base={pair[1]}", "--model.dtype=float32",
        "--model.loss.top_k=16", "--model.loss.push_top_k=16", "--model.rtn_kl_every=0", f"--data.source={text_file}",
        "--data.num_samples=4", "--data.seq_len=32", "--data.batch_size=2", "--trainer.max_steps=1",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
        f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip


def _error(argv: list[str], capsys, entry=main) -> str:
    """Run a CLI; return its single error line after checking exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as exit:
        code = entry(argv)
        raise SystemExit(code)  # evaluate.main returns its exit code instead of exiting
    err = capsys.readouterr().err
    assert exit.value.code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture
def cli(tiny_pairs, text_file, tmp_path, capsys):
    """cli(*overrides) -> the error line of a tiny llama run with these overrides."""
    return lambda *extra: _error(_args(tmp_path / "run", tiny_pairs["llama"], text_file, *extra), capsys)


@pytest.fixture(scope="module")
def trained_ckpt(tiny_pairs, text_file, tmp_path_factory):
    """checkpoints/last.ckpt of 1 real step on the tiny llama pair."""
    pair, root = tiny_pairs["llama"], tmp_path_factory.mktemp("trained")
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)
    L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[checkpoints],
    ).fit(module, data)  # fmt: skip
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def int4_export(tiny_pairs, tmp_path_factory):
    """An int4 export of a perturbed tiny llama student."""
    pair = tiny_pairs["llama"]
    model, recipe = fold(perturbed_student(pair[0]))
    return write_export(model, recipe, AutoTokenizer.from_pretrained(pair[0]), tmp_path_factory.mktemp("x") / "int4")


# ---- 1. a checkpoint cannot turn on trust_remote_code ---------------------------------------------------------------


@pytest.fixture
def hostile_checkpoint(trained_ckpt, tmp_path):
    """(checkpoint, model dir, marker): the checkpoint says trust_remote_code: true and names a model directory whose
    configuration_custom.py writes the marker file when imported."""
    remote = tmp_path / "remote"
    remote.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (remote / "config.json").write_text(json.dumps({"model_type": "caq_custom", "auto_map": auto_map}))
    marker = tmp_path / "code_ran"
    (remote / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    build_tokenizer().save_pretrained(remote)
    checkpoint = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(teacher=str(remote), base=str(remote), trust_remote_code=True)
    torch.save(checkpoint, tmp_path / "hostile.ckpt")
    return tmp_path / "hostile.ckpt", remote, marker


def test_checkpoint_cannot_turn_on_trust_remote_code_in_train(hostile_checkpoint, text_file, tmp_path, capsys):
    ckpt, remote, marker = hostile_checkpoint
    line = _error(_args(tmp_path / "run", (remote, remote), text_file, f"--ckpt_path={ckpt}"), capsys)
    assert "needs custom code" in line and "--model.trust_remote_code=true" in line
    assert not marker.exists()  # the repository's code never ran


def test_checkpoint_cannot_turn_on_trust_remote_code_in_export(hostile_checkpoint, tmp_path, capsys):
    ckpt, remote, marker = hostile_checkpoint
    with pytest.raises(SystemExit) as exit:
        export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and "Traceback" not in err, err[-3000:]
    assert "needs custom code" in err and "--trust-remote-code" in err
    assert not marker.exists()
    assert f"loading teacher '{remote}' and base '{remote}'" in out  # the checkpoint's models, named before loading
    assert not (tmp_path / "out").exists()


# ---- 2. missing tensors are an error, not random weights ------------------------------------------------------------


def test_teacher_with_missing_tensors_is_refused(cli, tiny_pairs, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(tiny_pairs["llama"][0], cut)
    state = load_file(cut / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1.mlp." not in k}, cut / "model.safetensors", {"format": "pt"})
    line = cli(f"--model.teacher={cut}")
    assert "do not match its config.json (missing model.layers.1.mlp.down_proj.weight" in line
    assert "would load as random values" in line


def test_int4_export_as_the_teacher_is_refused(cli, int4_export):
    line = cli(f"--model.teacher={int4_export}", f"--model.base={int4_export}")
    assert f"'{int4_export}' is a caq-int4 export, not a full-precision model" in line and "evaluate" in line


def test_evaluating_an_export_without_its_manifest_is_refused(int4_export, tmp_path, capsys):
    export = tmp_path / "no-manifest"
    shutil.copytree(int4_export, export)
    (export / "manifest.json").unlink()
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Bake bread", "label": "benign"}) + "\n")
    argv = ["--model", str(export), "--prompts", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "2"]
    line = _error(argv, capsys, entry=evaluate.main)
    assert "is a caq-int4 export without its manifest.json" in line and "re-export" in line


# ---- 3. tokenizer and model vocabulary are compared -----------------------------------------------------------------


def _other_tokenizer(path, vocab_size: int):
    """A tokenizer trained on other text: the same size range, other ids for the same strings."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([TEXT[::-1]], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>").save_pretrained(path)
    return path


def test_data_tokenizer_with_other_ids_is_refused(cli, tmp_path):
    line = cli(f"--data.tokenizer={_other_tokenizer(tmp_path / 'small', 300)}")
    assert "maps tokens to other ids than the tokenizer of teacher" in line and "--data.tokenizer" in line


def test_data_tokenizer_larger_than_the_vocabulary_is_refused(cli, tmp_path):
    build_tokenizer(400).save_pretrained(tmp_path / "large")  # 362 tokens, the model has 320 rows
    line = cli(f"--data.tokenizer={tmp_path / 'large'}")
    assert "has 362 tokens but the model's vocabulary has 320 (ids past 319 have no embedding)" in line


def test_teacher_and_base_tokenizers_larger_than_the_vocabulary_are_refused(tiny_pairs, tmp_path):
    tok = build_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(8)])  # ids 320..327: no embedding row in either model
    pair = [shutil.copytree(path, tmp_path / path.name) for path in tiny_pairs["llama"]]
    for path in pair:
        tok.save_pretrained(path)
    with pytest.raises(CAQError, match=r"tokenizer of teacher .* has 328 tokens but the model's vocabulary has 320"):
        CAQModule(teacher=str(pair[0]), base=str(pair[1]))


# ---- 4. negative or NaN rates and weights; max_steps=0 --------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, expected",
    [("--model.optim.lr_rotation=-0.01", "lr_rotation=-0.01 is negative: use lr_rotation >= 0"),
     ("--model.optim.lr_clip=-1", "lr_clip=-1.0 is negative"),
     ("--model.loss.kl_weight=-1", "kl_weight=-1.0 is negative: use kl_weight >= 0"),
     ("--model.loss.recon_weight=-0.5", "recon_weight=-0.5 is negative: use recon_weight >= 0")],
)  # fmt: skip
def test_negative_rates_and_weights_are_refused(cli, flag, expected):
    assert expected in cli(flag)


def test_nan_settings_are_named_as_not_a_number():
    with pytest.raises(CAQError, match=r"lambda_push=nan is not a finite number: use lambda_push >= 0"):
        LossConfig(lambda_push=float("nan"))
    with pytest.raises(CAQError, match=r"lr_scale=nan is not a finite number"):
        OptimConfig(lr_scale=float("nan"))


def test_max_steps_zero_warns_that_nothing_is_calibrated(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    trainer = L.Trainer(
        max_steps=0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="max_steps=0: no calibration step runs, so the export and report hold"):
        trainer.fit(module, data)
