"""Int4 export of a folded CAQ student, and the runtime that reproduces the student from the packed bytes.

    python -m caq_lightning.export --ckpt CKPT --out DIR [--overwrite] [--gptq] [--w4a16-out DIR2]

An export directory holds:

- ``model.safetensors``: embeddings, norms, lm_head and biases in the model dtype, and for each decoder Linear
  ``<name>.qweight`` uint8 (out, in/2) with two 4-bit codes per byte (low nibble = even input column; symmetric
  codes are stored as code + 8), ``<name>.scales`` fp32 (out, G) and, when asymmetric, ``<name>.zeros`` uint8 (out, G).
- ``config.json``: the transformers config with a ``quantization_config`` (bits, groups and symmetry of weights,
  activations and KV cache; the online Hadamards R3/R4; the packing).
- the tokenizer files, and ``manifest.json`` with the sha256 of every other file.

:func:`load_quantized` rebuilds the model with :class:`Int4Linear` modules and by default runs it on integer
matmuls and an integer KV cache (:mod:`caq_lightning.int_runtime`); ``runtime="dequant"`` instead dequantizes per
forward under the same online runtime as :func:`caq_lightning.fold.attach_runtime`.

For symmetric weights the ``qweight`` bytes are exactly compressed-tensors' ``pack-quantized`` ``weight_packed``
(eight nibbles per little-endian int32, code + 8, when in_features is a multiple of 8);
:func:`write_compressed_tensors` writes that W4A16 view.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from caq_lightning.errors import CAQError
from caq_lightning.fold import QuantRecipe, attach_runtime
from caq_lightning.quant.hadamard import hadamard_factors

FORMAT = "caq-int4"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PACKED_SUFFIXES = (".qweight", ".scales", ".zeros")  # kept as stored; every other tensor takes the model dtype
SYMMETRIC_OFFSET = 8  # symmetric codes in [-8, 7] are stored as unsigned nibbles in [0, 15]


# ---- packing ------------------------------------------------------------------------------------------------------


def pack_int4(nibbles: Tensor) -> Tensor:
    """(out, in) integers in [0, 15] -> (out, in/2) uint8, even column in the low nibble, odd column in the high."""
    if nibbles.shape[-1] % 2:
        raise CAQError(f"int4 packing needs an even number of input features, got {nibbles.shape[-1]}")
    if nibbles.min() < 0 or nibbles.max() > 15:
        raise CAQError("int4 packing got codes outside [0, 15]: the weights were not quantized to 4 bits or fewer")
    n = nibbles.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: (out, in/2) uint8 -> (out, in) uint8 in [0, 15]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


class Int4Linear(nn.Module):
    """A Linear stored as packed 4-bit codes with fp32 group scales (and zeros when asymmetric).

    ``forward`` unpacks and dequantizes exactly as :func:`caq_lightning.quant.quantizer.dequantize` does in the
    fake-quant student, so the result matches it bit for bit before the matmul.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.symmetric = in_features, out_features, symmetric
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        zeros = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8, device=device)
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, symmetric: bool) -> Int4Linear:
        """From fold()'s codes (out, G, g), scale (out, G, 1) and zero (out, G, 1)."""
        out_features, groups, group = codes.shape
        dtype = torch.float32 if bias is None else bias.dtype
        layer = cls(groups * group, out_features, groups, symmetric, bias is not None, dtype)
        offset = SYMMETRIC_OFFSET if symmetric else 0
        layer.qweight.copy_(pack_int4(codes.flatten(1).to(torch.int16) + offset))
        layer.scales.copy_(scale.squeeze(-1))
        if not symmetric:
            if zero.min() < 0 or zero.max() > 255 or not torch.equal(zero, zero.round()):
                raise CAQError("asymmetric zero points must be integers in [0, 255] to be stored as uint8")
            layer.zeros.copy_(zero.squeeze(-1).to(torch.uint8))
        if bias is not None:
            layer.bias.data.copy_(bias)
        return layer

    def dequantized_weight(self) -> Tensor:
        """(out, in) fp32: (code - zero) * scale per group."""
        groups = self.scales.shape[1]
        codes = unpack_int4(self.qweight).float().unflatten(-1, (groups, -1))  # (out, G, g)
        zero = SYMMETRIC_OFFSET if self.symmetric else self.zeros.float().unsqueeze(-1)
        return ((codes - zero) * self.scales.unsqueeze(-1)).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.scales.shape[1]}"


# ---- writing ------------------------------------------------------------------------------------------------------


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


def write_manifest(folder: Path, format: str = FORMAT) -> None:
    """``manifest.json``: the sha256 of every other file in ``folder``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"format": format, "files": {name: sha256(folder / name) for name in files}}
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


# ---- loading ------------------------------------------------------------------------------------------------------


def verify_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file of an export against ``manifest.json``; raise CAQError naming the first bad file."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CAQError(
            f"{folder} has no {MANIFEST}: it is not a caq int4 export (write one with python -m caq_lightning.export)"
        )
    try:
        files: dict[str, str] = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CAQError(f"export {folder} is corrupted: {MANIFEST} is not a valid manifest; re-export it") from None
    for name, digest in files.items():
        if not (folder / name).is_file():
            raise CAQError(f"export {folder} is incomplete: {name} listed in {MANIFEST} is missing; re-export it")
        if sha256(folder / name) != digest:
            raise CAQError(f"export {folder} is corrupted: sha256 of {name} does not match {MANIFEST}; re-export it")
    listed = {*files, MANIFEST}
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in listed and p.name[0] != ".")
    if extra:
        raise CAQError(f"export {folder} has files not in {MANIFEST} ({', '.join(extra)}): remove them or re-export")
    return files


def load_quantized(
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    runtime: Literal["int", "dequant"] = "int",
    residency: Literal["int8", "packed"] = "int8",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) from an int4 export, with the online parts (R3/R4 Hadamards, per-token activation and
    KV-cache quantization) attached; ``.generate()`` works.

    ``runtime="int"``: integer matmuls and an integer KV cache (:mod:`caq_lightning.int_runtime`), weights resident
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
    recipe = QuantRecipe.from_config_dict(qcfg)
    state = load_file(str(folder / WEIGHTS))
    dtype = dtype or state["model.embed_tokens.weight"].dtype
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
        from caq_lightning.int_runtime import attach_int_runtime

        attach_int_runtime(model, recipe, residency)
    else:
        attach_runtime(model, recipe, linear_types=(Int4Linear,))
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- compressed-tensors W4A16 view --------------------------------------------------------------------------------


def write_compressed_tensors(
    export_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a W4A16 view of an int4 export in compressed-tensors' ``pack-quantized`` layout, which
    ``AutoModelForCausalLM.from_pretrained`` (with the compressed-tensors package) and vLLM read.

    The view has the export's 4-bit weight codes and scales. What it cannot express is dropped or folded: activation
    and KV-cache quantization are dropped (A16, FP cache), R3 is dropped (exact without KV quantization), and with
    the online R4 each ``down_proj`` is stored dense as W H^T (exact without activation quantization, but not 4-bit):
    transformers does not run compressed-tensors' online transforms. Asymmetric weights load in transformers only
    with ``CompressedTensorsConfig(dequantize=True)``.
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            apply_quantization_config,
        )
    except ImportError:
        raise CAQError(
            "the W4A16 view needs the compressed-tensors package: pip install 'caq-lightning[interop]'"
        ) from None

    source, tokenizer = load_quantized(export_dir, runtime="dequant")
    qcfg = source.config.quantization_config
    recipe = QuantRecipe.from_config_dict(qcfg)
    dense_down = recipe.online_hadamard  # R4 pairs with the online x @ H, which the view has no place for
    state, codes, scales, zeros = {}, {}, {}, {}
    for key, value in source.state_dict().items():
        if not key.endswith(PACKED_SUFFIXES):
            state[key] = value
    dtype = state["model.embed_tokens.weight"].dtype
    for name in qcfg["modules"]:
        layer: Int4Linear = source.get_submodule(name)
        w = layer.dequantized_weight()
        if dense_down and name.endswith("down_proj"):
            w = _apply_hadamard_t(w)
        else:
            codes[name], scales[name], zeros[name] = unpack_int4(layer.qweight), layer.scales, layer.zeros
        state[f"{name}.weight"] = w.to(dtype)

    config = source.config.__class__.from_dict(source.config.to_dict())
    del config.quantization_config
    config._attn_implementation = "sdpa"
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    spec = recipe.w_spec
    args = QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric,
        strategy="group" if spec.group_size else "channel", group_size=spec.group_size or None,
    )  # fmt: skip
    ignore = ["lm_head"] + (["re:.*down_proj$"] if dense_down else [])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    for name in codes:
        module = model.get_submodule(name)
        module.weight_scale = nn.Parameter(scales[name].clone(), requires_grad=False)  # fp32, as exported
        if not spec.symmetric:  # compressed-tensors codes are signed: ours minus 8, zero points too
            module.weight_zero_point.data.copy_(zeros[name].to(torch.int16) - 8)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for name, expected in codes.items():  # compressed-tensors re-derives the codes: they must be ours, bit for bit
        module = model.get_submodule(name)
        got = unpack_from_int32(module.weight_packed, spec.bits, tuple(module.weight_shape.tolist())) + 8
        if not torch.equal(got.to(torch.uint8), expected):
            raise CAQError(f"compressed-tensors re-quantized {name} to other codes than the export: report this")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        compressor.update_config(str(folder))
        config_path = folder / "config.json"
        data = json.loads(config_path.read_text())
        data["caq_w4a16_view"] = {
            "source_quantization": qcfg,
            "dropped": "activation and KV-cache quantization, R3 (exact without KV quantization)",
            "dense": "down_proj stores W H^T (R4 folded; not 4-bit)" if dense_down else None,
        }
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_manifest(folder, format="compressed-tensors-w4a16")

    return _atomic_dir(out_dir, overwrite, write)


def _apply_hadamard_t(x: Tensor) -> Tensor:
    """x @ H^T for the H of :func:`caq_lightning.quant.hadamard.apply_hadamard` (H = kron(A, B): A X B^T)."""
    n = x.shape[-1]
    a, b = hadamard_factors(n)
    xv = x.unflatten(-1, (n // b.shape[0], b.shape[0])) @ b.T.to(x)
    if a is not None:
        xv = a.to(x) @ xv
    return xv.flatten(-2)


# ---- command line -------------------------------------------------------------------------------------------------


def export_checkpoint(ckpt: str, out: str, overwrite: bool = False, gptq: bool = False) -> Path:
    """Fold the CAQ student of a Lightning checkpoint and write its int4 export to ``out``."""
    from caq_lightning.loading import load_tokenizer
    from caq_lightning.module import CAQModule

    if not Path(ckpt).is_file():
        raise CAQError(f"checkpoint '{ckpt}' does not exist: pass the .ckpt file written by training (--ckpt)")
    target = Path(out)
    if target.is_dir() and any(target.iterdir()) and not overwrite:  # fail before the slow model load
        raise CAQError(f"export target {target.absolute()} is not empty: pass --overwrite or choose another --out")
    module = CAQModule.load_from_checkpoint(ckpt, map_location="cpu")
    module.student.set_quantized_layers(None)  # a mid-schedule checkpoint may hold FP blocks; export quantizes all
    calibration = None
    if gptq:
        calibration = _calibration_from_checkpoint(ckpt, module)
    model, recipe = module.fold(gptq=gptq, calibration=calibration)
    tokenizer = load_tokenizer(module.hparams.teacher, "teacher", module.hparams.trust_remote_code)
    return write_export(model, recipe, tokenizer, out, overwrite=overwrite)


def _calibration_from_checkpoint(ckpt: str, module) -> Any:
    from caq_lightning.data import CalibrationData

    hparams = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("datamodule_hyper_parameters")
    if not hparams:
        raise CAQError(
            f"--gptq needs calibration data, but '{ckpt}' holds no datamodule settings: export without --gptq"
        )
    data = CalibrationData(**{**hparams, "tokenizer": hparams.get("tokenizer") or module.hparams.teacher})
    data.setup("fit")
    return data.train_dataloader()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m caq_lightning.export", description="Write the int4 export of a CAQ checkpoint."
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of a CAQ run (.ckpt)")
    p.add_argument("--out", required=True, help="export directory (must be empty or absent)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--gptq", action="store_true", help="GPTQ rounding on the run's calibration data instead of RTN")
    p.add_argument(
        "--w4a16-out", help="also write a compressed-tensors W4A16 view here (transformers/vLLM; needs [interop])"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        path = export_checkpoint(args.ckpt, args.out, overwrite=args.overwrite, gptq=args.gptq)
        print(f"int4 export written to {path}")
        if args.w4a16_out:
            view = write_compressed_tensors(path, args.w4a16_out, overwrite=args.overwrite)
            print(f"compressed-tensors W4A16 view written to {view}")
    except CAQError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
