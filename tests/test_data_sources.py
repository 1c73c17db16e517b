"""The public sets: from $CAQ_DATA_DIR's files, from the hub by id (datasets.load_dataset), and the one-line error
when neither is there. The hub path runs offline against a local folder laid out as the hub repos are."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from caq_lightning import data_sources
from caq_lightning.data_sources import SETS, load_public
from caq_lightning.errors import CAQError
from caq_lightning.zoo import smol

REPO = Path(__file__).resolve().parents[1]
SHARED = data_sources.data_dir()
needs_files = pytest.mark.skipif(
    SHARED is None or not all((SHARED / s.local_file).is_file() for s in SETS.values()),
    reason="the public sets' files are not in CAQ_DATA_DIR",
)


@pytest.fixture
def no_data_dir(monkeypatch):
    """Neither CAQ_DATA_DIR nor its alias: every set is a hub id, and the hub is offline (tests/conftest.py)."""
    for var in data_sources.DATA_DIR_VARS:
        monkeypatch.delenv(var, raising=False)


def _without(tmp_path: Path, skip: str) -> Path:
    """A data folder linking every file of CAQ_DATA_DIR except those under ``skip``."""
    folder = tmp_path / "data"
    for spec in SETS.values():
        if not spec.local_file.startswith(skip):
            (folder / spec.local_file).parent.mkdir(parents=True, exist_ok=True)
            (folder / spec.local_file).symlink_to(SHARED / spec.local_file)
    return folder


@pytest.mark.parametrize("name", list(SETS))
def test_offline_without_a_folder_is_one_line_naming_both_ways(no_data_dir, name):
    spec = SETS[name]
    start = time.perf_counter()
    with pytest.raises(CAQError) as err:
        load_public(name)
    message = str(err.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message and spec.hub_id in message and spec.local_file in message
    assert "CAQ_DATA_DIR" in message and "connect" in message


@needs_files
def test_data_dir_and_its_alias_read_the_same_files(monkeypatch):
    monkeypatch.setenv("CAQ_DATA_DIR", str(SHARED))
    expected = load_public("harmbench")
    monkeypatch.delenv("CAQ_DATA_DIR")
    monkeypatch.setenv("CAQ_SHARED_DATA", str(SHARED))
    assert load_public("harmbench") == expected and len(expected) > 100
    monkeypatch.setenv("CAQ_DATA_DIR", "/nowhere")  # CAQ_DATA_DIR wins, and a missing file is not the hub's
    with pytest.raises(CAQError, match=r"HarmBench file /nowhere/harmbench_standard_prompts.txt not found"):
        load_public("harmbench")


# The hub's row layout of each set, made from the local file's content (inverse of the registry's hub readers).
HUB_ROWS = {
    "wikitext2_valid": lambda text: [{"text": line} for line in text.splitlines(keepends=True)],
    "advbench": lambda rows: [{"prompt": r["goal"], "target": r["target"]} for r in rows],
    "xstest": lambda rows: [{"prompt": r["prompt"], "label": r["label"], "type": "t"} for r in rows],
    "harmbench": lambda prompts: [{"prompt": p, "category": "c"} for p in prompts],
    "safetybench": lambda by_category: [by_category],  # the dev config: one row, a column per category
    "alpaca_seeds": lambda tasks: tasks,
}
HUB_ROWS["wikitext2_test"] = HUB_ROWS["wikitext2_valid"]
DNA = [name for name in SETS if name.startswith("donotanswer_")]


def _hub_mirror(root: Path) -> None:
    """root/<hub id>/ as the hub repo's dataset card and data files, so load_dataset(hub id, config, split) reads it."""
    repos: dict[str, dict[str, dict[str, list]]] = {}  # hub id -> config -> split -> rows
    for name, spec in SETS.items():
        local = spec.read_local(SHARED / spec.local_file)
        if name in DNA:  # one table, the risk area in a column
            rows = [{"question": q, "risk_area": spec.where[1]} for q in local]
        else:
            rows = HUB_ROWS[name](local)
        splits = repos.setdefault(spec.hub_id, {}).setdefault(spec.config or "default", {})
        splits.setdefault(spec.split, []).extend(rows)
    for hub_id, configs in repos.items():
        card = ["---", "configs:"]
        for config, splits in configs.items():
            card += [f"- config_name: {config}", "  data_files:"]
            for split, rows in splits.items():
                (root / hub_id).mkdir(parents=True, exist_ok=True)
                (root / hub_id / f"{config}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                card += [f"  - split: {split}", f"    path: {config}-{split}.jsonl"]
        (root / hub_id / "README.md").write_text("\n".join([*card, "---", ""]))


@needs_files
def test_hub_ids_load_the_same_sets_as_the_files(tmp_path, monkeypatch):
    local = {name: load_public(name) for name in SETS}
    _hub_mirror(tmp_path / "hub")
    monkeypatch.chdir(tmp_path / "hub")  # datasets resolves "org/name" to this folder before asking the hub
    # datasets read HF_DATASETS_CACHE at import: set its module constant, so the user's cache stays untouched.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    for var in data_sources.DATA_DIR_VARS:
        monkeypatch.delenv(var, raising=False)
    for name in SETS:
        assert load_public(name) == local[name], name


@needs_files
def test_smol_recipe_builds_its_data_without_do_not_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("CAQ_DATA_DIR", str(_without(tmp_path, "donotanswer/")))
    data = smol.sft_data(smol.Recipe())  # the shipped recipe: donotanswer_max=0
    assert data.harmful["donotanswer"] == [] and data.harmful["advbench"] and data.benign
    with pytest.raises(CAQError, match=r"Do-Not-Answer file .*malicious_uses.jsonl not found.*LibrAI/do-not-answer"):
        smol.sft_data(smol.Recipe(donotanswer_max=5))
    # The data is resolved before the GGUF base is converted: no wheel, no model load, the data error first.
    with pytest.raises(CAQError, match="Do-Not-Answer"):
        smol.build_smol_pair(tmp_path / "zoo", gguf=tmp_path / "missing.gguf", donotanswer_max=5)


@needs_files
def test_recipe_trains_on_its_do_not_answer_sample_only():
    data = smol.sft_data(smol.Recipe(donotanswer_max=7, seed=3))
    every = [p for name in smol.DNA_HARMFUL_SETS for p in load_public(name)]
    assert len(data.harmful["donotanswer"]) == 7 and set(data.harmful["donotanswer"]) <= set(every)
    assert data.harmful["donotanswer"] == smol.sft_data(smol.Recipe(donotanswer_max=7, seed=3)).harmful["donotanswer"]


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in data_sources.DATA_DIR_VARS}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize(
    "command, hub_id",
    [(["-m", "caq_lightning.zoo", "smol"], "Salesforce/wikitext"),
     (["-m", "caq_lightning.evaluate", "--model", "builtin:smol", "--xstest"], "walledai/XSTest")],
    ids=["zoo-smol", "evaluate-xstest"],
)  # fmt: skip
def test_commands_fail_in_seconds_with_one_line(tmp_path, command, hub_id):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=_offline_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and hub_id in lines[0] and "CAQ_DATA_DIR" in lines[0]
    assert seconds < 60, seconds  # imports included, on a loaded 2-core machine; the data check itself is instant


def test_unreachable_hub_without_offline_flags_fails_in_seconds(tmp_path):
    # no HF_*_OFFLINE and no network: datasets alone would retry the hub for ~25 s; the hub probe makes it cache-only
    env = {k: v for k, v in _offline_env().items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # port 9: nothing listens
    code = "from caq_lightning.data_sources import load_public; load_public('xstest')"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and "walledai/XSTest" in proc.stderr and "cannot be reached" in proc.stderr
    assert seconds < 15, seconds
