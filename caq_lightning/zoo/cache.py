"""Where built pairs live: $CAQ_CACHE_DIR/zoo, one directory per pair, built once under a file lock."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

import torch


@dataclass(frozen=True)
class TinyPair:
    """Paths of a built pair; base_dir and aligned_dir are complete HF model dirs (weights + tokenizer)."""

    root: Path
    tokenizer_dir: Path
    base_dir: Path
    aligned_dir: Path
    eval_prompts: Path  # jsonl {"prompt", "label": "harmful"|"benign"}, never trained on
    calibration_text: Path  # the plain text the pair was pre-trained on
    heldout_text: Path  # plain text of the same kind, never trained on (perplexity)


def cache_dir() -> Path:
    """$CAQ_CACHE_DIR/zoo (default ~/.cache/caq_lightning/zoo)."""
    return Path(os.environ.get("CAQ_CACHE_DIR", "~/.cache/caq_lightning")).expanduser() / "zoo"


def _pair_paths(root: Path) -> TinyPair:
    return TinyPair(
        root=root,
        tokenizer_dir=root / "tokenizer",
        base_dir=root / "base",
        aligned_dir=root / "aligned",
        eval_prompts=root / "eval_prompts.jsonl",
        calibration_text=root / "calibration.txt",
        heldout_text=root / "heldout.txt",
    )


@contextmanager
def _deterministic(threads: int = 1):
    """Deterministic algorithms and a fixed thread count for the build, restored afterwards. A fixed count makes
    the weights independent of the core count; one thread, because threads contend on the tiny models."""
    prev, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.set_num_threads(prev_threads)


def locked_build(out_dir: Path, key: str, build) -> Path:
    """out_dir/key built once by ``build(tmp_dir)`` under a file lock, appearing atomically (tmp dir, rename)."""
    root = out_dir / key
    if (root / "build_info.json").exists():
        return root
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / f"{key}.lock")):
        if (root / "build_info.json").exists():  # another process built it while we waited
            return root
        for stale in out_dir.glob(f".{key}.tmp-*"):  # left by a killed builder; we hold the lock, so none is live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir / f".{key}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            info = build(tmp)
            (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
