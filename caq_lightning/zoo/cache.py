"""Where built pairs live: $CAQ_CACHE_DIR/zoo, one directory per pair, built once under a file lock."""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

import torch

from caq_lightning.errors import CAQError
from caq_lightning.outputs import check_writable, sha256

MANIFEST = "manifest.json"
_VERIFIED: dict[Path, tuple] = {}  # entry -> (name, size, mtime) of its files when this process last hashed them
log = logging.getLogger(__name__)


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


def pair_paths(root: Path, base_dir: Path | None = None) -> TinyPair:
    """The paths of the pair built in ``root``; ``base_dir``: a base (with its tokenizer) shared by several pairs."""
    return TinyPair(
        root=root,
        tokenizer_dir=base_dir or root / "tokenizer",
        base_dir=base_dir or root / "base",
        aligned_dir=root / "aligned",
        eval_prompts=root / "eval_prompts.jsonl",
        calibration_text=root / "calibration.txt",
        heldout_text=root / "heldout.txt",
    )


@contextmanager
def deterministic(threads: int = 1):
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
    """out_dir/key built once by ``build(tmp_dir)`` under a file lock, appearing atomically (tmp dir, rename), with
    a manifest of every file's sha256 that each load checks: a flipped byte in the cache is an error, not a model."""
    root = out_dir / key
    if (root / "build_info.json").exists():
        return verify_entry(root)
    check_writable(out_dir, "builtin model cache", "set CAQ_CACHE_DIR to a writable directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir / f"{key}.lock")):
        if (root / "build_info.json").exists():  # another process built it while we waited
            return verify_entry(root)
        for stale in out_dir.glob(f".{key}.tmp-*"):  # left by a killed builder; we hold the lock, so none is live
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir / f".{key}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            info = build(tmp)
            (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
            write_manifest(tmp)
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_manifest(root: Path) -> None:
    """``root/manifest.json``: the sha256 of every other file under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith((MANIFEST, f".{MANIFEST}")))
    digests = {p.relative_to(root).as_posix(): sha256(p) for p in files}
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"files": digests}, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)  # a concurrent reader sees the old state or the whole manifest


def verify_entry(root: Path) -> Path:
    """``root`` after checking its files against its manifest (once per process and manifest); an entry built
    before manifests existed gets one now, with a warning."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        log.warning("builtin model cache %s has no %s (built before checksums): writing it now", root, MANIFEST)
        try:
            write_manifest(root)
        except OSError:  # a read-only cache: use it as it is
            return root
    fix = f"delete {root} and it is rebuilt on next use"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CAQError(f"builtin model cache {root} is corrupted: {MANIFEST} is unreadable; {fix}") from None
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise CAQError(f"builtin model cache {root} is corrupted: {missing[0]} is missing; {fix}")
    stamp = tuple((name, (root / name).stat().st_size, (root / name).stat().st_mtime_ns) for name in sorted(files))
    if _VERIFIED.get(root.resolve()) == stamp:  # hashed already by this process, and no file changed since
        return root
    for name, digest in files.items():
        if sha256(root / name) != digest:
            raise CAQError(
                f"builtin model cache {root} is corrupted: {name} does not match the sha256 in {MANIFEST}; {fix}"
            )
    _VERIFIED[root.resolve()] = stamp
    return root
