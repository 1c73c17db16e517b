"""Where a run writes, checked before the first step: a bad target must fail in seconds, not after calibration."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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

