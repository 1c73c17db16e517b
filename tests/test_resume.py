"""Kill -9 a real CLI run at a random step and resume it: the result must be bit-identical to an uninterrupted run."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_pair

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 10  # 4 batches per epoch: the run crosses epoch boundaries, so kills land mid-epoch and at its end
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs share the CPU; same threads in every run, same sums


def _config(path: Path, pair, text_file) -> Path:
    path.write_text(f"""
seed_everything: 0
model:
  teacher: {pair[0]}
  base: {pair[1]}
  dtype: float32
  rtn_kl_every: 0
data:
  source: {text_file}
  num_samples: 8
  seq_len: 32
  batch_size: 2
trainer:
  max_steps: {MAX_STEPS}
  accelerator: cpu
  devices: 1
  precision: 32-true
  deterministic: true
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        every_n_train_steps: 2
    - class_path: callbacks.divergence_guard.DivergenceGuard
      init_args:
        max_push: 5.0
""")
    return path


def _cmd(config: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), f"--trainer.default_root_dir={root}", *extra]


def _metrics(root: Path) -> dict[int, dict]:
    """step -> logged row, over every run (version_N) under root; a later run's row wins."""
    rows = {}
    for path in sorted(root.rglob("metrics.csv")):
        # A row being written while the run is alive may be partial: keep complete rows only.
        rows.update({int(r["step"]): r for r in csv.DictReader(path.open()) if (r.get("step") or "").isdigit()})
    return rows


def _kill_at_random_step(cmd: list[str], root: Path, rng: random.Random) -> int:
    """Start the run, SIGKILL it once metrics.csv shows a random step past the first checkpoint; return that step."""
    target = rng.randint(2, MAX_STEPS - 3)
    log = root.parent / f"{root.name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV)
    try:
        deadline = time.monotonic() + 300
        while max(_metrics(root), default=-1) < target:
            assert proc.poll() is None, f"run ended before the kill: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return target


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(text_file, tmp_path):
    seed = int(os.environ.get("CAQ_KILL_SEED", random.randrange(1 << 30)))
    config = _config(tmp_path / "run.yaml", save_tiny_pair(tmp_path, "llama", num_hidden_layers=1), text_file)
    full, killed = tmp_path / "full", tmp_path / "killed"
    log = tmp_path / "full.log"  # the uninterrupted run goes alongside the one that gets killed
    uninterrupted = subprocess.Popen(_cmd(config, full), stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV)
    step = _kill_at_random_step(_cmd(config, killed), killed, random.Random(seed))
    assert uninterrupted.wait(timeout=300) == 0, log.read_text()[-3000:]

    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= saved < MAX_STEPS, f"seed {seed}: killed after step {step}, last checkpoint at {saved}"
    resume = _cmd(config, killed, "--ckpt_path", "last")
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr

    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"seed {seed}: transforms differ after resuming from step {saved}: {differ[:3]}"
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(a["optimizer_states"][0]["state"].values(),
                                                               b["optimizer_states"][0]["state"].values())]  # fmt: skip
    assert moments and all(torch.equal(x, y) for x, y in moments)
    # Every step the resumed run logged, and the final metrics, equal the uninterrupted run's to the last digit.
    rows_full, rows_resumed = _metrics(full), _metrics(killed)
    assert max(rows_full) == max(rows_resumed) == MAX_STEPS - 1
    assert all(rows_resumed[s] == rows_full[s] for s in range(saved, MAX_STEPS)), f"seed {seed}"
