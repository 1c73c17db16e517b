"""What a user sees during a real fit: a step-counted bar with tokens/s and the ETA, a model summary without the
FLOPs column, one summary line at the end; and the CLI adds them to any config that does not name its own."""

import logging
import re

import lightning as L
import pytest
from jsonargparse import Namespace

from caq_lightning.fit_progress import CompactModelSummary, FitSummary, StepProgressBar
from caq_lightning.cli import default_callbacks
from caq_lightning.data import CalibrationData
from caq_lightning.module import CAQModule


@pytest.fixture(scope="module")
def shown(tiny_pairs, text_file, tmp_path_factory):
    """stdout and the logged text of a 3-step fit over 2-batch epochs (max_epochs=-1: the 'Epoch 0/-2' case)."""
    import contextlib
    import io

    pair, root = tiny_pairs["llama"], tmp_path_factory.mktemp("progress")
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=32, batch_size=2)
    summary = FitSummary()
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_checkpointing=False,
        callbacks=[StepProgressBar(), CompactModelSummary(), summary],
    )  # fmt: skip
    out, handler = io.StringIO(), logging.StreamHandler(log := io.StringIO())
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            trainer.fit(module, data)
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    return out.getvalue().replace("\r", "\n"), log.getvalue(), summary


def test_bar_counts_steps_over_epochs_with_tokens_per_second(shown):
    out, _, _ = shown
    final = [line for line in out.splitlines() if line.startswith("step 3/3 ")]
    assert final, out[-2000:]
    assert re.search(r"\[\d\d:\d\d<00:00, +[\d.]+(s/step|step/s), tok/s=\d+", final[-1]), final[-1]
    assert "step 2/3 " in out and "Epoch" not in out and "v_num" not in out


def test_one_summary_line_at_the_end_of_fit(shown):
    out, _, summary = shown
    match = re.search(r"^fit: 3 steps, 192 tokens, 0m[\d.]+s wall, ([\d,]+) tokens/s$", out, re.MULTILINE)  # 3 x 2 x 32
    assert match and summary.line == match[0], out[-2000:]
    assert int(match[1].replace(",", "")) > 0  # thousands separators above 999 tokens/s


def test_model_summary_has_no_flops_column(shown):
    _, log, _ = shown
    assert "Trainable params" in log and "student" in log and "CAQStudent" in log
    assert "FLOPs" not in log and "Flops" not in log


def _trainer_config(callbacks=None, **flags):
    bar, summary = flags.get("bar"), flags.get("summary")
    return Namespace(callbacks=callbacks, enable_progress_bar=bar, enable_model_summary=summary)


def _names(added):
    return [c.class_path.rsplit(".", 1)[1] for c in added]


def test_cli_adds_the_displays_to_any_config():
    assert _names(default_callbacks(_trainer_config())) == ["FitSummary", "StepProgressBar", "CompactModelSummary"]


def test_cli_respects_displays_turned_off_or_named():
    assert _names(default_callbacks(_trainer_config(bar=False, summary=False))) == ["FitSummary"]
    named = [
        Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar", init_args=Namespace()),
        Namespace(class_path="lightning.pytorch.callbacks.ModelSummary", init_args=Namespace()),
        Namespace(class_path="callbacks.progress.FitSummary", init_args=Namespace()),
    ]
    assert default_callbacks(_trainer_config(named)) == []
