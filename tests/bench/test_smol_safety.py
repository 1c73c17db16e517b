"""bench/smol_safety.py in its smoke form: regime search, methods over seeds and arms, the issue's JSON schema,
paired statistics recomputable from the runs, and --resume reusing the log."""

import json
import math
import statistics
from pathlib import Path

import pytest

from caq_lightning.data_sources import available

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

RUN_KEYS = {"method", "bits", "seed", "harmful_refusal_rate", "benign_refusal_rate", "harmful_logodds",
            "benign_logodds", "xstest_unsafe_refusal_rate", "harmbench_refusal_rate", "xstest_safe_refusal_rate",
            "perplexity", "kl_teacher", "kl_base", "calibration"}  # fmt: skip
ARGS = ["--quick", "--methods", "kl_top", "cal_paper", "kl"]


@pytest.fixture(scope="module")
def bench(load_bench):
    if not all(map(available, ("xstest", "harmbench", "advbench", "alpaca_seeds", "wikitext2_valid"))):
        pytest.skip("the public sets do not load here: set CAQ_DATA_DIR")
    return load_bench("smol_safety")


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_safety")
    bench.main([*ARGS, "--out", str(out)])
    return out


def test_report_follows_the_schema(bench, quick_run):
    report = json.loads((quick_run / "smol_safety_quick.json").read_text())
    assert {"criterion", "candidates", "chosen"} <= set(report["regime"]) and "bits" in report["regime"]["chosen"]
    assert report["regime"]["criterion"]["max_ppl_ratio"] == 1.3
    for row in report["runs"]:
        assert RUN_KEYS <= set(row)
    methods = {(r["method"], r["calibration"]) for r in report["runs"]}
    assert {("fp_aligned", "none"), ("fp_base", "none"), ("rtn", "none"), ("nf4_weight_only", "none")} <= methods
    assert {(m, "wikitext") for m in ("kl_top", "cal_paper", "kl")} <= methods
    assert {m for m, arm in methods if arm == "chat"} == {"kl_top", "cal_paper"}  # --chat-methods' default
    for row in report["runs"]:
        if row["calibration"] != "none":
            assert 0.0 <= row["harmful_refusal_rate"] <= 1.0 and math.isfinite(row["perplexity"])
    assert (quick_run / "smol_safety_quick.md").read_text().startswith("# CAQ on builtin:")
    plot = quick_run / "smol_safety_quick.png"
    try:
        import matplotlib  # noqa: F401  (the plot is optional: the [bench] extra)
    except ImportError:
        assert not plot.exists()
    else:
        assert plot.stat().st_size > 0


def test_paired_means_recompute_from_runs(quick_run):
    report = json.loads((quick_run / "smol_safety_quick.json").read_text())
    pairs = [p for p in report["paired"] if p["metric"] == "perplexity"]
    assert {(p["method"], p["baseline"], p["calibration"]) for p in pairs} >= {("cal_paper", "kl_top", "wikitext"),
                                                                                ("cal_paper", "kl_top", "chat")}  # fmt: skip
    for p in pairs:
        def value(method):
            return {r["seed"]: r["perplexity"] for r in report["runs"]
                    if r["method"] == method and r["calibration"] == p["calibration"] and r["bits"] == p["bits"]}  # fmt: skip

        a, b = value(p["method"]), value(p["baseline"])
        diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
        assert p["n"] == len(diffs) >= 2
        assert p["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-9)
        assert p["std"] == pytest.approx(statistics.stdev(diffs), abs=1e-9)


def test_resume_reuses_every_logged_run(bench, quick_run):
    log = quick_run / "smol_safety_quick_log.jsonl"
    before = log.read_text().splitlines()
    first = json.loads((quick_run / "smol_safety_quick.json").read_text())
    report = bench.main([*ARGS, "--out", str(quick_run), "--resume"])
    assert log.read_text().splitlines() == before  # nothing was rerun
    assert json.loads(json.dumps(report["runs"])) == first["runs"]


def test_report_only_runs_nothing_new(bench, quick_run, monkeypatch):
    log = quick_run / "smol_safety_quick_log.jsonl"
    before = log.read_text().splitlines()

    def no_model(*args, **kwargs):
        raise AssertionError("--report-only loaded a model")

    monkeypatch.setattr(bench, "load_model", no_model)
    monkeypatch.setattr(bench, "load_tokenizer", no_model)
    report = bench.main([*ARGS, "--out", str(quick_run), "--report-only", "--methods", "kl_top", "cal_paper", "kl",
                         "cal_full"])  # fmt: skip
    assert log.read_text().splitlines() == before  # cal_full was never run, and is not run now
    assert "cal_full" not in {r["method"] for r in report["runs"]} and report["regime"]["complete"]


def test_workers_share_the_log_and_split_the_runs(bench, quick_run, tmp_path):
    with pytest.raises(SystemExit, match="regime search is not in the log"):  # worker 0 runs the regime first
        bench.main([*ARGS, "--out", str(tmp_path), "--workers", "2", "--worker", "1"])
    log = tmp_path / "smol_safety_quick_log.jsonl"
    compare_runs = []
    for worker in ("0", "1"):
        bench.main([*ARGS, "--out", str(tmp_path), "--workers", "2", "--worker", worker])
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        compare_runs.append(sum(e["settings"]["max_per_set"] == 4 for e in entries) - sum(compare_runs))
    merged = bench.main([*ARGS, "--out", str(tmp_path), "--report-only"])
    single = json.loads((quick_run / "smol_safety_quick.json").read_text())
    key = lambda r: (r["method"], r["calibration"], r["seed"])  # noqa: E731
    assert sorted(map(key, merged["runs"])) == sorted(map(key, single["runs"]))
    assert abs(compare_runs[0] - compare_runs[1]) <= 1 and sum(compare_runs) == len(single["runs"])


def test_a_constant_per_seed_difference_has_no_t_and_is_not_beyond_noise(load_bench):
    # rates are multiples of 1/35: the same shift on each seed leaves only float-rounding variance (once t = 6e15)
    paired = load_bench("safety").paired([0.3, 0.7], [0.3 - 3 / 35, 0.7 - 3 / 35])
    assert paired["mean"] == pytest.approx(3 / 35) and math.isnan(paired["t"])
    assert load_bench("safety").paired([0.3, 0.7], [0.2, 0.5])["t"] == pytest.approx(3.0)
