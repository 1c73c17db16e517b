"""Export formats as a registry, and what every format shares: one target check, one atomic write, a manifest.

A format is one class (``@register_format``, in its own module imported by :mod:`caq_lightning.export`): ``check``
reads the run's settings before the first step (``Export.setup``), ``write`` writes a folded model atomically
through :func:`atomic_dir` and ends with :func:`write_manifest`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from caq_lightning.errors import CAQError
from caq_lightning.outputs import sha256

if TYPE_CHECKING:  # annotations only: the registry imports neither transformers nor the calibration layer
    from transformers import PreTrainedModel

    from caq_lightning.config import QuantConfig
    from caq_lightning.runtime import QuantRecipe

MANIFEST = "manifest.json"


class ExportFormat:
    """One way to write a folded student; subclasses register with :func:`register_format`."""

    name: ClassVar[str]  # e.g. "caq-int4", "compressed-tensors-w4a16"
    title: ClassVar[str] = ""  # how messages name what it writes ("int4 export"); default "<name> export"

    def describe(self) -> str:
        return self.title or f"{self.name} export"

    def check(self, quant: QuantConfig) -> None:
        """Raise CAQError naming the setting to change if a run with ``quant`` cannot be written in this format."""

    def write(self, model: PreTrainedModel, recipe: QuantRecipe, tokenizer, target: Path, overwrite: bool) -> Path:
        """Write ``model`` (folded, runtime attached) into ``target`` atomically; returns the absolute path."""
        raise NotImplementedError


FORMATS: dict[str, type[ExportFormat]] = {}


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: make ``cls.name`` a format ``get_format``, ``Export(format=...)`` and the CLI know."""
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str) -> ExportFormat:
    """The format called ``name``, or a CAQError listing the known ones."""
    if name not in FORMATS:
        raise CAQError(f"unknown export format '{name}': choose one of {', '.join(sorted(FORMATS))}")
    return FORMATS[name]()


def check_target(
    out_dir: str | os.PathLike, overwrite: bool, what: str = "export target",
    fix: str = "pass --overwrite or choose another --out",
) -> Path:  # fmt: skip
    """The absolute target directory; CAQError if it is a file, or not empty while ``overwrite`` is off."""
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise CAQError(f"{what} {target} is a file: choose a directory for --out")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CAQError(f"{what} {target} is not empty: {fix}")
    return target



def write_manifest(folder: Path, format: str, format_version: int = 1) -> None:
    """``manifest.json``: the format, its layout version and the sha256 of every other file in ``folder``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": format, "format_version": format_version, "files": {n: sha256(folder / n) for n in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def atomic_dir(out_dir: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``out_dir``, then rename it to ``out_dir``.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then the old directory is moved aside, the new one
    renamed in, and the old one deleted. A failure at any point leaves ``out_dir`` as it was and no temporary one.
    """
    target = check_target(out_dir, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-export-{target.name}."
    _remove_stale(target.parent, prefix)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{prefix}{os.getpid()}."))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the export should get the usual permissions
        write(tmp)
        for path in tmp.iterdir():  # safetensors writes 0600; every file of the export gets the same mode
            if path.is_file():
                path.chmod(0o666 & ~umask)
        _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _remove_stale(parent: Path, prefix: str) -> None:
    """Delete the temporary directories ``<prefix><pid>.*`` that a killed export to the same target left behind (the
    pid is gone); a live export's directory stays."""
    for path in parent.glob(f"{glob.escape(prefix)}*"):
        pid, _, suffix = path.name[len(prefix) :].partition(".")  # mkdtemp's suffix has no dot: not "<out>.x"'s
        if pid.isdigit() and suffix and "." not in suffix and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
