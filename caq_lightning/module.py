"""The CAQ LightningModule: a fake-quantized student calibrated against a frozen FP teacher and a frozen base.

The path of ``python train.py --config configs/tiny.yaml``, from end to end:

1. :mod:`caq_lightning.cli` parses the config into :class:`CAQModule` (settings groups in :mod:`caq_lightning.config`)
   and :class:`caq_lightning.data.CalibrationData`, and checks every input before the first step;
2. ``fit`` calibrates the student (:mod:`caq_lightning.student`) with the loss object of ``loss.name``
   (:mod:`caq_lightning.losses`) against live or cached targets (:mod:`caq_lightning.targets`); callbacks guard
   divergence (``callbacks.divergence_guard``) and schedule blocks (``callbacks.block_schedule``);
3. after the last step, :meth:`CAQModule.on_train_end` writes the final checkpoint (:mod:`caq_lightning.checkpoint`);
4. then the post-fit callbacks run on it: ``callbacks.export`` (``Export``; ``Int4Export`` is its caq-int4 alias)
   folds (:mod:`caq_lightning.fold`) and writes an export format (:mod:`caq_lightning.export`),
   ``callbacks.safety_report`` evaluates teacher, RTN and CAQ (:mod:`caq_lightning.eval`) into
   ``<run dir>/results.json``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.utils import parametrize

from caq_lightning import distributed
from caq_lightning.checkpoint import (
    divergence_error, load_state, model_fingerprint, save_final_checkpoint, save_state,
)  # fmt: skip
from caq_lightning.config import (
    LossConfig, OptimConfig, QuantConfig, TargetsConfig, WeightRounding, as_group, check_choice,
)  # fmt: skip
from caq_lightning.env import DTYPES, DtypeName
from caq_lightning.errors import CAQError
from caq_lightning.fold import Folded, fold
from caq_lightning.loading import check_pair, check_tokenizer_fits, load_config, load_model, load_tokenizer
from caq_lightning.losses import LossTerms, kl_div
from caq_lightning.student import CAQStudent
from caq_lightning.targets import target_source


def rotations_once(fn: Callable) -> Callable:
    """Run a CAQModule method with each rotation's Cayley map computed once, not once per Linear that reads it.
    The cache is filled on entry in the caller's grad mode, so a no-grad pass inside
    the method cannot leave a copy without autograd history in it, and in fp32 even under bf16 autocast."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with parametrize.cached():
            with torch.autocast(device_type=self.device.type, enabled=False):
                for module in self.student.modules():
                    if parametrize.is_parametrized(module, "weight"):
                        module.weight  # noqa: B018 (fills the cache)
            return fn(self, *args, **kwargs)

    return wrapper


class CAQModule(LightningModule):
    """Contrastive Alignment Quantization.

    Loss per batch: ``recon_weight * recon(student blocks, teacher blocks) + kl_weight * CAL`` with
    ``CAL = KL(teacher || student) + push(KL(base || student))`` (see :mod:`caq_lightning.losses`).

    Args:
        teacher: the aligned model: local path, hub id, or ``builtin:<pair>``. The student is built on it.
        base: the pre-trained model the teacher was fine-tuned from (same name for a builtin pair).
            Only needed by the losses that push away from it.
        quant: bits, groups and transforms of the student (:class:`~caq_lightning.config.QuantConfig`).
        loss: the objective (:class:`~caq_lightning.config.LossConfig`; docs/losses.md's table).
        optim: learning rates and schedule (:class:`~caq_lightning.config.OptimConfig`).
        targets: live frozen models or cached top-k targets (:class:`~caq_lightning.config.TargetsConfig`).
        rtn_kl_every: every N steps also log ``kl_teacher_rtn``, the KL of plain RTN at the same bits (0 = never).
        dtype: dtype of the frozen models; transforms stay fp32.
        trust_remote_code: allow custom modeling code from the model repo (off by default: it runs arbitrary code).
    """

    def __init__(
        self,
        teacher: str = "builtin:tiny",
        base: str | None = "builtin:tiny",
        quant: QuantConfig = QuantConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        targets: TargetsConfig = TargetsConfig(),
        rtn_kl_every: int = 10,
        dtype: DtypeName = "float32",
        trust_remote_code: bool = False,
    ):
        super().__init__()
        # Groups arrive as dataclasses (CLI, Python) or dicts (a checkpoint's hparams); unset loss settings take
        # the variant's defaults, so hparams (and checkpoints) hold the values in effect.
        self.quant_config: QuantConfig = as_group(QuantConfig, quant)
        self.loss_config: LossConfig = as_group(LossConfig, loss).resolved()
        self.optim_config: OptimConfig = as_group(OptimConfig, optim)
        self.targets_config: TargetsConfig = as_group(TargetsConfig, targets)
        check_choice("dtype", dtype, DtypeName)
        self.save_hyperparameters(
            {"teacher": teacher, "base": base, "rtn_kl_every": rtn_kl_every, "dtype": dtype,
             "trust_remote_code": trust_remote_code, "quant": asdict(self.quant_config),
             "loss": asdict(self.loss_config), "optim": asdict(self.optim_config),
             "targets": asdict(self.targets_config)}
        )  # fmt: skip
        cfg = self.loss_config
        self.objective = cfg.build()  # the loss variant's object (caq_lightning.losses)
        self.target_source = target_source(self.targets_config.kind, self.objective)  # live or cached
        torch_dtype = DTYPES[dtype]
        aligned = load_model(teacher, "teacher", torch_dtype, trust_remote_code)
        self.base = None
        if self.objective.needs_base:
            if base is None:
                raise CAQError(
                    f"loss '{cfg.name}' pushes away from a base model: set --model.base or use loss.name=kl"
                )
            # Cached targets already hold the base's log-probs: its weights load only for the precompute pass.
            keeps = self.target_source.keeps_base
            self.base = load_model(base, "base", torch_dtype, trust_remote_code) if keeps else None
            teacher_tok = load_tokenizer(teacher, "teacher", trust_remote_code)
            base_tok = load_tokenizer(base, "base", trust_remote_code)
            check_pair(
                aligned.config,
                self.base.config if keeps else load_config(base, trust_remote_code, "base"),
                teacher_tok,
                base_tok,
            )
            rows = aligned.get_input_embeddings().weight.shape[0]
            check_tokenizer_fits(teacher_tok, rows, f"the tokenizer of teacher '{teacher}'")
            check_tokenizer_fits(base_tok, rows, f"the tokenizer of base '{base}'")
        vocab = aligned.config.vocab_size
        for name in ("top_k", "push_top_k"):
            if self.objective.selection() is not None and (getattr(cfg, name) or 0) > vocab:  # every top-k loss
                raise CAQError(f"{name}={getattr(cfg, name)} exceeds the vocabulary size {vocab}: lower {name}")
        # Which models a checkpoint belongs to; hashed here, before any strategy moves or shards the weights.
        self.fingerprint = {
            "teacher": {"name": teacher, "fingerprint": model_fingerprint(aligned)},
            "base": None if self.base is None else {"name": base, "fingerprint": model_fingerprint(self.base)},
        }
        self.student = CAQStudent(aligned, self.quant_config)
        # Blocks whose outputs are anchored to the teacher; None = all (a block-schedule callback narrows it).
        self.recon_blocks: set[int] | None = None

    # ---- forward passes -------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, list[Tensor]]:
        """FP logits (B, T, V) of the aligned model and its block outputs (the reconstruction anchors)."""
        with self.student.mode(transform=False, quant=False), self.student.capture_blocks(self.recon_blocks) as blocks:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, list(blocks) if self.loss_config.recon_weight > 0 else []

    @torch.no_grad()
    def base_forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        if self.base is None:
            return None
        return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @rotations_once
    def compute_loss(self, batch: dict[str, Tensor]) -> LossTerms:
        """All loss terms for one batch, against live or cached targets; ``loss`` is what the optimizer minimises."""
        return self.target_source.terms(self, batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | LossTerms]:
        """The loss to minimise, and the detached :class:`LossTerms` (what ``DivergenceGuard`` reads)."""
        terms = self.compute_loss(batch)
        bad = not bool(torch.isfinite(terms.loss))
        if self._trainer is not None:  # all ranks stop together; one rank raising alone would hang DDP's all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise divergence_error(
                self._trainer, self.global_step, {k: v.item() for k, v in terms._asdict().items()},
                "loss is not finite", "lower the learning rates or loss.lambda_push, or use loss.push_bound=clamp",
            )  # fmt: skip
        detached = LossTerms(*(value.detach() for value in terms))
        for name, value in detached._asdict().items():
            self.log(name, value, on_step=True, prog_bar=name in ("loss", "kl_teacher"))
        every = self.hparams.rtn_kl_every
        if every and self.global_step % every == 0:
            self.log("kl_teacher_rtn", self.rtn_kl(batch), on_step=True, prog_bar=True)
        return {"loss": terms.loss, "terms": detached}

    @torch.no_grad()
    def rtn_kl(self, batch: dict[str, Tensor]) -> Tensor:
        """KL(teacher || RTN at the same bits) on this batch: the baseline calibration must beat."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self.student.mode(transform=False, quant=False):
            teacher_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with self.student.mode(transform=False, quant=True):
            rtn_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return kl_div(teacher_logits, rtn_logits, mask)

    def fold(self, rounding: WeightRounding | None = None, calibration=None) -> Folded:  # noqa: ANN001
        """Bake the calibrated transforms into a plain transformers model; returns (model, recipe).

        ``rounding`` defaults to ``quant.w_rounding``; GPTQ rounds on ``calibration`` batches (default: the
        training data). The returned model, with its attached runtime, is what the export writes.
        """
        rounding = rounding or self.quant_config.w_rounding
        if rounding == "gptq" and calibration is None and self._trainer is not None:
            calibration = self.trainer.datamodule.train_dataloader()
        return fold(self.student, calibration=calibration, rounding=rounding)

    def exported(self) -> Folded:
        """The folded, rounded model of the current step, computed once: the export writes it, reports evaluate it."""
        cached = getattr(self, "_exported", None)
        if cached is None or cached[0] != self.global_step:
            self.student.set_quantized_layers(None)  # a block schedule may have left blocks in full precision
            self._exported = (self.global_step, self.fold())
        return self._exported[1]

    # ---- optimisation ---------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with separate learning rates for rotations, smoothing scales and clipping, like the paper's code."""
        cfg = self.optim_config
        lrs = {"rotation": cfg.lr_rotation, "scale": cfg.lr_scale, "clip": cfg.lr_clip}
        groups = [
            {"params": params, "lr": lrs[kind], "name": kind}
            for kind, params in self.student.param_groups().items()
            if params
        ]
        if not groups:
            raise CAQError(
                "nothing to calibrate: enable quant.rotate_residual, quant.rotate_head, quant.smooth or "
                "quant.learn_w_clip"
            )
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if cfg.lr_schedule == "constant":
            return {"optimizer": optimizer}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- scaling: cached targets, FSDP2 (see caq_lightning.targets and docs/scaling.md) ---------------------

    def resolve_targets_dir(self) -> Path:
        if self.targets_config.dir is not None:
            return Path(self.targets_config.dir)
        if self._trainer is None:
            raise CAQError("targets.kind=cached outside a Trainer needs an explicit targets.dir")
        return Path(self.trainer.default_root_dir) / "targets"

    def precompute_targets(self, batches: Iterable[dict[str, Tensor]], rank: int = 0) -> Path:
        """With cached targets: run teacher and base once over ``batches`` into ``rank``'s shards of the cache."""
        return self.target_source.precompute(self, batches, rank)

    def on_train_start(self) -> None:
        self.target_source.on_train_start(self)  # cached targets: precompute this rank's shards unless present

    def configure_model(self) -> None:
        """Under ModelParallelStrategy: FSDP2-shard the student's model and the base; the transforms stay replicated."""
        if self._device_mesh is None or getattr(self, "_sharded", False):
            return
        distributed.check_mesh(self._device_mesh)
        distributed.shard(self.student.model, self._device_mesh)
        if self.base is not None:
            distributed.shard(self.base, self._device_mesh)
        self._sharded = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        distributed.average_replicated_grads(self.parameters(), self._device_mesh)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        if self._device_mesh is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        distributed.clip_grad_norm(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        max_len = getattr(self.student.model.config, "max_position_embeddings", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if max_len and seq_len and seq_len > max_len:
            raise CAQError(
                f"seq_len {seq_len} exceeds the model's maximum of {max_len} positions: lower --data.seq_len"
            )
        self.check_data_tokenizer(datamodule)
        if stage == "fit" and self._trainer is not None and 0 in (self.trainer.max_steps, self.trainer.max_epochs):
            rank_zero_warn(
                "max_steps=0: no calibration step runs, so the export and report hold the uncalibrated student "
                "(its initial transforms); set --trainer.max_steps to 1 or more to calibrate"
            )

    def check_data_tokenizer(self, datamodule) -> None:  # noqa: ANN001
        """Raise if the calibration data were tokenized into ids this model does not read the same way."""
        tokenizer, name = getattr(datamodule, "tokenizer", None), getattr(datamodule, "tokenizer_name", None)
        if tokenizer is None:
            return
        fix = "leave --data.tokenizer unset (the teacher's is used) or pass the teacher's tokenizer"
        rows = self.student.model.get_input_embeddings().weight.shape[0]
        check_tokenizer_fits(tokenizer, rows, f"data tokenizer '{name}'", fix)
        teacher = self.hparams.teacher
        if name is None or name == teacher:
            return
        try:
            own = load_tokenizer(teacher, "teacher", self.hparams.trust_remote_code)
        except CAQError:  # the teacher ships no tokenizer: --data.tokenizer is the only one there is
            return
        if own.get_vocab() != tokenizer.get_vocab():
            raise CAQError(
                f"data tokenizer '{name}' maps tokens to other ids than the tokenizer of teacher '{teacher}': {fix}"
            )

    # ---- checkpoints (see caq_lightning.checkpoint) ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_state(self, checkpoint)  # trainable tensors only, plus model fingerprint, RNG and block schedule

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_state(self, checkpoint)  # refuses another model's checkpoint, puts the frozen weights back

    def on_train_end(self) -> None:
        # Lightning calls this after every callback's on_train_end and before any on_fit_end or teardown hook
        # (Export, SafetyReport): the calibrated transforms are on disk before post-fit work that could fail.
        save_final_checkpoint(self.trainer)
