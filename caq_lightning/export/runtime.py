"""Load an int4 export back: check its manifest, rebuild the model with packed Linears, attach the online runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.errors import CAQError
from caq_lightning.export.formats import MANIFEST, sha256
from caq_lightning.export.writer import FORMAT, FORMAT_VERSION, PACKED_SUFFIXES, WEIGHTS
from caq_lightning.models import get_adapter
from caq_lightning.runtime import QuantRecipe, attach_int_runtime, attach_runtime
from caq_lightning.runtime.packing import Int4Linear


def verify_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file of an export against ``manifest.json``; raise CAQError naming the first bad file."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CAQError(
            f"{folder} has no {MANIFEST}: it is not a caq int4 export (write one with python -m caq_lightning.export)"
        )
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CAQError(f"export {folder} is corrupted: {MANIFEST} is not a valid manifest; re-export it") from None
    check_format_version(manifest.get("format_version"), f"export {folder} ({MANIFEST})")
    for name, digest in files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CAQError(
                f"export {folder} is corrupted: {MANIFEST} lists {name!r}, which is not a file inside the export "
                "directory; re-export it"
            )
        if not (folder / name).is_file():
            raise CAQError(f"export {folder} is incomplete: {name} listed in {MANIFEST} is missing; re-export it")
        if sha256(folder / name) != digest:
            raise CAQError(f"export {folder} is corrupted: sha256 of {name} does not match {MANIFEST}; re-export it")
    listed = {*files, MANIFEST}
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed and p.name[0] != ".")
    if extra:
        raise CAQError(f"export {folder} has files not in {MANIFEST} ({', '.join(extra)}): remove them or re-export")
    return files


def check_format_version(found: object, where: str) -> None:
    """Raise unless ``found`` is the export layout version this code reads (no version: an earlier caq-lightning)."""
    if type(found) is not int or found != FORMAT_VERSION:
        described = "none (written before exports had one)" if found is None else repr(found)
        raise CAQError(
            f"{where} has format_version {described}, but this caq-lightning reads format_version {FORMAT_VERSION}: "
            "re-export it from its checkpoint with python -m caq_lightning.export"
        )


class Loaded(NamedTuple):
    model: PreTrainedModel  # with the online runtime attached; .generate() works
    tokenizer: PreTrainedTokenizerBase | None  # None when the export holds no tokenizer files


def load_quantized(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    runtime: Literal["int", "dequant"] = "int",
    residency: Literal["int8", "packed"] = "int8",
) -> Loaded:
    """(model, tokenizer) from an int4 export, with the online parts (R3/R4 Hadamards, per-token activation and
    KV-cache quantization) attached; ``.generate()`` works.

    ``runtime="int"``: integer matmuls and an integer KV cache (:mod:`caq_lightning.runtime`), weights resident
    as int8 codes or, with ``residency="packed"``, as the file's nibbles unpacked per forward. ``"dequant"``: the
    :class:`Int4Linear` modules dequantize to the activation dtype and the activations are fake-quantized.
    ``dtype`` defaults to the dtype the non-quantized tensors were saved in.
    """
    if runtime not in ("int", "dequant"):
        raise CAQError(f"runtime must be 'int' or 'dequant', got {runtime!r}")
    if residency not in ("int8", "packed"):
        raise CAQError(f"residency must be 'int8' or 'packed', got {residency!r}")
    folder = Path(folder)
    verify_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("format") != FORMAT:
        raise CAQError(f"{folder}/config.json has no caq int4 quantization_config: it is not a caq int4 export")
    check_format_version(qcfg.get("format_version"), f"export {folder} (quantization_config)")
    recipe = QuantRecipe.from_config_dict(qcfg)
    state = load_file(str(folder / WEIGHTS))
    dtype = dtype or state[get_adapter(config).embed_key].dtype
    del config.quantization_config  # ours, not a transformers quantizer: build the plain architecture
    from accelerate import init_empty_weights  # here, so the runtime imports without accelerate

    with init_empty_weights():  # parameters on meta (filled from the file below); RoPE buffers computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in qcfg["modules"]:
        linear = model.get_submodule(name)
        groups = state[f"{name}.scales"].shape[1]
        symmetric, bias = recipe.w_spec.symmetric, linear.bias is not None
        packed = Int4Linear(linear.in_features, linear.out_features, groups, symmetric, bias, dtype, "meta")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, packed)
    state = {k: v if k.endswith(PACKED_SUFFIXES) else v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CAQError(
            f"export {folder} does not fit its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "re-export it"
        )
    model.config.quantization_config = qcfg  # describes the model again, e.g. for evaluation reports
    model.eval().requires_grad_(False)
    if runtime == "int":
        attach_int_runtime(model, recipe, residency)
    else:
        attach_runtime(model, recipe, linear_types=(Int4Linear,))
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model, tokenizer)
