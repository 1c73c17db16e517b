"""python -m caq_lightning.export --ckpt CKPT --out DIR [--overwrite] [--rounding gptq|rtn] [--w4a16-out DIR2]
                                  [--format NAME]"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from caq_lightning.config import QuantConfig, as_group
from caq_lightning.errors import CAQError, fail
from caq_lightning.export.compressed_tensors import write_compressed_tensors
from caq_lightning.export.formats import get_format
from caq_lightning.export.writer import write_export


def export_checkpoint(
    ckpt: str, out: str, overwrite: bool = False, rounding: str | None = None, format: str | None = None
) -> Path:
    """Fold the CAQ student of a Lightning checkpoint and write its int4 export (or the named ``format``) to ``out``.

    ``rounding`` (gptq|rtn) defaults to the run's ``quant.w_rounding``; GPTQ rounds on the run's calibration data."""
    from caq_lightning.checkpoint import check_settings_layout
    from caq_lightning.loading import load_tokenizer
    from caq_lightning.module import CAQModule

    if not Path(ckpt).is_file():
        raise CAQError(f"checkpoint '{ckpt}' does not exist: pass the .ckpt file written by training (--ckpt)")
    target = Path(out)
    if target.is_dir() and any(target.iterdir()) and not overwrite:  # fail before the slow model load
        raise CAQError(f"export target {target.absolute()} is not empty: pass --overwrite or choose another --out")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    check_settings_layout(checkpoint, f"'{ckpt}'")
    fmt = None if format is None else get_format(format)
    if fmt is not None:  # before the slow model load
        fmt.check(as_group(QuantConfig, checkpoint.get("hyper_parameters", {}).get("quant")))
    module = CAQModule.load_from_checkpoint(ckpt, map_location="cpu")
    module.student.set_quantized_layers(None)  # a mid-schedule checkpoint may hold FP blocks; export quantizes all
    rounding = rounding or module.quant_config.w_rounding
    calibration = _calibration_from_checkpoint(ckpt, module) if rounding == "gptq" else None
    model, recipe = module.fold(rounding=rounding, calibration=calibration)
    tokenizer = load_tokenizer(module.hparams.teacher, "teacher", module.hparams.trust_remote_code)
    if fmt is not None:
        return fmt.write(model, recipe, tokenizer, target, overwrite)
    return write_export(model, recipe, tokenizer, out, overwrite=overwrite)


def _calibration_from_checkpoint(ckpt: str, module) -> Any:
    from caq_lightning.data import CalibrationData

    hparams = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("datamodule_hyper_parameters")
    if not hparams:
        raise CAQError(
            f"GPTQ rounding needs calibration data, but '{ckpt}' holds no datamodule settings: pass --rounding rtn"
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
    p.add_argument("--rounding", choices=("gptq", "rtn"), help="weight rounding (default: the run's quant.w_rounding)")
    p.add_argument("--gptq", action="store_const", const="gptq", dest="rounding", help="same as --rounding gptq")
    p.add_argument(
        "--w4a16-out", help="also write a compressed-tensors W4A16 view here (transformers/vLLM; needs [interop])"
    )
    p.add_argument(
        "--format", help="write this format instead of the int4 one: compressed-tensors-w4a4 or -w4a8 (docs/serve.md)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.format and args.w4a16_out:
            raise CAQError("--w4a16-out views an int4 export: drop it when writing --format")
        path = export_checkpoint(
            args.ckpt, args.out, overwrite=args.overwrite, rounding=args.rounding, format=args.format
        )
        print(f"{args.format or 'int4'} export written to {path}")
        if args.w4a16_out:
            view = write_compressed_tensors(path, args.w4a16_out, overwrite=args.overwrite)
            print(f"compressed-tensors W4A16 view written to {view}")
    except CAQError as err:
        fail(str(err))

