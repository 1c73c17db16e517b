"""The main job end to end: calibrate a builtin pair, evaluate teacher/RTN/CAQ, write results.json and an export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Library notices that say nothing about the run (issue 25); the CLI silences each at its source.
NOISE = ("litlogger", "LeafSpec", "skip_none", "is not supported by the model summary",
         "Trainer already configured with model summary callbacks", "Generating train split")  # fmt: skip


@pytest.mark.slow
def test_tiny_config_writes_results_and_an_int4_export(tmp_path):
    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
         "--model.teacher=builtin:tiny-test", "--model.base=builtin:tiny-test", "--data.source=builtin:tiny-test",
         "--data.num_samples=8", "--data.seq_len=64", "--trainer.max_steps=3", f"--trainer.default_root_dir={root}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        # Deprecation warnings shown as a user who enables them sees them; a fresh datasets cache, so the local
        # calibration file is really generated (a cached one prints no "Generating train split").
        env={**os.environ, "PYTHONWARNINGS": "default", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [n for n in NOISE if n in result.stderr] == [], result.stderr[-3000:]
    # stderr is no terminal: each evaluation phase is one line (3 models x harmful, benign, perplexity)
    assert sum(" batch in " in line for line in result.stderr.splitlines()) == 9, result.stderr[-3000:]
    (results_path,) = root.rglob("results.json")
    results = json.loads(results_path.read_text())
    assert set(results["models"]) == {"teacher_fp", "rtn", "caq"}
    for row in results["models"].values():
        assert 0 <= row["harmful_refusal_rate"] <= 1 and row["n_harmful"] > 0 and row["perplexity"] > 1
    assert results["models"]["teacher_fp"]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert f"results: {results_path}" in result.stdout
    assert "int4 export written to" in result.stdout
    assert (root / "caq" / "version_0" / "export" / "manifest.json").exists() or list(root.rglob("manifest.json"))
