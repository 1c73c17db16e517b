"""The public datasets the project reads, each named by its hub id and loaded with ``datasets.load_dataset`` (cached
in the HF cache as usual), or from a local folder when ``$CAQ_DATA_DIR`` (alias ``$CAQ_SHARED_DATA``) is set.

Every set is read through :func:`load_public` and comes back in one shape whatever its source (see ``SETS``), so
the zoo and the evaluation never see where it came from. The folder layout and the hub ids are in docs/data.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caq_lightning.env import fail_fast_hub, is_offline
from caq_lightning.errors import CAQError

DATA_DIR_VARS = ("CAQ_DATA_DIR", "CAQ_SHARED_DATA")  # the second is the old name, kept as an alias
LAYOUT = "layout: docs/data.md"


@dataclass(frozen=True)
class PublicSet:
    """Where one public set lives on the hub and in a local folder, and how each source is read into one shape."""

    title: str
    hub_id: str
    config: str | None
    split: str
    columns: tuple[str, ...]  # the hub columns read (documentation and the column check)
    local_file: str  # relative to $CAQ_DATA_DIR
    read_local: Callable[[Path], Any]
    from_hub: Callable[[Any], Any]  # datasets.Dataset -> the same shape as read_local
    where: tuple[str, str] | None = None  # (column, value): only the hub rows with this value


# ---------------------------------------------------------------------------------------------- readers


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _hub_text(rows) -> str:
    return "".join(rows["text"])  # one row per line, each with its own newline


def _read_advbench(path: Path) -> list[dict]:
    return [{"goal": r["goal"], "target": r["target"]} for r in json.loads(path.read_text(encoding="utf-8"))]


def _hub_advbench(rows) -> list[dict]:
    return [{"goal": p, "target": t} for p, t in zip(rows["prompt"], rows["target"])]


def _read_xstest(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{"prompt": r["prompt"], "label": r["label"]} for r in csv.DictReader(f)]


def _hub_xstest(rows) -> list[dict]:
    return [{"prompt": p, "label": label} for p, label in zip(rows["prompt"], rows["label"])]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hub_prompts(rows) -> list[str]:
    return [p.strip() for p in rows["prompt"] if p.strip()]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _hub_safetybench(rows) -> dict[str, list[dict]]:
    """{category: [question, ...]}: the dev config is one row with a column per category (a list of questions)."""
    if "question" in rows.column_names:  # a flat layout, one question a row
        out: dict[str, list[dict]] = {}
        for row in rows:
            out.setdefault(row["category"], []).append(row)
        return out
    return {category: rows[0][category] for category in rows.column_names}


def _read_jsonl_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hub_questions(rows) -> list[str]:
    return list(rows["question"])


def _read_seed_tasks(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _hub_seed_tasks(rows)


def _hub_seed_tasks(rows) -> list[dict]:
    return [{"instruction": r["instruction"], "instances": r["instances"]} for r in rows]


# ---------------------------------------------------------------------------------------------- registry

# WikiText-2 is the word-level config (wikitext-2-v1): the same text as the local copy, so perplexities match.
_WIKITEXT = ("WikiText-2", "Salesforce/wikitext", "wikitext-2-v1")
_DNA = ("Do-Not-Answer", "LibrAI/do-not-answer", None, "train", ("question", "risk_area"))
SETS: dict[str, PublicSet] = {
    "wikitext2_valid": PublicSet(*_WIKITEXT, "validation", ("text",), "wikitext-2/valid.txt", _read_text, _hub_text),
    "wikitext2_test": PublicSet(*_WIKITEXT, "test", ("text",), "wikitext-2/test.txt", _read_text, _hub_text),
    "advbench": PublicSet(
        "AdvBench", "walledai/AdvBench", None, "train", ("prompt", "target"), "advbench_harmful_behaviors.json",
        _read_advbench, _hub_advbench,
    ),  # fmt: skip
    "xstest": PublicSet(
        "XSTest", "walledai/XSTest", None, "test", ("prompt", "label"), "xstest_prompts.csv", _read_xstest, _hub_xstest
    ),
    "harmbench": PublicSet(
        "HarmBench", "walledai/HarmBench", "standard", "train", ("prompt",), "harmbench_standard_prompts.txt",
        _read_lines, _hub_prompts,
    ),  # fmt: skip
    "safetybench": PublicSet(
        "SafetyBench", "thu-coai/SafetyBench", "dev", "en", ("<one column per category>",), "safetybench_dev_en.json",
        _read_json, _hub_safetybench,
    ),  # fmt: skip
    "alpaca_seeds": PublicSet(
        "Alpaca seed tasks", "HuggingFaceH4/self-instruct-seed", None, "train", ("instruction", "instances"),
        "alpaca_seed_tasks.jsonl", _read_seed_tasks, _hub_seed_tasks,
    ),  # fmt: skip
    "donotanswer_malicious_uses": PublicSet(
        *_DNA, "donotanswer/malicious_uses.jsonl", _read_jsonl_prompts, _hub_questions, ("risk_area", "Malicious Uses")
    ),
    "donotanswer_information_hazard": PublicSet(
        *_DNA, "donotanswer/information_hazard.jsonl", _read_jsonl_prompts, _hub_questions,
        ("risk_area", "Information Hazards"),
    ),  # fmt: skip
    "donotanswer_discrimination": PublicSet(
        *_DNA, "donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl", _read_jsonl_prompts,
        _hub_questions, ("risk_area", "Discrimination, Exclusion, Toxicity, Hateful, Offensive"),
    ),  # fmt: skip
}


# ---------------------------------------------------------------------------------------------- loading


def data_dir() -> Path | None:
    """The local folder of public sets ($CAQ_DATA_DIR, else $CAQ_SHARED_DATA), or None: load from the hub."""
    for var in DATA_DIR_VARS:
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    return None


def _data_dir_var() -> str:
    return next(var for var in DATA_DIR_VARS if os.environ.get(var))


def _spec(name: str) -> PublicSet:
    if name not in SETS:
        raise CAQError(f"unknown public dataset '{name}': use one of {', '.join(SETS)}")
    return SETS[name]


def local_path(name: str) -> Path | None:
    """The local file of set ``name`` when a data folder is set (whether or not the file exists), else None."""
    folder = data_dir()
    return None if folder is None else folder / _spec(name).local_file


def _hub_name(spec: PublicSet) -> str:
    return f"{spec.hub_id} ({f'config {spec.config}, ' if spec.config else ''}split {spec.split})"


def _unreachable(spec: PublicSet, why: str) -> CAQError:
    return CAQError(
        f"{spec.title} is the hub dataset {_hub_name(spec)} and {why}: connect once so datasets caches it, "
        f"or set CAQ_DATA_DIR to a folder with {spec.local_file} ({LAYOUT})"
    )


def _hub_rows(spec: PublicSet):
    import datasets  # imported here: reading a local file needs no datasets import

    try:
        with fail_fast_hub():
            rows = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split)
    except ConnectionError:
        raise _unreachable(spec, "the hub is offline" if is_offline() else "the hub cannot be reached") from None
    except (OSError, ValueError) as err:  # e.g. DatasetNotFoundError, a renamed split or config
        raise _unreachable(spec, f"loading it failed ({str(err).splitlines()[0]})") from None
    needed = {c for c in spec.columns if not c.startswith("<")} | ({spec.where[0]} if spec.where else set())
    if missing := sorted(needed - set(rows.column_names)):
        raise CAQError(
            f"hub dataset {_hub_name(spec)} has no column {', '.join(missing)} "
            f"(it has {', '.join(rows.column_names)}): set CAQ_DATA_DIR to a folder with {spec.local_file} ({LAYOUT})"
        )
    if spec.where:  # select, not filter: filter would print a progress bar for a moment's work
        column, value = spec.where
        rows = rows.select([i for i, v in enumerate(rows[column]) if v == value])
    return rows


def load_public(name: str) -> Any:
    """Public set ``name`` of ``SETS``: from $CAQ_DATA_DIR's file when the variable is set, else from the hub."""
    spec = _spec(name)
    path = local_path(name)
    if path is None:
        return spec.from_hub(_hub_rows(spec))
    if not path.is_file():
        raise CAQError(
            f"{spec.title} file {path} not found (${_data_dir_var()}={data_dir()}): add it there ({LAYOUT}), "
            f"or unset {_data_dir_var()} to load {_hub_name(spec)} from the hub"
        )
    return spec.read_local(path)


def fingerprint(name: str) -> str:
    """sha256 of set ``name``: of its local file's bytes, or of its hub content (for cache keys)."""
    path = local_path(name)
    if path is not None and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(load_public(name), sort_keys=True).encode()).hexdigest()


def available(name: str) -> bool:
    """Whether set ``name`` loads here (its local file exists, or the hub or the HF cache serves it)."""
    try:
        load_public(name)
    except CAQError:
        return False
    return True
