"""At the end of a calibration run, write the student in an export format (see :mod:`caq_lightning.export`)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from caq_lightning.errors import CAQError
from caq_lightning.export import FORMAT, check_target, get_format
from caq_lightning.loading import load_tokenizer
from caq_lightning.outputs import check_writable


class Export(Callback):
    """On fit end: fold the transforms, round the weights as ``model.quant.w_rounding`` says (GPTQ on the training
    data by default, or RTN with the learned clip) and write the student in ``format`` (``caq-int4``: packed int4 weights, config, tokenizer and manifest; see
    :data:`caq_lightning.export.FORMATS` for the others). Only global rank 0 writes.

    The format's settings check, the target, the tokenizer and the strategy are checked in ``setup``, before the
    first step. A run that stops with an error (e.g. ``DivergenceGuard``) never reaches ``on_fit_end``, so it writes
    nothing.

    Args:
        format: the export format's name (``caq-int4``, ``compressed-tensors-w4a16``, ...).
        out_dir: export directory; default ``<trainer.log_dir>/export``.
        gptq: kept for older configs; the rounding is ``model.quant.w_rounding``, and a different value here is
            refused in ``setup``.
        overwrite: replace a non-empty ``out_dir``.
    """

    def __init__(self, format: str = FORMAT, out_dir: str | None = None, gptq: bool | None = None,
                 overwrite: bool = False):
        self.exporter = get_format(format)  # an unknown name fails when the config is read
        self.out_dir = out_dir
        self.gptq = gptq
        self.overwrite = overwrite
        self.path: Path | None = None

    def target(self, trainer: Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            # Folding on rank 0 alone would wait forever on the other ranks' shards.
            raise CAQError(
                f"{name} does not support a sharded student (FSDP) yet: remove it from trainer.callbacks, train, "
                "then export a single-file checkpoint with python -m caq_lightning.export, or train with DDP"
            )
        rounding = pl_module.quant_config.w_rounding
        if self.gptq is not None and self.gptq != (rounding == "gptq"):
            raise CAQError(
                f"{name} gptq={str(self.gptq).lower()} conflicts with model.quant.w_rounding={rounding}: remove "
                f"gptq from {name}'s init_args and set --model.quant.w_rounding={'gptq' if self.gptq else 'rtn'}"
            )
        if rounding == "gptq" and trainer.datamodule is None:
            raise CAQError(
                "model.quant.w_rounding=gptq rounds on the training data, which needs a datamodule: fit with one "
                "or set --model.quant.w_rounding=rtn"
            )
        self.exporter.check(pl_module.quant_config)
        what = f"{self.exporter.describe()} target"
        target = check_writable(self.target(trainer), what, "choose another out_dir")  # broadcasts
        fix = f"set overwrite: true in {name}'s init_args or choose another out_dir"
        check_target(target, self.overwrite, what, fix)
        hp = pl_module.hparams
        load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)  # written next to the weights at the end

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(isinstance(p, DTensor) for p in pl_module.student.model.parameters()):
            # Folding on rank 0 alone would wait forever on the other ranks' shards.
            rank_zero_warn(
                f"{type(self).__name__} does not support an FSDP2-sharded student yet: no export written; "
                "train with DDP or export a single-file checkpoint with python -m caq_lightning.export"
            )
            return
        target = self.target(trainer)  # trainer.log_dir broadcasts: every rank must call it
        if not trainer.is_global_zero:
            return
        model, recipe = pl_module.exported()  # what the reports evaluate
        hp = pl_module.hparams
        tokenizer = load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)
        self.path = self.exporter.write(model, recipe, tokenizer, target, self.overwrite)
        print(f"{self.exporter.describe()} written to {self.path}")
