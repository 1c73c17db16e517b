"""Shared fixtures: offline settings, tiny aligned/base pairs of each family, a calibration text file."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The public sets come from ../shared/data (CAQ_DATA_DIR), as in CI, unless the caller points elsewhere.
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not (os.environ.get("CAQ_DATA_DIR") or os.environ.get("CAQ_SHARED_DATA")) and _SHARED_DATA.is_dir():
    os.environ["CAQ_DATA_DIR"] = str(_SHARED_DATA)

import pytest  # noqa: E402
from tiny import FAMILIES, TEXT, save_tiny_pair  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{family: (aligned_dir, base_dir)} for llama, qwen2 and mistral."""
    root = tmp_path_factory.mktemp("pairs")
    return {family: save_tiny_pair(root, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "calib.txt"
    path.write_text(TEXT * 5)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Builtin pairs built by tests go to a per-session cache, never the user's."""
    if "CAQ_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CAQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "caq_cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many times faster on one thread than on two contended ones (2 shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Fast tests first, `slow` (multi-process, end-to-end) last; `heavy` (minutes-long builds) only on request."""
    run_heavy = os.environ.get("CAQ_HEAVY_TESTS") == "1"
    skip_heavy = pytest.mark.skip(reason="minutes-long default-size build: set CAQ_HEAVY_TESTS=1 to run it")
    for item in items:
        if "heavy" in item.keywords and not run_heavy:
            item.add_marker(skip_heavy)
    items.sort(key=lambda item: ("slow" in item.keywords) or ("heavy" in item.keywords))
