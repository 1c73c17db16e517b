"""The builtin aligned/base pairs (``builtin:<name>``), built on first use and cached.

- :mod:`~caq_lightning.zoo.corpus`: the text and tokenizer of the tiny pairs;
- :mod:`~caq_lightning.zoo.training`: the one training path of every pair (rows, LoRA, the SFT loop);
- :mod:`~caq_lightning.zoo.cache`: the cache directory and the paths of a built pair;
- one module per pair: :mod:`~caq_lightning.zoo.tiny` (``tiny``, ``tiny-realistic``, ``tiny-test``) and
  :mod:`~caq_lightning.zoo.smol` (``smol``, SmolLM2-135M-Instruct).

The stable API is :func:`resolve_builtin`, :func:`builtin_pair` and the data paths below; ``python -m
caq_lightning.zoo`` builds pairs from the command line. The public sets the realistic pairs read come
from :mod:`caq_lightning.data_sources` (hub ids, or $CAQ_DATA_DIR).
"""

from __future__ import annotations

from pathlib import Path

from caq_lightning.errors import CAQError
# Re-exported: the tests and benches read these from caq_lightning.zoo.
from caq_lightning.zoo.cache import TinyPair, cache_dir  # noqa: F401
from caq_lightning.zoo.corpus import ASSETS, SPLIT_SEED, default_corpus, realistic_corpus, train_tokenizer  # noqa: F401
from caq_lightning.zoo.tiny import BUILD_VERSION, BUILTINS, SIZES, Knobs, build_tiny_pair  # noqa: F401
from caq_lightning.zoo.training import add_outliers  # noqa: F401

__all__ = [
    "BUILD_VERSION",
    "BUILTINS",
    "Knobs",
    "TinyPair",
    "add_outliers",
    "build_tiny_pair",
    "builtin_pair",
    "calibration_corpus",
    "eval_prompts",
    "heldout_text",
    "resolve_builtin",
]


def builtin_pair(name: str, **recipe) -> TinyPair:
    """The paths of builtin pair ``name`` in :func:`cache_dir`, building it on first use; ``recipe``: fields of
    smol's :class:`~caq_lightning.zoo.smol.Recipe` (the tiny pairs take none)."""
    if name == "smol":  # the real pretrained pair: caq_lightning.zoo.smol
        from caq_lightning.zoo.smol import build_smol_pair

        return build_smol_pair(cache_dir(), **recipe)
    if name not in BUILTINS:
        raise CAQError(f"unknown builtin model '{name}': use one of {', '.join([*BUILTINS, 'smol'])}")
    if recipe:
        raise CAQError(f"recipe fields ({', '.join(sorted(recipe))}) apply to builtin:smol only, not '{name}'")
    return build_tiny_pair(cache_dir(), **BUILTINS[name])


def resolve_builtin(name: str, role: str = "teacher") -> Path:
    """Model dir of builtin pair ``name`` for ``role`` ("teacher"/"aligned" or "base"), building it on first use."""
    if role not in ("teacher", "aligned", "base"):
        raise CAQError(f"unknown model role '{role}': use 'teacher' (or 'aligned') or 'base'")
    pair = builtin_pair(name)
    return pair.base_dir if role == "base" else pair.aligned_dir


def calibration_corpus(name: str) -> Path:
    """Plain pre-training-style text (.txt) of builtin pair ``name``, for calibration."""
    return builtin_pair(name).calibration_text


def eval_prompts(name: str) -> Path:
    """Held-out jsonl {"prompt", "label": "harmful"|"benign"} of builtin pair ``name``; never trained on."""
    return builtin_pair(name).eval_prompts


def heldout_text(name: str) -> Path:
    """Plain text of builtin pair ``name`` that no model was trained on, for perplexity and KL."""
    return builtin_pair(name).heldout_text

