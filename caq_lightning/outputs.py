"""Where a run writes, checked before the first step: a bad target must fail in seconds, not after calibration."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from caq_lightning.errors import CAQError


def check_writable(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Raise unless a directory can be created at ``path`` (or already is one) and a file written in it.

    Probes with a real temporary file in the nearest existing ancestor: permission bits say nothing to root or
    on network file systems. Returns the absolute path; creates nothing that stays.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise CAQError(f"{what} {target} is a file, not a directory: {fix}")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CAQError(f"{what} {target} cannot be created: {existing} is a file; {fix}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".caq-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CAQError(f"{what} {target} is not writable ({err.strerror}): {fix}") from None
    return target


class ExclusiveCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose ``version_N`` directory is claimed atomically (``mkdir`` without ``exist_ok``,
    the next N on a clash), so two runs started into one root never share a version, its metrics.csv and config.

    Only global rank 0 claims, on a local file system; the other ranks never write, and ``trainer.log_dir`` hands
    them rank 0's directory.
    """

    @property
    def version(self) -> int | str:
        if self._version is None and rank_zero_only.rank == 0 and _is_local_file_protocol(self.save_dir):
            self._version = self._claim_version()
        return super().version

    def _claim_version(self) -> int:
        root = Path(self.root_dir)  # <save_dir>/<name>, where Lightning lists the versions
        root.mkdir(parents=True, exist_ok=True)
        version = self._get_next_version()
        while True:
            try:
                (root / f"version_{version}").mkdir()
                return version
            except FileExistsError:  # another run claimed it between the listing and the mkdir
                version += 1


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (exports' and built pairs' manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
