"""Write an int4 export directory atomically: packed weights, config with its quantization_config, tokenizer and a
manifest of sha256 sums (the layout is described in :mod:`caq_lightning.export`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.errors import CAQError
from caq_lightning.export.packing import SYMMETRIC_OFFSET, Int4Linear
from caq_lightning.fold import QuantRecipe

FORMAT = "caq-int4"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PACKED_SUFFIXES = (".qweight", ".scales", ".zeros")  # kept as stored; every other tensor takes the model dtype


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_state_dict(model: PreTrainedModel, recipe: QuantRecipe) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``: packed decoder Linears plus every other tensor of the folded model."""
    w = recipe.w_spec
    if not w.enabled or w.bits > 4:
        raise CAQError(
            f"int4 export needs weights quantized to at most 4 bits, got w_bits={w.bits}: calibrate with w_bits=4"
        )
    if not recipe.weights:
        raise CAQError("the recipe has no quantized weights: fold the student first (module.fold())")
    packed = {f"{name}.weight" for name in recipe.weights}
    state = {k: v for k, v in model.state_dict().items() if k not in packed}
    for name, (codes, scale, zero) in recipe.weights.items():
        bias = state.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.cpu()
        layer = Int4Linear.from_codes(codes.cpu(), scale.cpu(), zero.cpu(), bias, w.symmetric)
        state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def quantization_config(recipe: QuantRecipe) -> dict[str, Any]:
    """``config.json``'s quantization_config: the recipe plus how the weights are packed."""
    return {
        **recipe.config_dict(),
        "format": FORMAT,
        "packing": {
            "qweight": "uint8 (out, in/2): two 4-bit codes per byte, low nibble = even input column",
            "code_offset": SYMMETRIC_OFFSET if recipe.w_spec.symmetric else 0,
            "scales": "float32 (out, groups)",
            "zeros": None if recipe.w_spec.symmetric else "uint8 (out, groups)",
        },
        "folded": "R1, R2, smoothing scales and norm weights are baked into the weights",
        "modules": sorted(recipe.weights),
    }


def _write_files(
    folder: Path, model: PreTrainedModel, recipe: QuantRecipe, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    save_file(export_state_dict(model, recipe), str(folder / WEIGHTS), metadata={"format": "pt"})
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = quantization_config(recipe)
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_manifest(folder)


def write_manifest(folder: Path, format: str = FORMAT, format_version: int | None = None) -> None:
    """``manifest.json``: the format (and its version, when given) and the sha256 of every other file in ``folder``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    version = {} if format_version is None else {"format_version": format_version}
    manifest = {"format": format, **version, "files": {name: sha256(folder / name) for name in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write_export(
    model: PreTrainedModel,
    recipe: QuantRecipe,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write an int4 export of a folded model atomically: into a temporary sibling directory, then renamed.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then the old export is moved aside, the new one renamed
    in, and the old one deleted. A failure at any point leaves ``out_dir`` as it was and no temporary directory.
    """
    return _atomic_dir(out_dir, overwrite, lambda folder: _write_files(folder, model, recipe, tokenizer))


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
