"""python -m caq_lightning.export --ckpt CKPT --out DIR [--format NAME] [--overwrite] [--rounding gptq|rtn]
[--trust-remote-code] [--w4a16-out DIR2]"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from caq_lightning.errors import CAQError, fail
from caq_lightning.export.compressed_tensors import write_compressed_tensors
from caq_lightning.export.formats import FORMATS, check_target, get_format
from caq_lightning.export.writer import FORMAT


def export_checkpoint(
    ckpt: str, out: str, overwrite: bool = False, rounding: str | None = None, format: str = FORMAT,
    trust_remote_code: bool = False,
) -> Path:
    """Fold the CAQ student of a Lightning checkpoint and write it to ``out`` in ``format`` (default caq-int4).

    ``rounding`` (gptq|rtn) defaults to the run's ``quant.w_rounding``; GPTQ rounds on the run's calibration data.
    The teacher and base named in the checkpoint are printed before they load; custom code from their repositories
    runs only with ``trust_remote_code`` (this command line's), never because the checkpoint says so.
    """
    from caq_lightning.checkpoint import check_readable
    from caq_lightning.config import QuantConfig, as_group

    exporter = get_format(format)
    if not Path(ckpt).is_file():
        raise CAQError(f"checkpoint '{ckpt}' does not exist: pass the .ckpt file written by training (--ckpt)")
    target = check_target(out, overwrite)  # fail before the slow model load
    checkpoint = check_readable(ckpt, fix="export another .ckpt of the run")  # truncated, pickle, old layout
    saved = checkpoint.get("hyper_parameters") or {}
    exporter.check(as_group(QuantConfig, saved.get("quant")))
    model, recipe, tokenizer = fold_checkpoint(ckpt, rounding, trust_remote_code, checkpoint)
    return exporter.write(model, recipe, tokenizer, target, overwrite)


def fold_checkpoint(
    ckpt: str, rounding: str | None = None, trust_remote_code: bool = False, checkpoint: dict | None = None
) -> tuple[Any, Any, Any]:
    """(folded model, recipe, tokenizer) of the CAQ student in ``ckpt``, loaded in its run's dtype and rounded as
    :func:`export_checkpoint` rounds it; ``checkpoint`` is the file's dict when the caller has read it already."""
    from caq_lightning.checkpoint import check_readable
    from caq_lightning.loading import load_tokenizer
    from caq_lightning.module import CAQModule

    checkpoint = checkpoint or check_readable(ckpt, fix="pass another .ckpt of the run")
    saved = checkpoint.get("hyper_parameters") or {}
    print(f"checkpoint {ckpt}: loading teacher '{saved.get('teacher')}' and base '{saved.get('base')}'", flush=True)
    module = CAQModule.load_from_checkpoint(ckpt, map_location="cpu", trust_remote_code=trust_remote_code)
    module.student.set_quantized_layers(None)  # a mid-schedule checkpoint may hold FP blocks; export quantizes all
    rounding = rounding or module.quant_config.w_rounding
    calibration = None
    if rounding == "gptq":
        calibration = _calibration_from_checkpoint(ckpt, checkpoint, module, trust_remote_code)
    model, recipe = module.fold(rounding=rounding, calibration=calibration)
    return model, recipe, load_tokenizer(module.hparams.teacher, "teacher", trust_remote_code)


def _calibration_from_checkpoint(ckpt: str, checkpoint: dict, module, trust_remote_code: bool) -> Any:
    from caq_lightning.data import CalibrationData

    hparams = checkpoint.get("datamodule_hyper_parameters")
    if not hparams:
        raise CAQError(
            f"GPTQ rounding needs calibration data, but '{ckpt}' holds no datamodule settings: pass --rounding rtn"
        )
    tokenizer = hparams.get("tokenizer") or module.hparams.teacher
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI adds _instantiator
    data = CalibrationData(**{**hparams, "tokenizer": tokenizer, "trust_remote_code": trust_remote_code})
    data.setup("fit")
    return data.train_dataloader()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m caq_lightning.export", description="Write a CAQ checkpoint in an export format."
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint of a CAQ run (.ckpt)")
    p.add_argument("--out", required=True, help="export directory (must be empty or absent)")
    p.add_argument("--format", default=FORMAT, choices=sorted(FORMATS), help=f"export format (default {FORMAT}; serving: docs/serve.md)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--rounding", choices=("gptq", "rtn"), help="weight rounding (default: the run's quant.w_rounding)")
    p.add_argument("--gptq", action="store_const", const="gptq", dest="rounding", help="same as --rounding gptq")
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow custom code from the teacher's repository (a checkpoint never turns this on)",
    )  # fmt: skip
    p.add_argument(
        "--w4a16-out", help="also write a compressed-tensors W4A16 view here (transformers/vLLM; needs [interop])"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.w4a16_out and args.format != FORMAT:
            raise CAQError(f"--w4a16-out converts a {FORMAT} export: drop it or use --format {FORMAT}")
        path = export_checkpoint(
            args.ckpt, args.out, overwrite=args.overwrite, rounding=args.rounding, format=args.format,
            trust_remote_code=args.trust_remote_code,
        )  # fmt: skip
        print(f"{get_format(args.format).describe()} written to {path}")
        if args.w4a16_out:
            view = write_compressed_tensors(path, args.w4a16_out, overwrite=args.overwrite)
            print(f"compressed-tensors W4A16 view written to {view}")
    except CAQError as err:
        fail(str(err))
