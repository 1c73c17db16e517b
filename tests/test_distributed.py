"""Two real gloo processes on CPU through the real CLI: DDP and FSDP2 (ModelParallelStrategy + fully_shard)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_probe import fixed_batch

from caq_lightning.data import CalibrationData
from caq_lightning.module import CAQModule
from tiny import grouped, model_flags

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES, PROBE_SAMPLES = 8, 4
Q_PROJ = "student.model.model.layers.0.self_attn.q_proj.linear.weight"


def _model_args(pair, **overrides) -> dict:
    args = {
        "teacher": str(pair[0]), "base": str(pair[1]), "loss": "cal_full", "lambda_push": 0.3, "top_k": 64,
        "recon_weight": 1.0, "lr_rotation": 0.05, "lr_scale": 0.05, "rtn_kl_every": 0, "dtype": "float32",
    }  # fmt: skip
    return {**args, **overrides}


def _fit(tmp_path: Path, config: str, model: dict, text_file, args: list[str]) -> dict[int, dict]:
    """``train.py --config configs/<config>.yaml`` on 2 CPU processes, tiny models; each rank's probe record."""
    root = tmp_path / "run"
    overrides = model_flags(model) + [
        f"--data.source={text_file}", f"--data.num_samples={NUM_SAMPLES}", "--data.seq_len=32", "--data.batch_size=2",
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        "--trainer.gradient_clip_val=0.5", f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=dist_probe.Probe", f"--trainer.callbacks.out_dir={root / 'probe'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / f"{config}.yaml"), *overrides,
         *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(root.rglob("last.ckpt"))  # the config's checkpoint callback saved (a .distcp directory under FSDP2)
    return {r: torch.load(root / "probe" / f"rank{r}.pt", weights_only=True) for r in range(2)}


def _reference(model: dict, text_file) -> tuple[dict, dict]:
    """One process, no strategy: the loss terms on the probe batch and the initial transforms."""
    module = CAQModule(**grouped(**model))
    data = CalibrationData(source=str(text_file), tokenizer=model["teacher"], num_samples=NUM_SAMPLES, seq_len=32)
    data.setup("fit")
    with torch.no_grad():
        terms = module.compute_loss(fixed_batch(data.dataset, PROBE_SAMPLES))
    init = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return {k: float(v) for k, v in terms._asdict().items()}, init


def _check_ranks(records: dict[int, dict], loss: dict, init: dict) -> None:
    # data sharded: each rank trained on its own samples, together all of them
    seen = [set(records[r]["indices"]) for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_SAMPLES))
    # the same loss as one process on the same batch
    for r in range(2):
        for key in ("loss", "kl_teacher", "kl_base", "push"):
            assert records[r]["loss"][key] == pytest.approx(loss[key], abs=1e-5), (r, key)
    # replicated transforms trained, and identical on both ranks
    t0, t1 = records[0]["transforms"], records[1]["transforms"]
    assert t0.keys() == t1.keys() and len(t0) > 4
    assert all(torch.equal(t0[n], t1[n]) for n in t0), [n for n in t0 if not torch.equal(t0[n], t1[n])]
    assert any(not torch.allclose(t0[n], init[n]) for n in t0)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cal_full", "cal_paper"])
def test_ddp_shards_data_and_keeps_transforms_identical(tiny_pairs, text_file, tmp_path, loss):
    paper = {"loss": "cal_paper", "lambda_push": 0.75, "top_k": 16, "push_top_k": 12}  # k: the tiny vocab is 320
    model = _model_args(tiny_pairs["llama"], **(paper if loss == "cal_paper" else {}))
    records = _fit(tmp_path, "llama_w4a4", model, text_file, ["--trainer.strategy=ddp", "--trainer.devices=2"])
    _check_ranks(records, *_reference(model, text_file))
    assert records[0]["world_size"] == 2 and not records[0]["dtensors"]


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["live", "cached"])
def test_fsdp2_shards_the_models_and_matches_the_unsharded_loss(tiny_pairs, text_file, tmp_path, targets):
    pair = tiny_pairs["llama"]
    model = _model_args(pair)
    if targets == "cached":
        model.update(loss="cal_paper", top_k=16, push_top_k=12, recon_weight=0.0, targets="cached")
    args = ["--trainer.devices=2", "--trainer.strategy.init_args.data_parallel_size=2"]
    records = _fit(tmp_path, "llama_w4a4_fsdp2", model, text_file, args)
    if targets == "cached":  # the reference reads the cache both ranks wrote
        model["targets_dir"] = str(tmp_path / "run" / "targets")
        indexes = [json.loads((tmp_path / "run" / "targets" / f"targets-rank{r}.json").read_text()) for r in range(2)]
        samples = [{s for shard in index["shards"] for s in shard["samples"]} for index in indexes]
        assert not samples[0] & samples[1] and samples[0] | samples[1] == set(range(NUM_SAMPLES))
    _check_ranks(records, *_reference(model, text_file))
    for r in range(2):
        sharded = records[r]["dtensors"]
        assert Q_PROJ in sharded and not any(".r1." in n or n.startswith("student.layer_transforms.") for n in sharded)
        local, full = records[r]["local_numel"][Q_PROJ]
        assert local * 2 == full  # each rank holds half of every decoder weight
        assert any(n.startswith("base.") for n in sharded) == (targets == "live")  # cached: no base in memory
