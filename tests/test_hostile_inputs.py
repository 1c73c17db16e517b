"""Issue 22: what a hostile new user tried that did not hold. Each test fails on the code before the fix.

The CLIs run in-process (``caq_lightning.cli.main``, ``caq_lightning.export.main``, ``caq_lightning.evaluate.main``):
a traceback or a wrong success fails the test, as it would at the terminal. Real tiny models throughout.
"""

import datetime
import errno
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from tiny import REPO, TEXT, build_tokenizer, cli_error_line as _error, one_step_run, perturbed_student
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


@pytest.fixture
def cli(tiny_pairs, text_file, tmp_path, capsys):
    """cli(*overrides) -> the error line of a tiny llama run with these overrides."""
    return lambda *extra: _error(_args(tmp_path / "run", tiny_pairs["llama"], text_file, *extra), capsys)


@pytest.fixture(scope="module")
def trained_ckpt(tiny_pairs, text_file, tmp_path_factory):
    """checkpoints/last.ckpt of 1 real step on the tiny llama pair."""
    run = one_step_run(tiny_pairs["llama"], text_file, tmp_path_factory.mktemp("trained"))
    return run / "checkpoints" / "last.ckpt"


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


# ---- 5. export settings are checked in setup ------------------------------------------------------------------------


def test_export_of_8_bit_weights_is_refused_before_the_first_step(cli, tmp_path):
    line = cli("--model.quant.w_bits=8")
    assert "int4 export" in line and "w_bits=8" in line and "model.quant.w_bits=4" in line  # the format's check
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # no step ran, so nothing was calibrated and thrown away


def test_exportable_settings_are_a_pure_check():
    from caq_lightning.config import QuantConfig
    from caq_lightning.export import get_format

    check_exportable = get_format("caq-int4").check

    for ok in (QuantConfig(), QuantConfig(w_bits=3, w_group_size=16), QuantConfig(w_symmetric=False, a_bits=8)):
        check_exportable(ok)
    with pytest.raises(CAQError, match=r"quant.w_bits=16 leaves weights in full precision"):
        check_exportable(QuantConfig(w_bits=16))


# ---- 6. two runs into one root never share version_N ----------------------------------------------------------------


def _cli_without_fit(argv):
    from caq_lightning.cli import CAQCLI

    return CAQCLI(CAQModule, CalibrationData, args=argv, run=False, save_config_kwargs={"overwrite": True})


def test_two_runs_into_one_root_get_their_own_version(tiny_pairs, text_file, tmp_path):
    # Both runs resolve their log dir before either has written a file: the window in which both took version_0.
    argv = _args(tmp_path / "run", tiny_pairs["llama"], text_file)[2:]  # the llama config's callbacks are not needed
    first, second = _cli_without_fit(argv), _cli_without_fit(argv)
    dirs = {first.trainer.log_dir, second.trainer.log_dir}
    assert len(dirs) == 2 and all(Path(d).is_dir() for d in dirs), dirs


def test_racing_loggers_claim_distinct_versions(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from caq_lightning.outputs import ExclusiveCSVLogger

    loggers = [ExclusiveCSVLogger(tmp_path, name="caq") for _ in range(8)]
    barrier = threading.Barrier(len(loggers))

    def claim(logger):
        barrier.wait()
        return logger.version

    with ThreadPoolExecutor(len(loggers)) as pool:
        versions = list(pool.map(claim, loggers))
    assert sorted(versions) == list(range(8))
    assert all((tmp_path / "caq" / f"version_{v}").is_dir() for v in versions)  # each one claimed on disk


# ---- 7. exports carry a format version ------------------------------------------------------------------------------


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_export_of_an_unknown_format_version_is_refused(int4_export, tmp_path):
    from caq_lightning.export import load_quantized
    from caq_lightning.export.formats import write_manifest
    from caq_lightning.export.writer import FORMAT

    assert json.loads((int4_export / "manifest.json").read_text())["format_version"] == 1
    newer, older, config = (shutil.copytree(int4_export, tmp_path / n) for n in ("newer", "older", "config"))
    _edit_json(newer / "manifest.json", lambda m: m.update(format_version=99))
    with pytest.raises(CAQError, match=r"has format_version 99, but this caq-lightning reads format_version 1"):
        load_quantized(newer)
    _edit_json(older / "manifest.json", lambda m: m.pop("format_version"))
    with pytest.raises(CAQError, match=r"has format_version none \(written before exports had one\)"):
        load_quantized(older)
    _edit_json(config / "config.json", lambda c: c["quantization_config"].update(format_version=2))
    write_manifest(config, FORMAT)  # a consistent export whose quantization_config is of another version
    with pytest.raises(CAQError, match=r"\(quantization_config\) has format_version 2"):
        load_quantized(config)


# ---- 8. checkpoints: a temp file in the same directory, and a full disk is one line ---------------------------------


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tiny_pairs, text_file, trained_ckpt, tmp_path, capsys, monkeypatch
):
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    kept = shutil.copy(trained_ckpt, root / "checkpoints" / "last.ckpt")
    before = Path(kept).read_bytes()
    written = []

    def full_disk(fd):  # the disk fills up as the new checkpoint is flushed (ENOSPC surfaces at fsync on many FSs)
        written.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    line = _error(_args(root, tiny_pairs["llama"], text_file), capsys)
    assert line.startswith(f"error: no space left on device while writing checkpoint {root / 'checkpoints'}")
    assert f"the newest complete checkpoint {kept} was kept" in line
    assert f"python -m caq_lightning.export --ckpt {kept} --out DIR" in line and "--ckpt_path last" in line
    assert written and all(p.parent == root / "checkpoints" for p in written)  # the temp file sat next to it
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing half-written
    assert Path(kept).read_bytes() == before


def test_checkpoints_are_written_with_the_usual_permissions(tiny_pairs, text_file, tmp_path, capsys):
    root = tmp_path / "run"
    main(_args(root, tiny_pairs["llama"], text_file))
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (root / "checkpoints").iterdir()}
    assert modes == {"last.ckpt": 0o666 & ~umask}, modes


# ---- 9. tracebacks that are now one line ----------------------------------------------------------------------------


def test_binary_config_file(cli, tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    line = cli("--config", str(tmp_path / "binary.yaml"))
    assert "binary.yaml' is not UTF-8 text (byte 0x80 at offset 128)" in line and "YAML config" in line


@pytest.mark.parametrize(
    "flag, expected",
    [("--trainer.strategy=fsdp", "--trainer.strategy=fsdp (FSDP1) is not supported: the module shards with FSDP2"),
     ("--trainer.devices=0", "--trainer.devices=0 selects no device: pass --trainer.devices=N with N >= 1"),
     ("--trainer.accumulate_grad_batches=0", "--trainer.accumulate_grad_batches=0 must be an integer >= 1"),
     ("--trainer.devices=-1", "invalid trainer settings: `devices` selected with `CPUAccelerator` should be an int")],
)  # fmt: skip
def test_bad_trainer_settings(cli, flag, expected):
    assert expected in cli(flag)


def test_non_utf8_ppl_text(tiny_pairs, text_file, tmp_path, capsys):
    from callbacks.safety_report import SafetyReport

    (tmp_path / "latin1.txt").write_bytes(("Caf\xe9 " * 400).encode("latin-1"))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Bake bread", "label": "benign"}) + "\n")
    pair = tiny_pairs["llama"]
    report = SafetyReport(prompts=str(tmp_path / "prompts.jsonl"), ppl_text=str(tmp_path / "latin1.txt"), seq_len=16)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[report],
    )  # fmt: skip
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    with pytest.raises(CAQError, match=r"SafetyReport ppl_text '.*latin1.txt' is not UTF-8 text \(byte 0xe9 at"):
        trainer.fit(CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0), data)
    argv = ["--model", str(pair[0]), "--prompts", str(tmp_path / "prompts.jsonl"), "--ppl-text"]
    argv.append(str(tmp_path / "latin1.txt"))
    assert "--ppl-text file" in _error(argv, capsys, entry=evaluate.main)


def test_cache_dir_that_is_a_file(cli, tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("CAQ_CACHE_DIR", str(tmp_path / "cache"))
    line = cli("--model.teacher=builtin:tiny-test", "--model.base=builtin:tiny-test")
    assert f"builtin model cache {tmp_path / 'cache' / 'zoo'} cannot be created" in line
    assert "set CAQ_CACHE_DIR to a writable directory" in line


@pytest.mark.parametrize("kind", ["truncated", "pickle"])
def test_export_cli_refuses_unreadable_checkpoints(trained_ckpt, tmp_path, capsys, kind):
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        bad.write_bytes(trained_ckpt.read_bytes()[: trained_ckpt.stat().st_size // 2])
    else:
        torch.save({"state_dict": {}, "when": datetime.date(2020, 1, 1)}, bad)  # a pickled object, not tensors
    line = _error(["--ckpt", str(bad), "--out", str(tmp_path / "out")], capsys, entry=export_main)
    assert f"checkpoint '{bad}' is truncated or not a torch checkpoint" in line and "another .ckpt" in line


# ---- 10. smaller ones -----------------------------------------------------------------------------------------------


def test_error_during_training_starts_on_its_own_line(tiny_pairs, text_file, tmp_path, monkeypatch):
    terminal = io.StringIO()  # stdout and stderr on one terminal, as a user sees them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = _args(tmp_path / "run", tiny_pairs["llama"], text_file, "--trainer.enable_progress_bar=true",
                 "--model.loss.lambda_push=100000", "--trainer.max_steps=3")  # fmt: skip
    with pytest.raises(SystemExit):
        main(argv)  # the push runs past DivergenceGuard's max_push at the first step
    text = terminal.getvalue()
    assert "step 0/3" in text and "error: push=" in text, text[-2000:]
    assert text[text.index("error: push=") - 1] == "\n", text[-2000:]


def test_temporary_export_left_by_a_kill_is_removed_by_the_next_export(int4_export, tiny_pairs, tmp_path):
    out = tmp_path / "int4"
    killed = (
        "import os\n"
        "from caq_lightning.export.formats import atomic_dir\n"
        "def write(folder):\n"
        "    (folder / 'model.safetensors').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
        f"atomic_dir({str(out)!r}, False, write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-export-")]  # what the kill left
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    write_export(model, recipe, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def test_resume_refuses_a_teacher_changed_outside_the_embeddings(tiny_pairs, text_file, tmp_path, capsys):
    pair = [shutil.copytree(path, tmp_path / path.name) for path in tiny_pairs["llama"]]
    root = tmp_path / "run"
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    ).fit(module, data)  # fmt: skip
    weights = pair[0] / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] += 0.5  # one weight of one q_proj
    save_file(state, weights, {"format": "pt"})
    line = _error(_args(root, pair, text_file, "--ckpt_path=last", "--trainer.max_steps=2"), capsys)
    assert "was made for teacher" in line and "but its files now hold other weights" in line


def test_manifest_entries_outside_the_export_are_refused(int4_export, tmp_path):
    from caq_lightning.export import load_quantized, sha256

    export = shutil.copytree(int4_export, tmp_path / "export")
    (tmp_path / "secret").write_text("outside the export")
    _edit_json(export / "manifest.json", lambda m: m["files"].update({"../secret": sha256(tmp_path / "secret")}))
    with pytest.raises(CAQError, match=r"manifest.json lists '../secret', which is not a file inside the export"):
        load_quantized(export)


def test_every_export_file_has_the_same_permissions(int4_export):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in int4_export.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_zoo_cache_is_checksummed(tmp_path):
    from caq_lightning.zoo.cache import locked_build

    def build(folder):
        (folder / "model.safetensors").write_bytes(bytes(range(64)))
        return {"built": True}

    root = locked_build(tmp_path, "pair", build)
    assert locked_build(tmp_path, "pair", build) == root  # an intact entry loads
    data = bytearray((root / "model.safetensors").read_bytes())
    data[10] ^= 0x01  # one flipped bit
    (root / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CAQError, match=r"pair is corrupted: model.safetensors does not match the sha256 in manifest"):
        locked_build(tmp_path, "pair", build)
