"""Export formats as a registry: one class makes a format that get_format, the Export callback and the CLI know;
each format checks the run's settings before the first step; every manifest carries its format_version."""

import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import perturbed_student

from callbacks.export import Export
from caq_lightning.config import QuantConfig
from caq_lightning.data import CalibrationData
from caq_lightning.errors import CAQError
from caq_lightning.export import (
    FORMATS, MANIFEST, ExportFormat, atomic_dir, get_format, register_format, sha256, verify_manifest,
    write_compressed_tensors, write_export, write_manifest,
)  # fmt: skip
from caq_lightning.export.cli import parse_args
from caq_lightning.fold import fold
from caq_lightning.module import CAQModule


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


@pytest.fixture
def state_dict_format():
    """A format defined in one class: the folded model's float tensors as one safetensors file."""

    @register_format
    class StateDict(ExportFormat):
        name = "test-state-dict"

        def check(self, quant: QuantConfig) -> None:
            if quant.a_bits != 16:
                raise CAQError("test-state-dict keeps no activation quantization: set model.quant.a_bits=16")

        def write(self, model, recipe, tokenizer, target, overwrite):
            def files(folder):
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
                write_manifest(folder, self.name)

            return atomic_dir(target, overwrite, files)

    yield StateDict
    FORMATS.pop(StateDict.name)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(CAQError, match="unknown export format 'nope': choose one of .*caq-int4.*compressed-tensors"):
        get_format("nope")
    with pytest.raises(CAQError, match="unknown export format 'nope'"):
        Export(format="nope")


def test_a_new_format_is_one_class(state_dict_format, tiny_pairs, tmp_path):
    name = state_dict_format.name
    assert isinstance(Export(format=name).exporter, state_dict_format)
    assert parse_args(["--ckpt", "c", "--out", "o", "--format", name]).format == name
    with pytest.raises(CAQError, match="set model.quant.a_bits=16"):
        get_format(name).check(QuantConfig())
    get_format(name).check(QuantConfig(a_bits=16))
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    path = get_format(name).write(model, recipe, None, tmp_path / "out", False)
    verify_manifest(path)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == name and manifest["format_version"] == 1
    written = load_file(str(path / "model.safetensors"))
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "format,w_bits,message",
    [
        ("caq-int4", 8, "at most 4 bits, got w_bits=8: calibrate with model.quant.w_bits=4"),
        ("compressed-tensors-w4a16", 3, "holds 4-bit weights, got w_bits=3: calibrate with model.quant.w_bits=4"),
    ],
)
def test_a_format_refuses_the_runs_bits_before_the_first_step(tiny_pairs, text_file, tmp_path, format, w_bits, message):
    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, quant=QuantConfig(w_bits=w_bits))
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=16, batch_size=2)
    counter = StepCounter()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Export(format=format, out_dir=str(tmp_path / "export")), counter],
    )  # fmt: skip
    with pytest.raises(CAQError, match=message):
        trainer.fit(module, data)
    assert counter.steps == 0 and not (tmp_path / "export").exists()


def test_w4a16_format_writes_the_view_of_the_int4_export(tiny_pairs, tmp_path):
    pytest.importorskip("compressed_tensors", reason="the W4A16 view needs pip install 'caq-lightning[interop]'")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pairs["llama"][0])
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    (tmp_path / "formats").mkdir()
    view = get_format("compressed-tensors-w4a16").write(model, recipe, tokenizer, tmp_path / "formats" / "view", False)
    reference = write_compressed_tensors(write_export(model, recipe, tokenizer, tmp_path / "int4"), tmp_path / "ref")
    assert sha256(view / "model.safetensors") == sha256(reference / "model.safetensors")
    assert [p.name for p in (tmp_path / "formats").iterdir()] == ["view"]  # the temporary int4 export is gone
    assert json.loads((view / MANIFEST).read_text())["format"] == "compressed-tensors-w4a16"


def test_a_newer_format_version_is_refused(tiny_pairs, tmp_path):
    model, recipe = fold(perturbed_student(tiny_pairs["llama"][0]))
    path = write_export(model, recipe, None, tmp_path / "int4")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format"] == "caq-int4" and manifest["format_version"] == 1
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(CAQError, match="format_version 2, but this caq-lightning reads format_version 1"):
        verify_manifest(path)
