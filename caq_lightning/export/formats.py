"""What every export format shares: an atomic target directory and a manifest of sha256 sums."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from caq_lightning.errors import CAQError

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, format: str) -> None:
    """``manifest.json``: the sha256 of every other file in ``folder``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": format, "files": {name: sha256(folder / name) for name in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``out_dir``, then rename it to ``out_dir``."""
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise CAQError(f"export target {target} is a file: choose a directory for --out")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CAQError(f"export target {target} is not empty: pass --overwrite or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-export-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the export should get the usual permissions
        write(tmp)
        _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted only afterwards."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".old-export-"))
    os.replace(target, old)  # ``old`` is an empty directory, so this rename replaces it
    try:
        os.rename(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
