"""At the end of a calibration run, write the int4 export of the student (see :mod:`caq_lightning.export`)."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from caq_lightning.errors import CAQError
from caq_lightning.export import write_export
from caq_lightning.export.formats import get_format
from caq_lightning.loading import load_tokenizer
from caq_lightning.outputs import check_writable

OVERWRITE = "set overwrite: true in Int4Export's init_args or choose another out_dir"


class Int4Export(Callback):
    """On fit end: fold the transforms, round the weights as ``model.quant.w_rounding`` says (GPTQ on the training
    data by default, or RTN with the learned clip), pack them as int4 and write ``model.safetensors``,
    ``config.json``, the tokenizer and ``manifest.json``. Only global rank 0 writes.

    Nothing is written when the run diverged (``trainer.caq_diverged``, set by ``DivergenceGuard``). The target,
    the tokenizer and the strategy are checked in ``setup``, before the first step.

    Args:
        out_dir: export directory; default ``<trainer.log_dir>/export``.
        gptq: kept for older configs; the rounding is ``model.quant.w_rounding``, and a different value here is
            refused in ``setup``.
        overwrite: replace a non-empty ``out_dir``.
        format: another export format by name (``compressed-tensors-w4a4``, ``compressed-tensors-w4a8``: see
            docs/serve.md) instead of the packed int4 one; it checks the student in ``setup``.
    """

    def __init__(
        self, out_dir: str | None = None, gptq: bool | None = None, overwrite: bool = False, format: str | None = None
    ):
        self.out_dir = out_dir
        self.gptq = gptq
        self.overwrite = overwrite
        self.format = None if format is None else get_format(format)
        self.path: Path | None = None

    def target(self, trainer: Trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            # Folding on rank 0 alone would wait forever on the other ranks' shards.
            raise CAQError(
                "Int4Export does not support a sharded student (FSDP) yet: remove it from trainer.callbacks, train, "
                "then export a single-file checkpoint with python -m caq_lightning.export, or train with DDP"
            )
        rounding = pl_module.quant_config.w_rounding
        if self.gptq is not None and self.gptq != (rounding == "gptq"):
            raise CAQError(
                f"Int4Export gptq={str(self.gptq).lower()} conflicts with model.quant.w_rounding={rounding}: remove "
                f"gptq from Int4Export's init_args and set --model.quant.w_rounding={'gptq' if self.gptq else 'rtn'}"
            )
        if rounding == "gptq" and trainer.datamodule is None:
            raise CAQError(
                "model.quant.w_rounding=gptq rounds on the training data, which needs a datamodule: fit with one "
                "or set --model.quant.w_rounding=rtn"
            )
        target = check_writable(self.target(trainer), "int4 export target", "choose another out_dir")  # broadcasts
        if target.is_dir() and any(target.iterdir()) and not self.overwrite:
            raise CAQError(f"int4 export target {target} is not empty: {OVERWRITE}")
        if self.format is not None:
            self.format.check(pl_module.quant_config)  # before the first calibration step
        hp = pl_module.hparams
        load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)  # written next to the weights at the end

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(trainer, "caq_diverged", False):
            rank_zero_warn("the run diverged: no int4 export written (resume from the last good checkpoint)")
            return
        if any(isinstance(p, DTensor) for p in pl_module.student.model.parameters()):
            # Folding on rank 0 alone would wait forever on the other ranks' shards.
            rank_zero_warn(
                "Int4Export does not support an FSDP2-sharded student yet: no int4 export written; "
                "train with DDP or export a single-file checkpoint with python -m caq_lightning.export"
            )
            return
        target = self.target(trainer)  # trainer.log_dir broadcasts: every rank must call it
        if not trainer.is_global_zero:
            return
        model, recipe = pl_module.exported()
        hp = pl_module.hparams
        tokenizer = load_tokenizer(hp.teacher, "teacher", hp.trust_remote_code)
        if self.format is None:
            self.path = write_export(model, recipe, tokenizer, target, overwrite=self.overwrite)
            print(f"int4 export written to {self.path}")
        else:
            self.path = self.format.write(model, recipe, tokenizer, target, self.overwrite)
            print(f"{self.format.name} export written to {self.path}")
