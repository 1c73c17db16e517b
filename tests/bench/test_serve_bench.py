"""bench/serve_match.py on a tiny pair (the builtin:smol run is the lead's), and bench/gpu_check.py's vLLM step."""

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fmt", ["compressed-tensors-w4a4", "compressed-tensors-w4a8"])
def test_serve_match_reports_full_agreement_on_a_tiny_pair(load_bench, tiny_pairs, text_file, tmp_path, capsys, fmt):
    pytest.importorskip("compressed_tensors")
    log = tmp_path / "log.jsonl"
    args = ["--format", fmt, "--model", str(tiny_pairs["llama"][0]), "--text", str(text_file), "--samples", "2",
            "--seq-len", "32", "--log", str(log)]  # fmt: skip
    load_bench("serve_match").main(args)
    row = json.loads(log.read_text())
    assert row == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["top1_agreement"] == 1.0 and row["max_abs_logit_diff"] <= 1e-3 and row["meets_0.99"]
    assert row["reference"]["caq_lightning_imported"] is False and row["reference"]["transforms"] == 2


def test_vllm_serve_check_skips_without_a_gpu(load_bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu_check.py runs for real")
    result = load_bench("gpu_check").vllm_serve_check("no-such-export")
    assert result == {"step": "vllm_serve", "status": "skipped", "reason": "no CUDA GPU"}


def test_serve_match_on_a_bfloat16_run_checkpoint(load_bench, tiny_pairs, text_file, tmp_path, capsys):
    # the real configs run with model.dtype bfloat16: the check loads the run as it was trained, then compares in fp32
    pytest.importorskip("compressed_tensors")
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from caq_lightning.config import QuantConfig
    from caq_lightning.data import CalibrationData
    from caq_lightning.module import CAQModule

    pair = tiny_pairs["llama"]
    quant = QuantConfig(profile="serve", a_bits=8, a_symmetric=True, kv_bits=16, online_r3=False)
    module = CAQModule(teacher=str(pair[0]), base=str(pair[1]), rtn_kl_every=0, dtype="bfloat16", quant=quant)
    data = CalibrationData(source=str(text_file), tokenizer=str(pair[0]), num_samples=4, seq_len=16, batch_size=2)
    L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    ).fit(module, data)  # fmt: skip
    log = tmp_path / "log.jsonl"
    load_bench("serve_match").main(["--format", "compressed-tensors-w4a8", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"),
                                    "--text", str(text_file), "--samples", "2", "--seq-len", "32", "--log", str(log)])  # fmt: skip
    row = json.loads(log.read_text())
    assert row["top1_agreement"] == 1.0 and row["max_abs_logit_diff"] <= 1e-3
