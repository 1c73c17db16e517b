"""What the project reads from its environment: dtypes by name, offline mode and whether the hub answers (the
public-data folder, $CAQ_DATA_DIR, is read by :mod:`caq_lightning.data_sources`)."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal
from urllib.parse import urlparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["float32", "bfloat16", "float16"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_offline() -> bool:
    """The hub is off: any of HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE is set."""
    return any(_env_true(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.cache
def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to the hub's endpoint ($HF_ENDPOINT) opens within ``timeout_s`` (probed once)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except (OSError, ValueError):
        return False
    return True


@contextmanager
def fail_fast_hub() -> Iterator[None]:
    """Around ``datasets.load_dataset``: a ConnectionError at once when an offline flag is set but datasets missed it
    (it reads them at import), and the HF cache alone when the hub cannot be reached. Either way datasets would
    otherwise retry the hub for ~25 s before failing."""
    import datasets
    from huggingface_hub import constants

    if is_offline() and not datasets.config.HF_HUB_OFFLINE:
        raise ConnectionError("the hub is offline")
    if is_offline() or hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
