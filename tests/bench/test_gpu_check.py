"""bench/gpu_check.py's CPU fallback at the test shape: every check runs and lands in one JSON."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["--device", "cpu", "--shape", "test", "--repeats", "1"]


def test_every_check_reports_speed_and_memory(load_bench, tmp_path):
    out = tmp_path / "gpu_check.json"
    assert load_bench("gpu_check").main([*ARGS, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    step, runtime = report["checks"]["caq_step_check"], report["checks"]["int_runtime_check"]
    for phase in ("live", "cached"):
        assert step[phase]["tokens_per_s"] > 0 and step[phase]["peak_mib"] > 0, phase
        assert step[phase]["tokens"] == 64 and step[phase]["peak_kind"] == "process_peak_rss"
    assert step["live"]["loss"] > 0 and step["cached"]["loss"] > 0
    for name in ("int8_prefill_over_bf16", "int8_decode_b1_over_bf16", "int8_decode_b8_over_bf16"):
        assert runtime[name] > 0, name
    assert 0.45 < runtime["weight_bytes_over_fp16"] < 0.6  # int8 codes plus fp32 scales and row sums


def test_a_failing_check_is_recorded_and_the_others_still_run(load_bench, tmp_path, monkeypatch):
    bench = load_bench("gpu_check")

    def broken_check(args):
        raise RuntimeError("no such backend")

    monkeypatch.setattr(bench, "CHECKS", [broken_check, bench.int_runtime_check])
    out = tmp_path / "gpu_check.json"
    assert bench.main([*ARGS, "--out", str(out)]) == 1
    checks = json.loads(out.read_text())["checks"]
    assert checks["broken_check"]["error"] == "RuntimeError: no such backend"
    assert checks["int_runtime_check"]["int8_prefill_over_bf16"] > 0
