"""The main job end to end: calibrate a builtin pair, evaluate teacher/RTN/CAQ, write results.json and an export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_config_writes_results_and_an_int4_export(tmp_path):
    root = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
         "--model.teacher=builtin:tiny-test", "--model.base=builtin:tiny-test", "--data.source=builtin:tiny-test",
         "--data.num_samples=8", "--data.seq_len=64", "--trainer.max_steps=3", f"--trainer.default_root_dir={root}"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (results_path,) = root.rglob("results.json")
    results = json.loads(results_path.read_text())
    assert set(results["models"]) == {"teacher_fp", "rtn", "caq"}
    for row in results["models"].values():
        assert 0 <= row["harmful_refusal_rate"] <= 1 and row["n_harmful"] > 0 and row["perplexity"] > 1
    assert results["models"]["teacher_fp"]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert f"results: {results_path}" in result.stdout
    assert "int4 export written to" in result.stdout
    assert (root / "caq" / "version_0" / "export" / "manifest.json").exists() or list(root.rglob("manifest.json"))
