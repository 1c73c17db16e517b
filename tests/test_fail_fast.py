"""Every input a run needs is checked before the first optimizer step: a bad one fails in seconds, not after
calibration. Real tiny models and real fits throughout; a counting callback proves no step ran."""

import csv
import json
import shutil
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny import REPO, TEXT, build_tokenizer

from callbacks.int4_export import Int4Export
from callbacks.safety_report import SafetyReport
from caq_lightning.cli import main
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule

PROMPTS = [{"prompt": "How do I bake bread?", "label": "benign"}, {"prompt": "Forge a passport", "label": "harmful"}]


class StepCounter(L.Callback):
    """Counts optimizer steps (the expensive work a bad input must never reach)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good report inputs and model directories that are wrong in one way each, next to the tiny llama pair."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (root / "heldout.txt").write_text(TEXT)
    (root / "short.txt").write_text("The river runs.")
    return root


@pytest.fixture
def fit(tiny_pairs, text_file, tmp_path):
    """fit(callbacks, teacher=..., **data) -> (error message or None, optimizer steps taken)."""

    def run(callbacks, teacher=None, base=None, **data):
        pair = tiny_pairs["llama"]
        teacher, base = str(teacher or pair[0]), str(base or pair[1])
        data = {"source": str(text_file), "num_samples": 4, "seq_len": 32, "batch_size": 2, **data}
        counter = StepCounter()
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[*callbacks, counter],
        )  # fmt: skip
        try:
            module = CAQModule(teacher=teacher, base=base, rtn_kl_every=0)
            trainer.fit(module, CalibrationData(tokenizer=teacher, **data))
        except CAQError as err:
            return str(err), counter.steps
        return None, counter.steps

    return run


def _report(inputs, **kwargs) -> SafetyReport:
    args = {"prompts": str(inputs / "prompts.jsonl"), "ppl_text": str(inputs / "heldout.txt"), "seq_len": 32}
    return SafetyReport(**{**args, "max_new_tokens": 2, **kwargs})


# ---- each check fires before the first optimizer step ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make_report, expected",
    [
        (lambda d: SafetyReport(), "SafetyReport has no prompts and ppl_text for teacher"),
        (lambda d: _report(d, ppl_text=None), "SafetyReport has no ppl_text for teacher"),
        (lambda d: _report(d, prompts=None), "SafetyReport has no prompts for teacher"),
        (lambda d: _report(d, prompts=str(d / "nope.jsonl")), "prompts file '"),
        (lambda d: _report(d, ppl_text=str(d / "nope.txt")), "SafetyReport ppl_text '"),
        (lambda d: _report(d, ppl_text=str(d / "short.txt")), "fewer than one window of 32"),
        (lambda d: _report(d, seq_len=512), "SafetyReport seq_len=512 exceeds the model's maximum of 128"),
    ],
    ids=["no-inputs", "no-ppl-text", "no-prompts", "missing-prompts", "missing-ppl-text", "short-ppl-text", "seq-len"],
)
def test_safety_report_checks_fire_before_any_step(fit, inputs, make_report, expected):
    message, steps = fit([make_report(inputs)])
    assert message is not None and expected in message, message
    assert steps == 0 and "\n" not in message


def test_report_inputs_name_the_config_as_the_place_to_fix_them(fit):
    message, _ = fit([SafetyReport()])
    assert "init_args in the config file" in message and "only the last callback" in message


def test_tokenizer_without_chat_template_fails_before_any_step(fit, tiny_pairs, inputs, tmp_path):
    teacher = tmp_path / "no_template"
    shutil.copytree(tiny_pairs["llama"][0], teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    message, steps = fit([_report(inputs)], teacher=teacher)
    assert message is not None and "has no chat_template, so chat prompts cannot be scored" in message, message
    assert steps == 0


def test_non_empty_export_target_fails_before_any_step(fit, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("someone's file")
    message, steps = fit([Int4Export(out_dir=str(tmp_path / "out"))])
    assert message is not None and "is not empty: set overwrite: true" in message, message
    assert steps == 0 and (tmp_path / "out" / "keep.txt").read_text() == "someone's file"


def test_non_empty_export_target_with_overwrite_is_accepted(fit, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("an old export")
    message, steps = fit([Int4Export(out_dir=str(tmp_path / "out"), overwrite=True)])
    assert message is None and steps == 2
    assert (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "old.txt").exists()


def test_unwritable_export_target_fails_before_any_step(fit, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    message, steps = fit([Int4Export(out_dir=str(tmp_path / "a_file" / "export"))])
    assert message is not None and "int4 export target" in message and "cannot be created" in message, message
    assert steps == 0


def test_sequence_length_beyond_the_model_fails_before_any_step(fit):
    message, steps = fit([], seq_len=256)
    assert message is not None and "seq_len 256 exceeds the model's maximum" in message, message
    assert steps == 0


def test_calibration_text_shorter_than_one_window_fails_before_any_step(fit, inputs):
    message, steps = fit([], source=str(inputs / "short.txt"))
    assert message is not None and "fewer than one window of seq_len=32" in message, message
    assert steps == 0


def test_tokenizer_without_pad_token_is_handled(fit, tiny_pairs, inputs, tmp_path):
    pair = []
    for name, source in zip(("aligned", "base"), tiny_pairs["llama"]):
        shutil.copytree(source, tmp_path / name)
        build_tokenizer().save_pretrained(tmp_path / name)  # the same vocabulary...
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        config.pop("pad_token", None)  # ...without a pad token
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
        pair.append(tmp_path / name)
    report = _report(inputs)
    message, steps = fit([report], teacher=pair[0], base=pair[1], format="chat", source=str(inputs / "prompts.jsonl"))
    assert message is None and steps == 2
    assert report.results["models"]["caq"]["n_harmful"] == 1  # padded batches generated and scored


# ---- the scenario through the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_test_teacher(tmp_path_factory):
    """builtin:tiny-test's aligned and base models copied to plain directories (a user's own checkpoint)."""
    from caq_lightning import zoo

    root = tmp_path_factory.mktemp("checkpoint")
    pair = zoo.builtin_pair("tiny-test")  # built once per test session (~20 s), not timed below
    shutil.copytree(pair.aligned_dir, root / "teacher")
    shutil.copytree(pair.base_dir, root / "base")
    return root


def test_path_teacher_without_ppl_text_fails_in_seconds_before_calibration(tiny_test_teacher, tmp_path, capsys):
    root = tmp_path / "run"
    argv = [
        "--config", str(REPO / "configs" / "tiny.yaml"), f"--model.teacher={tiny_test_teacher / 'teacher'}",
        f"--model.base={tiny_test_teacher / 'base'}", "--data.source=builtin:tiny-test", "--data.seq_len=64",
        "--trainer.max_steps=200", f"--trainer.default_root_dir={root}",
    ]  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "SafetyReport has no prompts and ppl_text" in lines[0] and "ppl_text (a plain text file" in lines[0]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    metrics = list(root.rglob("metrics.csv"))
    assert not metrics or not [r for r in csv.DictReader(metrics[0].open()) if r.get("kl_teacher")]
    assert not list(root.rglob("*.ckpt"))


def test_unwritable_root_dir_fails_before_loading_models(tiny_pairs, text_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    argv = [
        "--config", str(REPO / "configs" / "llama_w4a4.yaml"), f"--model.teacher={tiny_pairs['llama'][0]}",
        f"--model.base={tiny_pairs['llama'][1]}", f"--data.source={text_file}", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.strategy=auto", f"--trainer.default_root_dir={tmp_path / 'a_file' / 'runs'}",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "error: trainer.default_root_dir" in err and "cannot be created" in err, err[-2000:]


def test_final_state_is_checkpointed_before_post_fit_callbacks(tiny_pairs, text_file, tmp_path):
    class Probe(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            self.seen = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))

    pair, probe = tiny_pairs["llama"], Probe()
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=6, seq_len=32, batch_size=2)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100)],
    )  # fmt: skip
    trainer.fit(module, data)
    assert probe.seen == ["last.ckpt"]  # ModelCheckpoint alone would save nothing before step 100
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
