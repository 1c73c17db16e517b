"""Bad inputs: each must end the CLI with exit code 2 and one `error:` line naming the problem and the fix.

The CLI runs in-process (``caq_lightning.cli.main``, the function train.py calls): any exception other than the
printed one-line error fails the test, exactly as a traceback would at the terminal. Real tiny models throughout.
"""

import json
import re
import shutil
import warnings

import pytest
import torch
from tiny import REPO, build_tokenizer, cli_error_line as _error, one_step_run, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from caq_lightning.errors import CAQError
from caq_lightning.loading import check_architecture, check_pair

CONFIG = REPO / "configs" / "llama_w4a4.yaml"


def _args(root, pair, text_file, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG), f"--model.teacher={pair[0]}", f"--model.base={pair[1]}", "--model.dtype=float32",
        "--model.loss.top_k=16", "--model.loss.push_top_k=16",  # the config's k = 500 (the paper's) exceeds the vocab of 320
        "--model.rtn_kl_every=0", f"--data.source={text_file}", "--data.num_samples=4", "--data.seq_len=32",
        "--data.batch_size=2", "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip


@pytest.fixture
def cli(tiny_pairs, text_file, tmp_path, capsys):
    """cli(*overrides) -> the error line of a tiny llama run with these overrides."""
    return lambda *extra: _error(_args(tmp_path / "run", tiny_pairs["llama"], text_file, *extra), capsys)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    """Model directories that are wrong in one way each."""
    root, tok = tmp_path_factory.mktemp("bad"), build_tokenizer()

    def save(name, model):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        return root / name

    torch.manual_seed(0)
    save("vocab384", AutoModelForCausalLM.from_config(tiny_config("llama", 384)))
    gpt2 = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    save("gpt2", AutoModelForCausalLM.from_config(gpt2))
    pickled = root / "pickle"  # weights only as pytorch_model.bin (pickle), no safetensors
    llama = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    llama.config.save_pretrained(pickled)
    torch.save(llama.state_dict(), pickled / "pytorch_model.bin")
    tok.save_pretrained(pickled)
    remote = root / "remote"  # a model type transformers does not know, with its own code that must never run
    remote.mkdir()
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (remote / "config.json").write_text(json.dumps({"model_type": "caq_custom", "auto_map": auto_map}))
    (remote / "configuration_custom.py").write_text(f"open({str(root / 'code_ran')!r}, 'w').write('yes')\n")
    tok.save_pretrained(remote)
    return root


@pytest.fixture(scope="module")
def trained_run(tiny_pairs, text_file, tmp_path_factory):
    """A run directory with checkpoints/last.ckpt of 1 real step on the tiny llama pair (as the CLI lays it out)."""
    run = one_step_run(tiny_pairs["llama"], text_file, tmp_path_factory.mktemp("trained"))
    return run


# ---- models --------------------------------------------------------------------------------------------------------


def test_missing_model_path(cli, tmp_path):
    line = cli(f"--model.teacher={tmp_path / 'no-such-model'}")
    assert "no-such-model' does not exist" in line and "pass an existing directory" in line


def test_hub_id_while_offline(cli):
    line = cli("--model.teacher=caq-test/no-such-model")
    assert "hub id but HF_HUB_OFFLINE is set" in line and "download it first or pass a local directory" in line


def test_teacher_and_base_with_different_vocabularies(cli, bad_models):
    line = cli(f"--model.base={bad_models / 'vocab384'}")
    assert "teacher vocab_size 320 != base vocab_size 384" in line and "share a tokenizer" in line


def test_teacher_and_base_with_different_architectures(cli, tiny_pairs):
    line = cli(f"--model.base={tiny_pairs['qwen2'][1]}")
    assert "teacher is 'llama' but base is 'qwen2'" in line and "fine-tuned from" in line


def test_unsupported_architecture(cli, bad_models):
    line = cli(f"--model.teacher={bad_models / 'gpt2'}", f"--model.base={bad_models / 'gpt2'}")
    assert "unsupported architecture 'gpt2'" in line and "CAQ supports llama, qwen2, mistral" in line


def test_single_safetensors_file_as_the_model(cli, tiny_pairs):
    line = cli(f"--model.teacher={tiny_pairs['llama'][0] / 'model.safetensors'}")
    assert "is a single .safetensors file: pass the directory that holds it together with its config.json" in line


def test_architecture_check_is_shared_by_every_source():
    # The same rule (and message) for config directories, safetensors checkpoints and GGUF files.
    check_architecture("llama", "'model.gguf'")
    with pytest.raises(CAQError, match=r"unsupported architecture 'gemma3' in 'model.gguf': CAQ supports llama, "):
        check_architecture("gemma3", "'model.gguf'")


def test_teacher_and_base_with_different_chat_templates_warn(tiny_pairs):
    teacher, base = build_tokenizer(), build_tokenizer()
    config = AutoConfig.from_pretrained(tiny_pairs["llama"][0])
    base.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
    with pytest.warns(UserWarning, match="different chat templates: chat calibration data is rendered with the"):
        check_pair(config, config, teacher, base)
    base.chat_template = None  # a pre-trained base without a template is the normal case: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_pair(config, config, teacher, base)


def test_trust_remote_code_needed_but_not_enabled(cli, bad_models):
    line = cli(f"--model.teacher={bad_models / 'remote'}", f"--model.base={bad_models / 'remote'}")
    assert "needs custom code" in line and "--model.trust_remote_code=true" in line
    assert not (bad_models / "code_ran").exists()  # off by default: the repo's code was never imported


def test_pickle_weights_are_refused(cli, bad_models):
    line = cli(f"--model.teacher={bad_models / 'pickle'}")
    assert "no file named model.safetensors" in line and "never pickle" in line and "save_pretrained" in line


# ---- quantization and loss settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("w_bits", 1), ("kv_bits", 17)])
def test_bits_outside_2_to_16(cli, option, value):
    line = cli(f"--model.quant.{option}={value}")
    assert f"{option}={value} is outside 2-16" in line and "16 for full precision" in line


def test_group_size_that_does_not_divide_the_dimension(cli):
    line = cli("--model.quant.w_group_size=48")
    assert "w_group_size=48 does not divide the model dimension 64" in line and "pick a divisor" in line


def test_negative_lambda(cli):
    line = cli("--model.loss.lambda_push=-0.1")
    assert "lambda_push=-0.1 is negative" in line and "lambda_push >= 0" in line


def test_top_k_larger_than_the_vocabulary(cli):
    line = cli("--model.loss.name=cal_topk", "--model.loss.top_k=100000")
    assert "top_k=100000 exceeds the vocabulary size 320" in line and "lower top_k" in line


@pytest.mark.parametrize(
    "overrides, expected",
    [(["--model.loss.top_k=500"], "top_k=500 exceeds the vocabulary size 320: lower top_k"),  # the paper's k, tiny vocab
     (["--model.loss.push_top_k=100000"], "push_top_k=100000 exceeds the vocabulary size 320: lower push_top_k"),
     (["--model.loss.push_topk_by=teacher"], "unknown push_topk_by 'teacher': choose one of disagree, base"),
     (["--model.loss.recon=l1"], "unknown recon 'l1': choose one of relative, mse"),
     (["--model.loss.name=cal_topk", "--model.loss.topk_renormalize=false"], "topk_renormalize=false applies to cal_paper")],
)  # fmt: skip
def test_bad_cal_paper_settings(cli, overrides, expected):
    assert expected in cli(*overrides)


# ---- data ----------------------------------------------------------------------------------------------------------


def test_empty_calibration_data(cli, tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    line = cli(f"--data.source={tmp_path / 'empty.txt'}")
    assert "empty.txt' is empty" in line and "pass a file with text" in line


def test_calibration_text_shorter_than_one_window(cli, tmp_path):
    (tmp_path / "short.txt").write_text("The river runs past the old mill.")
    line = cli(f"--data.source={tmp_path / 'short.txt'}")
    assert "short.txt' has" in line and "fewer than one window of seq_len=32" in line and "lower --data.seq_len" in line


def test_hub_dataset_while_offline(cli):
    line = cli("--data.source=wikitext:wikitext-2-raw-v1")
    assert "is a hub dataset but the hub is offline" in line and "--data.source=" in line


def test_sequence_length_beyond_the_model_maximum(cli):
    line = cli("--data.seq_len=256")
    assert "seq_len 256 exceeds the model's maximum" in line and "128" in line and "seq_len" in line


# ---- configuration -------------------------------------------------------------------------------------------------


def test_unknown_config_key_on_the_command_line(cli):
    line = cli("--model.push_weight=0.3")
    assert "unrecognized arguments: --model.push_weight=0.3" in line and "--help" in line


def test_flat_key_of_the_old_layout_names_its_new_key(cli):
    line = cli("--model.w_bits=3", "--model.lr_clip=0.1")
    assert "unrecognized arguments: --model.w_bits=3 --model.lr_clip=0.1" in line
    assert "--model.w_bits is --model.quant.w_bits" in line and "--model.lr_clip is --model.optim.lr_clip" in line


def test_flat_keys_in_an_old_config_file_name_their_new_keys(cli, tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  loss: cal_full\n  w_bits: 4\n  targets_dir: /tmp/t\n")
    line = cli("--config", str(old))
    assert f"under model: in {old}, loss is loss.name, w_bits is quant.w_bits, targets_dir is targets.dir" in line


def test_unknown_config_key_in_a_config_file(cli, tmp_path):
    (tmp_path / "typo.yaml").write_text("model:\n  lamda_push: 0.3\n")
    line = cli(f"--config={tmp_path / 'typo.yaml'}")
    assert "does not accept option 'model.lamda_push'" in line and "--help" in line


def test_value_of_the_wrong_type(cli):
    line = cli("--model.quant.w_bits=four")
    assert "model.quant.w_bits" in line and "four" in line


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoint_from_another_model(tiny_pairs, text_file, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # a llama run directory, resumed with the qwen2 pair (same shapes)
    line = _error(_args(run, tiny_pairs["qwen2"], text_file, "--ckpt_path=last"), capsys)
    assert re.search(r"checkpoint '.*last\.ckpt' was made for teacher '.*llama.*' \(llama, .*\), not '.*qwen2.*'", line)
    assert "resume with --model.teacher=" in line and "without --ckpt_path" in line


def test_explicit_checkpoint_of_another_teacher(tiny_pairs, text_file, trained_run, tmp_path, capsys):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    line = _error(_args(tmp_path / "run", tiny_pairs["qwen2"], text_file, f"--ckpt_path={ckpt}"), capsys)
    assert "was made for teacher" in line and "but the config says" in line and "--model.teacher=" in line


def test_checkpoint_loaded_in_another_dtype_names_the_dtype(trained_run):
    # the same teacher in bfloat16 holds other bytes: say so, rather than "its files now hold other weights"
    from caq_lightning.module import CAQModule

    with pytest.raises(CAQError) as err:
        CAQModule.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", dtype="bfloat16")
    message = str(err.value)
    assert "in float32, but it is loaded in bfloat16: load it with dtype=float32" in message
    assert "other weights" not in message


def test_resume_with_other_transform_settings(tiny_pairs, text_file, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    line = _error(_args(run, tiny_pairs["llama"], text_file, "--ckpt_path=last", "--model.quant.rotate_head=false"), capsys)
    assert "holds other transforms than this model (unexpected: student.layer_transforms.0.r2" in line
    assert "resume with the same --model settings" in line


def test_missing_checkpoint(cli, tmp_path):
    line = cli(f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert "nope.ckpt' does not exist" in line and "--ckpt_path last" in line


def test_truncated_checkpoint(cli, trained_run, tmp_path):
    data = (trained_run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    line = cli(f"--ckpt_path={tmp_path / 'cut.ckpt'}")
    assert "cut.ckpt' is truncated or not a torch checkpoint" in line and "another .ckpt" in line


# ---- export (caq_lightning.export) ---------------------------------------------------------------------------------


def test_non_empty_export_target_without_overwrite(trained_run, tmp_path, capsys):
    export = pytest.importorskip("caq_lightning.export")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("someone's file")
    argv = ["--ckpt", str(trained_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")]
    line = _error(argv, capsys, entry=export.main)
    assert "is not empty: pass --overwrite" in line
    assert (tmp_path / "out" / "keep.txt").read_text() == "someone's file"


def test_corrupted_export_is_refused_before_use(trained_run, tmp_path):
    export = pytest.importorskip("caq_lightning.export")
    out = export.export_checkpoint(str(trained_run / "checkpoints" / "last.ckpt"), str(tmp_path / "out"))
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    expected = r"corrupted: sha256 of model\.safetensors does not match manifest\.json; re-export"
    with pytest.raises(CAQError, match=expected):
        export.load_quantized(out)
