"""Progress of the project's long waits (pair builds, evaluation, cached targets, GPTQ): a tqdm bar on stderr when
stderr is a terminal; otherwise, or when quiet ($CAQ_QUIET=1, set by the command lines' --quiet), one line per phase
when it ends. Ranks other than 0 stay silent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any, TypeVar

from tqdm import tqdm

QUIET_VAR = "CAQ_QUIET"
T = TypeVar("T")


def set_quiet(quiet: bool = True) -> None:
    """One line per phase instead of bars, in this process and the processes it starts (DDP ranks)."""
    os.environ[QUIET_VAR] = "1" if quiet else ""


def _mode() -> str:
    """"bar", "line" or "off" (a rank other than 0)."""
    if any(os.environ.get(var, "0") not in ("", "0") for var in ("RANK", "LOCAL_RANK")):
        return "off"
    if os.environ.get(QUIET_VAR, "") not in ("", "0") or not sys.stderr.isatty():
        return "line"
    return "bar"


class Progress:
    """One phase: ``update(n, **postfix)`` per unit of work, ``close()`` (or the ``with`` block) at its end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it") -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.postfix: dict[str, Any] = {}
        self.mode = _mode()
        self.start = time.perf_counter()
        self.bar = None
        if self.mode == "bar":  # leave=False: a finished phase leaves the screen to what comes next
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "line":
            done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            seconds = time.perf_counter() - self.start
            print(f"{self.desc}: {done} {self.unit} in {seconds:.1f} s{extra}", file=sys.stderr, flush=True)
        self.mode = "off"  # closed: a second close prints nothing

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.mode = "off" if self.bar is None else self.mode  # a failed phase prints no "done" line
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, reporting one unit per item as one phase."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:  # an iterator, or a DataLoader over an iterable dataset
            total = None
    with Progress(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update()


def phase(bar: Progress | None, desc: str, total: int | None = None, unit: str = "it"):
    """``bar`` when the caller reports this work as part of its own phase, else a new phase (a context manager)."""
    return nullcontext(bar) if bar is not None else Progress(desc, total, unit)
