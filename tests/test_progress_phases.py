"""Progress of long waits: a bar on a terminal, one line per phase otherwise or when quiet, silence off rank 0; and
the phases that report it (pair-build steps, GPTQ layers)."""

import io
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from caq_lightning.fold import fold
from caq_lightning.progress import QUIET_VAR, Progress, progress
from caq_lightning.zoo.training import sft
from tiny import padded_batch, perturbed_student


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def rank0(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", QUIET_VAR):
        monkeypatch.delenv(var, raising=False)


def test_without_a_terminal_each_phase_is_one_line(rank0, capsys):
    with Progress("build", 3, "step") as bar:
        for _ in range(3):
            bar.update(loss="0.25")
    assert list(progress(range(2), "score", unit="batch")) == [0, 1]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("build: 3/3 step in ") and lines[0].endswith(" s, loss 0.25")
    assert lines[1].startswith("score: 2/2 batch in ")


def test_a_terminal_gets_a_bar_unless_quiet(rank0, monkeypatch):
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    list(progress(range(4), "align", unit="step"))
    assert tty.getvalue().startswith("\ralign:   0%|") and "0/4" in tty.getvalue()  # tqdm redraws in place
    assert " s\n" not in tty.getvalue()  # a bar, not the one-line summary
    monkeypatch.setenv(QUIET_VAR, "1")
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    list(progress(range(4), "align", unit="step"))
    assert quiet.getvalue().startswith("align: 4/4 step in ") and "\r" not in quiet.getvalue()


def test_other_ranks_and_failed_phases_print_nothing(rank0, monkeypatch, capsys):
    with pytest.raises(RuntimeError):
        with Progress("doomed", 2) as bar:
            bar.update()
            raise RuntimeError("stop")
    monkeypatch.setenv("LOCAL_RANK", "1")
    list(progress(range(3), "rank one"))
    assert capsys.readouterr().err == ""


def test_pair_build_reports_its_steps(rank0, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    rows = [([1, 2, 3, 4, 5], 0), ([6, 7, 8], 1)]
    gen = torch.Generator().manual_seed(0)
    sft(model, list(model.parameters()), [(rows, 2)], 3, 1e-3, gen, pad_id=0, desc="tiny pair: align")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tiny pair: align: 3/3 step in ")


def test_gptq_reports_its_layers_and_rtn_stays_silent(rank0, tiny_pairs, capsys):
    student = perturbed_student(tiny_pairs["llama"][0], w_bits=4, a_bits=16, kv_bits=16)
    batches = [dict(zip(("input_ids", "attention_mask"), padded_batch(student.model.config.vocab_size)))]
    capsys.readouterr()  # transformers' own loading bars
    fold(student, rounding="rtn")
    assert capsys.readouterr().err == ""
    fold(student, batches, rounding="gptq", hessians="sequential")
    (line,) = capsys.readouterr().err.splitlines()
    n = student.model.config.num_hidden_layers
    assert line.startswith(f"GPTQ: {n}/{n} layer in ")
    _, recipe = fold(student, batches, rounding="gptq", hessians="one_pass")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"GPTQ: {len(recipe.weights)}/{len(recipe.weights)} linear in ")
