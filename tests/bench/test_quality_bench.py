"""bench/quality.py --quick on the test-size pair: the issue's row schema, export-form models, resume."""

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

ROW_KEYS = {"recipe", "bits", "perplexity", "fp_perplexity", "kl_teacher", "harmful_refusal_rate",
            "benign_refusal_rate", "steps", "seconds"}  # fmt: skip


@pytest.mark.slow
def test_quick_run_writes_the_rows_and_resumes(load_bench, tmp_path):
    quality = load_bench("quality")
    args = ["--quick", "--bits", "W4A4KV4", "--recipes", "rtn_plain", "hadamard_rtn", "hadamard_gptq", "caq_fp_24",
            "--long", "hadamard_gptq", "--out", str(tmp_path)]  # fmt: skip
    out = quality.main(args)
    rows = {r["recipe"]: r for r in out["rows"]}
    assert set(rows) == {"rtn_plain", "hadamard_rtn", "hadamard_gptq", "caq_fp_24"}
    for row in rows.values():
        assert ROW_KEYS <= set(row) and row["bits"] == "W4A4KV4" and row["perplexity"] > 1
    assert rows["caq_fp_24"]["steps"] == quality.QUICK["steps"] and rows["hadamard_gptq"]["steps"] == 0
    assert rows["hadamard_gptq"]["seconds_round"] > rows["hadamard_rtn"]["seconds_round"]
    assert "perplexity_long" in rows["hadamard_gptq"] and "perplexity_long" in out["fp"]
    saved = json.loads((tmp_path / "quality_quick.json").read_text())
    assert [r["recipe"] for r in saved["rows"]] == [r["recipe"] for r in out["rows"]]
    assert "| hadamard_gptq |" in (tmp_path / "quality_quick.md").read_text()
    lines = (tmp_path / "quality_quick_log.jsonl").read_text().splitlines()
    again = quality.main(args)  # everything is logged: nothing runs, nothing is appended
    assert again["rows"] == out["rows"]
    assert (tmp_path / "quality_quick_log.jsonl").read_text().splitlines() == lines
