"""bench/safety.py in its smoke form: the whole protocol (regime search, every method, report files, resume)."""

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]



@pytest.fixture(scope="module")
def safety(load_bench):
    return load_bench("safety")


@pytest.fixture(scope="module")
def quick_run(safety, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety")
    safety.main(["--quick", "--steps", "3", "--max-new-tokens", "8", "--ppl-windows", "4", "--out", str(out)])
    return out


def test_quick_run_writes_report_with_every_method(safety, quick_run):
    report = json.loads((quick_run / "safety_quick.json").read_text())
    runs = report["results"]["settings"]["W4A4"]["runs"]
    assert set(safety.METHODS) | {"fp_aligned", "fp_base", "rtn", "nf4_weight_only"} == set(runs)
    for method in safety.METHODS:
        (row,) = runs[method]
        assert 0.0 <= row["harmful_refusal_rate"] <= 1.0 and math.isfinite(row["perplexity"])
    assert [c["pair"] for c in report["regime"]["candidates"]] == ["full"] * len(safety.BITS)
    assert "vs KL-only" in report["verdict"] and (quick_run / "safety_quick.md").read_text().startswith("# CAQ")


def test_every_configuration_is_logged(safety, quick_run):
    entries = [json.loads(line) for line in (quick_run / "safety_quick_log.jsonl").read_text().splitlines()]
    compare = [e["key"] for e in entries if e["key"]["phase"] == "compare"]
    settings = {c["bits"] for c in compare}
    assert len(compare) == len(settings) * len(safety.METHODS)
    assert {c["config"]["loss"] for c in compare} == {m["loss"] for m in safety.METHODS.values()}


def test_resume_reuses_logged_runs(safety, quick_run):
    log = quick_run / "safety_quick_log.jsonl"
    before = log.read_text()
    safety.main(["--quick", "--steps", "3", "--max-new-tokens", "8", "--ppl-windows", "4", "--out", str(quick_run),
                 "--resume"])  # fmt: skip
    assert log.read_text() == before  # nothing re-measured, nothing appended


def test_bounded_variant_is_not_inert(safety, quick_run):
    """The bounded push must change the result relative to KL-only (a push with no gradient would be KL-only)."""
    runs = json.loads((quick_run / "safety_quick.json").read_text())["results"]["settings"]["W4A4"]["runs"]
    assert runs["caq_bounded"][0]["kl_base"] != runs["kl"][0]["kl_base"]
