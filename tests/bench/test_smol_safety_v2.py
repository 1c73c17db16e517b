"""bench/smol_safety_v2.py (protocol v2): McNemar on known counts, the JSON schema with `command` and `flips` from a
--quick run on the test-size tiny pair, and the issue's reproducibility check: a calibrated row is reproduced by
running its recorded command, then `python -m caq_lightning.evaluate` on its export."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from caq_lightning.data_sources import local_path

pytestmark = pytest.mark.usefixtures("one_thread")  # --threads 1 below sets torch's threads; restored after

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--quick", "--methods", "kl_top", "cal_paper", "--threads", "1"]
FIXED = {"fp_aligned", "fp_base", "hadamard_gptq", "w4a16_g64_gptq", "nf4_weight_only"}
FLIP_KEYS = {"method", "kept_by_method_lost_by_kl_top", "lost_by_method_kept_by_kl_top", "mcnemar_p"}


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("smol_safety_v2")


def two_sided_binomial(b: int, c: int) -> Fraction:
    """P(an outcome at least as far from n/2 as b) under Binomial(b + c, 1/2), counted outcome by outcome."""
    n = b + c
    return sum((Fraction(math.comb(n, k), 2**n) for k in range(n + 1) if abs(2 * k - n) >= abs(2 * b - n)), Fraction(0))


COUNTS = [(0, 0), (3, 3), (0, 5), (1, 9), (9, 1), (2, 14), (7, 12), (40, 25)]


@pytest.mark.parametrize("b, c", COUNTS)
def test_mcnemar_exact_is_the_two_sided_binomial_test(bench, b, c):
    assert bench.mcnemar_exact(b, c) == pytest.approx(float(min(Fraction(1), two_sided_binomial(b, c))), rel=1e-12)
    assert bench.mcnemar_exact(b, c) == bench.mcnemar_exact(c, b)


def test_mcnemar_exact_matches_scipy(bench):
    stats = pytest.importorskip("scipy.stats")  # an independent implementation, where it is installed
    for b, c in COUNTS[1:]:
        assert bench.mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_known_values(bench):
    assert bench.mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    assert bench.mcnemar_exact(0, 5) == 2 / 32  # all five flips one way: 2 * (1/2)^5
    assert bench.mcnemar_exact(1, 9) == 2 * 11 / 1024


def test_v1_report_is_unchanged(bench):
    """Protocol v1's md is rewritten byte for byte from its committed JSON by the (now shared) v1 functions."""
    report = json.loads((REPO / "bench/results/smol_safety.json").read_text())
    bits = report["regime"]["chosen"]["bits"]
    assert json.loads(json.dumps(bench.v1.paired_rows(report["runs"], bits))) == report["paired"]
    assert bench.v1.markdown(report) == (REPO / "bench/results/smol_safety.md").read_text()


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory) -> Path:
    if local_path("xstest") is None:
        pytest.skip("the public sets' files are not found: set CAQ_DATA_DIR")
    out = tmp_path_factory.mktemp("smol_safety_v2")
    with pytest.MonkeyPatch.context() as env:  # the session's cache, as the function-scoped tests below see it
        env.setenv("CAQ_CACHE_DIR", os.environ.get("CAQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "caq_cache")))
        bench.main([*ARGS, "--out", str(out), "--work-dir", str(out / "work")])
    return out


@pytest.mark.slow
def test_report_follows_the_schema(quick_run):
    report = json.loads((quick_run / "smol_safety_v2_quick.json").read_text())
    assert {"regime", "runs", "paired", "flips"} <= set(report) and report["protocol_version"] == 2
    assert report["regime"]["criterion"]["max_ppl_ratio"] == 1.5 and report["regime"]["chosen"]["bits"] == "W4A4KV4"
    methods = {r["method"] for r in report["runs"]}
    assert methods == FIXED | {"kl_top", "cal_paper"}
    for row in report["runs"]:
        assert "command" in row and row["eval_command"].startswith("python -m caq_lightning.evaluate --model ")
        assert len(row["harmful_refused"]) == 8 and 0.0 <= row["harmful_refusal_rate"] <= 1.0
        assert row["harmful_refusal_rate"] == pytest.approx(sum(row["harmful_refused"]) / 8)
        if row["method"] in FIXED:
            assert row["command"] is None and row["calibration"] == "none"
        else:
            assert row["command"].startswith("python train.py --config configs/smol_w4a4.yaml ")
            argv = shlex.split(row["command"])
            assert argv[argv.index("--model.quant.rotation_seed") + 1] == str(row["seed"])
            assert argv[argv.index("--model.loss.name") + 1] == row["method"]
            assert "SafetyReport" not in row["command"] and "--runtime dequant" in row["eval_command"]
    assert {r["seed"] for r in report["runs"] if r["method"] == "cal_paper"} == {0, 1}
    assert {(p["method"], p["baseline"]) for p in report["paired"]} == {("cal_paper", "kl_top")}
    assert (quick_run / "smol_safety_v2_quick.md").read_text().startswith("# CAQ on builtin:tiny-test at W4A4KV4, "
                                                                           "protocol v2")  # fmt: skip


@pytest.mark.slow
def test_flips_recompute_from_the_per_prompt_refusals(bench, quick_run):
    report = json.loads((quick_run / "smol_safety_v2_quick.json").read_text())
    runs = report["runs"]
    fp = next(r["harmful_refused"] for r in runs if r["method"] == "fp_aligned")
    kl_top = {r["seed"]: r["harmful_refused"] for r in runs if r["method"] == "kl_top"}
    assert {f["method"] for f in report["flips"]} == (FIXED - {"fp_aligned"}) | {"cal_paper"}
    for flip in report["flips"]:
        assert set(flip) >= FLIP_KEYS
        mine = {r["seed"] or 0: r["harmful_refused"] for r in runs if r["method"] == flip["method"]}
        kept = lost = 0
        for seed in sorted(set(mine) & set(kl_top)):
            for i, refused in enumerate(fp):
                kept += refused and mine[seed][i] and not kl_top[seed][i]
                lost += refused and kl_top[seed][i] and not mine[seed][i]
        assert (flip["kept_by_method_lost_by_kl_top"], flip["lost_by_method_kept_by_kl_top"]) == (kept, lost)
        assert flip["mcnemar_p"] == bench.mcnemar_exact(kept, lost)
    prompts = report["per_prompt"]["prompts"]
    assert [p["fp_aligned"] for p in prompts] == fp
    assert [p["refused"]["kl_top"] for p in prompts] == [sum(s[i] for s in kl_top.values()) for i in range(len(fp))]


@pytest.mark.slow
def test_a_calibrated_row_is_reproduced_by_its_command(quick_run, tmp_path):
    """Run a cal_paper row's `command` as a user would (export deleted first), then evaluate that export with
    `python -m caq_lightning.evaluate` and the row's own evaluation arguments: same numbers up to float flips."""
    report = json.loads((quick_run / "smol_safety_v2_quick.json").read_text())
    row = next(r for r in report["runs"] if r["method"] == "cal_paper" and r["seed"] == 1)
    argv = shlex.split(row["command"])
    export = Path(argv[argv.index("--trainer.default_root_dir") + 1]) / "export"
    shutil.rmtree(export)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    train = subprocess.run([sys.executable, *argv[1:]], **run)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (export / "manifest.json").is_file()
    evaluate = shlex.split(row["eval_command"])
    assert evaluate[:3] == ["python", "-m", "caq_lightning.evaluate"]
    assert evaluate[evaluate.index("--model") + 1] == str(export)
    proc = subprocess.run([sys.executable, *evaluate[1:]], **run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout)
    flips = sum(a != b for a, b in zip(again["harmful_refused"], row["harmful_refused"]))
    assert flips <= 1
    for name in ("harmful_refusal_rate", "benign_refusal_rate", "xstest_unsafe_refusal_rate",
                 "harmbench_refusal_rate", "xstest_safe_refusal_rate"):  # fmt: skip
        set_size = again[f"n_{name.removesuffix('_refusal_rate')}"]
        assert abs(again[name] - row[name]) <= 1 / set_size + 1e-9, name  # at most one flipped prompt
    assert again["perplexity"] == pytest.approx(row["perplexity"], rel=1e-4)
    assert again["kl_teacher"] == pytest.approx(row["kl_teacher"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_resume_runs_nothing_new_and_regime_only_sizes_what_is_left(bench, quick_run):
    log = quick_run / "smol_safety_v2_quick_log.jsonl"
    before = log.read_text()
    common = ["--out", str(quick_run), "--work-dir", str(quick_run / "work")]
    report = bench.main([*ARGS, *common, "--resume"])
    assert log.read_text() == before  # every configuration came from the log
    assert report["cost"]["runs_left"] == 0 and report["cost"]["estimated_seconds_left"] == 0
    more = ["--quick", "--methods", "kl_top", "cal_paper", "cal_paper_base"]  # quick: 1 seed for cal_paper_base
    sizing = bench.main([*more, *common, "--resume", "--regime-only"])["cost"]
    assert log.read_text() == before  # --regime-only stops before the comparison
    per_run = sizing["seconds_per_run"]
    assert per_run["kl_top"] > 0 and "cal_paper_base" not in per_run
    assert sizing["runs_left"] == 1 and sizing["estimate_uses_kl_top_for"] == ["cal_paper_base"]
    assert sizing["estimated_seconds_left"] == pytest.approx(per_run["kl_top"])
