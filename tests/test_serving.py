"""The serving profile and the compressed-tensors W4A4/W4A8 formats: a standard stack (transformers +
compressed-tensors, in a process that never imports caq_lightning) computes the project's logits from the export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from caq_lightning.config import QuantConfig
from caq_lightning.errors import CAQError
from caq_lightning.export import verify_manifest
from caq_lightning.export.formats import FORMATS, ExportFormat, get_format
from caq_lightning.fold import fold
from caq_lightning.quant.hadamard import hadamard, sylvester_blocks
from caq_lightning.quant.quantizer import QuantSpec, fake_quantize
from tiny import REPO, padded_batch, perturbed_student, save_tiny_pair

SERVE = dict(profile="serve", a_symmetric=True, kv_bits=16, online_r3=False)


def ct_logits(export: Path, ids: torch.Tensor, mask: torch.Tensor, tmp_path: Path) -> tuple[torch.Tensor, dict]:
    """Logits of ``export`` loaded by bench/ct_reference.py in a fresh process (no caq_lightning import)."""
    inputs, logits = tmp_path / "inputs.pt", tmp_path / "logits.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, inputs)
    script = REPO / "bench" / "ct_reference.py"
    cmd = [sys.executable, str(script), str(export), str(inputs), str(logits), f"--threads={torch.get_num_threads()}"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(logits, weights_only=True), json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "fmt,family,overrides",
    [
        ("compressed-tensors-w4a4", "llama", {}),  # intermediate 96: R4 in 3 blocks of 32 (head_dim=32)
        ("compressed-tensors-w4a8", "qwen2", {}),  # q/k/v biases, grouped weights
        ("compressed-tensors-w4a4", "mistral", {"intermediate_size": 128}),  # one Sylvester block of 128
    ],
)
def test_standard_stack_reproduces_the_served_student(tiny_pairs, tmp_path, fmt, family, overrides, one_thread):
    pytest.importorskip("compressed_tensors")
    pair = save_tiny_pair(tmp_path / "pair", family, **overrides) if overrides else tiny_pairs[family]
    a_bits = 4 if fmt.endswith("a4") else 8
    student = perturbed_student(pair[0], a_bits=a_bits, w_group_size=16 if family == "qwen2" else 0, **SERVE)
    model, recipe = fold(student)
    ids, mask = padded_batch(student.model.config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits  # the fold runtime: the project's numbers
    export = get_format(fmt).write(model, recipe, AutoTokenizer.from_pretrained(pair[0]), tmp_path / "ct", False)

    got, info = ct_logits(export, ids, mask, tmp_path)
    diff = (got - expected)[mask.bool()].abs().max().item()
    print(f"{fmt} {family}: max abs logit difference {diff:.3g}")
    assert diff <= 1e-3, diff
    layers = student.model.config.num_hidden_layers
    assert info["caq_lightning_imported"] is False
    assert info["quantized"] == 7 * layers and info["transforms"] == layers  # lm_head stays dense
    assert info["input_activations"] == [
        {**info["input_activations"][0], "num_bits": a_bits, "type": "int", "symmetric": True, "strategy": "token",
         "dynamic": True}
    ]  # fmt: skip

    verify_manifest(export)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["format_version"] == 1
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= manifest["files"].keys()
    q = json.loads((export / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (4, "int", True)
    assert weights["strategy"] == ("group" if family == "qwen2" else "channel")
    r4 = q["transform_config"]["config_groups"]["R4"]
    assert r4["type"] == "hadamard" and r4["head_dim"] == (None if overrides else 32)
    assert r4["apply"] == [{"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []}]


def test_the_served_student_is_only_rounding_away_from_the_student(tiny_pairs):
    """fold() keeps the serving student's numbers: the activation codes can only differ where a value sits on a
    rounding tie (compressed-tensors' rule puts a negative per-token maximum exactly on one)."""
    student = perturbed_student(tiny_pairs["llama"][0], a_bits=8, **SERVE)
    model, _ = fold(student)
    ids, mask = padded_batch(student.model.config.vocab_size)
    with torch.no_grad():
        expected = student(input_ids=ids, attention_mask=mask).logits.softmax(-1)
        got = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    assert (got - expected)[mask.bool()].abs().max() <= 2e-2


def test_half_range_rule_is_compressed_tensors_dynamic_quantizer():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    torch.manual_seed(0)
    x = torch.randn(3, 17, 64) * torch.rand(3, 17, 1) * 4
    for bits in (4, 8):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)
        theirs = ct_fake_quantize(x, *compute_dynamic_scales_and_zp(x, args, module=None), args)  # forward_quantize
        ours = fake_quantize(x, QuantSpec(bits, True, 0, 1.0, "half_range"))
        assert torch.equal(ours, theirs)
        assert not torch.equal(fake_quantize(x, QuantSpec(bits, True, 0)), theirs)  # the default rule is not it


@pytest.mark.parametrize("n", [96, 128, 688])  # 3 blocks of 32, one of 128, 43 blocks of 16
def test_serving_r4_is_compressed_tensors_hadamard_transform(n):
    torch.manual_seed(0)
    x = torch.randn(2, 5, n)
    k = n & -n
    dense = torch.block_diag(*[hadamard(k)] * (n // k))
    assert torch.allclose(dense @ dense.T, torch.eye(n), atol=1e-6)
    assert torch.allclose(sylvester_blocks(x), x @ dense, atol=1e-5)
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.transform import TransformArgs, TransformFactory, TransformScheme

    args = TransformArgs(targets=["Linear"], location="input")
    scheme = TransformScheme(type="hadamard", apply=[args], head_dim=None if k == n else k)
    theirs = TransformFactory.from_scheme(scheme, name="R4").create_transform(torch.nn.Linear(n, 4), args)
    assert torch.equal(sylvester_blocks(x), theirs(x))  # bit for bit: the same activation codes after it


def test_serving_profile_refuses_what_the_format_cannot_express():
    QuantConfig(**SERVE)  # the profile itself is valid
    cases = {
        "a_symmetric=true": dict(SERVE, a_symmetric=False),
        "kv_bits=16": dict(SERVE, kv_bits=4),
        "online_r3=false": dict(SERVE, online_r3=None),  # R3 follows online_hadamard, which is on
        "a_bits=4 or 8": dict(SERVE, a_bits=6),
        "a_group_size=0": dict(SERVE, a_group_size=16),
        "w_bits=4 and w_symmetric=true": dict(SERVE, w_symmetric=False),
    }
    for fix, settings in cases.items():
        with pytest.raises(CAQError, match=f"profile=serve: .*set {fix}"):
            QuantConfig(**settings)


def test_format_check_names_the_setting_to_change():
    pytest.importorskip("compressed_tensors")
    w4a4 = get_format("compressed-tensors-w4a4")
    assert isinstance(w4a4, ExportFormat)
    assert {"compressed-tensors-w4a4", "compressed-tensors-w4a8"} <= FORMATS.keys()
    full = QuantConfig()  # the default student: asymmetric activations, KV4, R3
    with pytest.raises(CAQError, match="compressed-tensors-w4a4: .*set a_symmetric=true"):
        w4a4.check(full)
    with pytest.raises(CAQError, match="set kv_bits=16"):
        w4a4.check(QuantConfig(a_symmetric=True))
    with pytest.raises(CAQError, match="set online_r3=false"):
        w4a4.check(QuantConfig(a_symmetric=True, kv_bits=16))
    with pytest.raises(CAQError, match="set profile=serve"):
        w4a4.check(QuantConfig(a_symmetric=True, kv_bits=16, online_r3=False))
    with pytest.raises(CAQError, match="set a_bits=4 or export with format compressed-tensors-w4a8"):
        w4a4.check(QuantConfig(**SERVE, a_bits=8))
    get_format("compressed-tensors-w4a8").check(QuantConfig(**SERVE, a_bits=8))
    with pytest.raises(CAQError, match="unknown export format 'gguf'"):
        get_format("gguf")


def test_r3_splits_from_r4_and_old_settings_keep_both():
    assert QuantConfig().hadamard_qk and QuantConfig(online_hadamard=False).hadamard_qk is False
    assert QuantConfig(online_r3=False).hadamard_qk is False and QuantConfig(online_r3=False).online_hadamard
    assert QuantConfig(online_hadamard=False, online_r3=True).hadamard_qk


@pytest.fixture(scope="module")
def served_fit(tiny_pairs, text_file, tmp_path_factory):
    """A 2-step serving-profile fit of the tiny llama pair ending in a compressed-tensors W4A8 export."""
    pytest.importorskip("compressed_tensors")
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.export import Export
    from caq_lightning.data import CalibrationData
    from caq_lightning.module import CAQModule

    root = tmp_path_factory.mktemp("served")
    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, quant=QuantConfig(**SERVE, a_bits=8))
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=16, batch_size=2)
    export = Export(format="compressed-tensors-w4a8", out_dir=str(root / "export"))
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, default_root_dir=root, logger=False,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True), export],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    return module, export, root


def test_a_serving_fit_ends_with_the_format_and_the_cli_writes_the_same(served_fit, tmp_path, capsys):
    from caq_lightning.export import main, sha256

    module, export, root = served_fit
    ids, mask = padded_batch(module.student.model.config.vocab_size)
    model, recipe = module.exported()  # what the callback wrote: GPTQ-rounded, the default
    assert recipe.rounding == "gptq"
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    got, _ = ct_logits(export.path, ids, mask, tmp_path)
    assert (got - expected)[mask.bool()].abs().max() <= 1e-3
    main(["--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "cli"), "--format", export.exporter.name])
    assert f"compressed-tensors-w4a8 export written to {tmp_path / 'cli'}" in capsys.readouterr().out
    assert sha256(tmp_path / "cli" / "model.safetensors") == sha256(export.path / "model.safetensors")
    with pytest.raises(SystemExit) as exit_info:  # refused from the checkpoint's settings, before loading the model
        main(["--ckpt", str(root / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "x"), "--format",
              "compressed-tensors-w4a4"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "set a_bits=4 or export with format compressed-tensors-w4a8" in capsys.readouterr().err


def test_an_unservable_student_fails_in_setup_before_any_step(tiny_pairs, text_file, tmp_path):
    pytest.importorskip("compressed_tensors")
    import lightning as L

    from callbacks.int4_export import Int4Export
    from caq_lightning.data import CalibrationData
    from caq_lightning.module import CAQModule

    pair = tiny_pairs["llama"]
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0)  # asymmetric activations, KV4, R3
    steps = []
    module.training_step = lambda *args: steps.append(args)  # noqa: ARG005
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=16, batch_size=2)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
        callbacks=[Int4Export(out_dir=str(tmp_path / "export"), format="compressed-tensors-w4a4")],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(CAQError, match="compressed-tensors-w4a4: vLLM's int kernels take symmetric .*set a_symmetric"):
        trainer.fit(module, data)
    assert steps == [] and not (tmp_path / "export").exists()


def test_exactness_needs_the_format_scale_rule_and_operation_order(tiny_pairs, tmp_path, monkeypatch, one_thread):
    """Why the serving profile computes as compressed-tensors does: the same checkpoint run with the usual
    activation scale (absmax / 7) or with R4 as one dense matmul (the same matrix) disagrees with the standard stack."""
    pytest.importorskip("compressed_tensors")
    import dataclasses

    import caq_lightning.runtime.attach as attaching  # fold() attaches the runtime through it

    pair = tiny_pairs["llama"]
    ids, mask = padded_batch(128)
    hook, r4 = attaching._input_hook, attaching.online_r4

    def diff_with(**patches) -> float:
        with monkeypatch.context() as m:
            for name, value in patches.items():
                m.setattr(attaching, name, value)
            model, recipe = fold(perturbed_student(pair[0], **SERVE))
        export = get_format("compressed-tensors-w4a4").write(model, recipe, None, tmp_path / "ct", True)
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).logits
        return (ct_logits(export, ids, mask, tmp_path)[0] - ours)[mask.bool()].abs().max().item()

    def dense_r4(x):
        n = x.shape[-1]
        return x @ torch.block_diag(*[hadamard(n & -n)] * (n // (n & -n))).to(x)

    exact = diff_with()
    qmax = diff_with(_input_hook=lambda h, spec: hook(h, dataclasses.replace(spec, scale_rule="qmax")))
    dense = diff_with(online_r4=lambda profile: dense_r4 if profile == "serve" else r4(profile))
    print(f"max abs logit difference: as served {exact:.3g}, absmax/7 scale {qmax:.3g}, dense R4 matmul {dense:.3g}")
    assert exact <= 1e-3 and qmax > 1e-2 and dense > 1e-3
