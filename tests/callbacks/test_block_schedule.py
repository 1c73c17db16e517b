"""BlockScheduler: which blocks are quantized, anchored and trained at each step, on a real Trainer and tiny models."""

import csv
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from tiny import grouped, save_tiny_pair

from callbacks.block_schedule import BlockScheduler
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.module import CAQModule


@pytest.fixture(scope="module")
def pair3(tmp_path_factory):
    """A 3-block llama pair, so a block has both earlier and later neighbours."""
    return save_tiny_pair(tmp_path_factory.mktemp("pair3"), "llama", num_hidden_layers=3)


def _module(pair, **kw) -> CAQModule:
    kw = {"teacher": str(pair[0]), "base": str(pair[1]), "rtn_kl_every": 0, "lr_schedule": "constant", **kw}
    return CAQModule(**grouped(**kw))


def _data(pair, text_file) -> CalibrationData:
    return CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=12, seq_len=16, batch_size=2)


def _trainer(steps, callbacks, root=None, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, default_root_dir=root,
        logger=L.pytorch.loggers.CSVLogger(root) if root else False, enable_checkpointing=root is not None,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, **kw,
    )  # fmt: skip


def _block_of(name: str) -> str:
    """'layer_transforms.1.r2...' / 'model.model.layers.1....clip_logit' -> '1'; R1 -> 'r1'."""
    match = re.match(r"(?:layer_transforms|model\.model\.layers)\.(\d+)\.", name)
    return match.group(1) if match else "r1"


class Probe(L.Callback):
    """Records, after each backward, which parameters got a gradient and how the student was configured."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        student = pl_module.student
        self.steps.append({
            "step": trainer.global_step,
            "grads": {_block_of(n) for n, p in student.named_parameters() if p.grad is not None},
            "quantized": [m.quantize for m in student.layer_modes],
            "anchored": pl_module.recon_blocks,
        })  # fmt: skip


def test_sequential_trains_block_i_alone(pair3, text_file, tmp_path):
    probe = Probe()
    module = _module(pair3)
    trainer = _trainer(6, [BlockScheduler("sequential", steps_per_block=2), probe], root=tmp_path)
    trainer.fit(module, _data(pair3, text_file))
    assert [s["grads"] for s in probe.steps] == [{"0"}, {"0"}, {"1"}, {"1"}, {"2"}, {"2"}]
    assert probe.steps[2]["quantized"] == [True, True, False]  # earlier quantized, later in full precision
    assert [s["anchored"] for s in probe.steps[::2]] == [{0}, {1}, {2}]
    # After the fit every transform is trainable again and every block quantized (what gets exported).
    assert all(m.quantize for m in module.student.layer_modes) and module.recon_blocks is None
    trainable = sum(map(len, module.student.param_groups().values()))
    assert sum(p.requires_grad for p in module.student.parameters()) == trainable


def test_progressive_grows_the_quantized_prefix(pair3, text_file):
    probe = Probe()
    _trainer(3, [BlockScheduler("progressive", steps_per_block=1), probe]).fit(_module(pair3), _data(pair3, text_file))
    assert [s["quantized"] for s in probe.steps] == [[True, False, False], [True, True, False], [True, True, True]]
    assert [s["grads"] for s in probe.steps] == [{"0", "r1"}, {"0", "1", "r1"}, {"0", "1", "2", "r1"}]
    assert probe.steps[1]["anchored"] == {0, 1}


def test_all_schedule_equals_the_module_without_callback(tiny_pairs, text_file):
    pair = tiny_pairs["llama"]
    results = []
    for callbacks in ([], [BlockScheduler("all")]):
        L.seed_everything(0)
        module = _module(pair, loss="cal_full", lr_rotation=0.05, lr_scale=0.05)
        _trainer(3, callbacks).fit(module, _data(pair, text_file))
        results.append({n: p.detach().clone() for n, p in module.student.named_parameters() if p.requires_grad})
    plain, scheduled = results
    assert plain.keys() == scheduled.keys() and len(plain) > 10
    assert all(torch.equal(plain[n], scheduled[n]) for n in plain)


def test_block_is_logged_and_shown_in_the_progress_bar(tiny_pairs, text_file, tmp_path):
    pair = tiny_pairs["qwen2"]
    trainer = _trainer(3, [BlockScheduler("sequential", steps_per_block=2)], root=tmp_path)
    trainer.fit(_module(pair), _data(pair, text_file))
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert [float(r["block"]) for r in csv.DictReader(metrics.open()) if r.get("block")] == [0, 0, 1]
    assert trainer.progress_bar_metrics["block[sequential]"] == 1
    (hparams,) = tmp_path.rglob("hparams.yaml")
    assert "block_schedule: sequential" in hparams.read_text()


def test_resume_continues_at_the_saved_block(pair3, text_file, tmp_path):
    data = _data(pair3, text_file)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    rtn = {"w_train": "rtn", "w_rounding": "rtn"}  # learned clips: only RTN-weight training has them
    _trainer(3, [BlockScheduler("sequential", steps_per_block=2), ckpt], root=tmp_path).fit(_module(pair3, **rtn), data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert sum("clip_logit" in k for k in saved) == 3 * 7  # frozen-by-schedule clips are still checkpointed
    probe = Probe()
    resumed = BlockScheduler("sequential", steps_per_block=100)  # the checkpoint's schedule wins on resume
    trainer = _trainer(6, [resumed, probe, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], root=tmp_path)
    trainer.fit(_module(pair3, **rtn), _data(pair3, text_file), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.steps_per_block == 2
    assert [(s["step"], s["grads"]) for s in probe.steps] == [(3, {"1"}), (4, {"2"}), (5, {"2"})]


def test_per_block_fp_is_exact_and_global_modes_override_it(tiny_pairs):
    module = _module(tiny_pairs["llama"], loss="kl", base=None)
    student = module.student
    torch.manual_seed(0)
    ids = torch.randint(0, student.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        with student.mode(False, False):
            teacher = student(input_ids=ids).logits
        with student.mode(False, True):
            rtn = student(input_ids=ids).logits
        student.set_quantized_layers(set())  # every block in full precision in student passes
        fp_student = student(input_ids=ids).logits
        with student.mode(False, False):
            assert torch.equal(student(input_ids=ids).logits, teacher)
        with student.mode(False, True):
            assert torch.equal(student(input_ids=ids).logits, rtn)  # plain RTN ignores the schedule
        student.set_quantized_layers({0})
        first_only = student(input_ids=ids).logits
    assert (fp_student - teacher).abs().max() < 1e-4  # FP blocks with transforms are the teacher
    assert (first_only - teacher).abs().max() > 1e-3  # block 0 is really quantized


def test_ddp_without_find_unused_parameters_is_refused(tiny_pairs):
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(find_unused_parameters=False), logger=False)
    with pytest.raises(CAQError, match="find_unused_parameters=true"):
        BlockScheduler("sequential").setup(trainer, None, "fit")
    BlockScheduler("all").setup(trainer, None, "fit")  # nothing is frozen under `all`


def test_bad_arguments_are_refused():
    with pytest.raises(CAQError, match="unknown block schedule 'blockwise'"):
        BlockScheduler("blockwise")
    with pytest.raises(CAQError, match="steps_per_block=0"):
        BlockScheduler("sequential", steps_per_block=0)
