"""The CAQ LightningModule: a fake-quantized student calibrated against a frozen FP teacher and a frozen base."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor
from torch.nn.utils import parametrize

from callbacks.divergence_guard import divergence_error
from caq_lightning.checkpoint import load_state, model_fingerprint, save_final_checkpoint, save_state
from caq_lightning.env import DTYPES
from caq_lightning.errors import CAQError
from caq_lightning.loading import check_pair, load_config, load_model, load_tokenizer
from caq_lightning.losses import (
    LOSS_VARIANTS, PUSH_BOUNDS, PUSH_TOPK_BY, RECON_FORMS, SPLIT_VARIANTS, block_reconstruction_loss,
    contrastive_alignment_loss, loss_defaults,
)  # fmt: skip
from caq_lightning.student import CAQStudent, QuantConfig
from caq_lightning.targets import (
    CACHEABLE, SPARSE_HEAD, TARGETS, TargetCache, check_cacheable, index_name, selection, sparse_head, write_targets,
)  # fmt: skip

LR_SCHEDULES = ("cosine", "constant")


def rotations_once(fn: Callable) -> Callable:
    """Run a CAQModule method with each rotation's Cayley map computed once, not once per Linear that reads it
    (about 20% of a CPU step). The cache is filled on entry in the caller's grad mode, so a no-grad pass inside
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
            Only needed by the ``cal_*`` losses.
        w_bits, a_bits, kv_bits: bits of weights, Linear inputs and the KV cache (16 = keep full precision).
        w_group_size, a_group_size, kv_group_size: quantization group along the last dim (0 = per row).
        w_symmetric, a_symmetric, kv_symmetric: symmetric or asymmetric integer grids.
        a_clip_ratio, kv_clip_ratio: fixed clipping of the dynamic activation/KV ranges.
        learn_w_clip, w_clip_init: learnable per-channel weight clipping and its initial ratio.
        rotate_residual: learn the residual rotation R1 (initialised from a random Hadamard).
        rotate_head: learn the per-head value/output rotation R2.
        smooth: learn smoothing scales (norm->qkv, norm->up/gate, up->down, v->o).
        online_hadamard: fixed online Hadamards on Q/K after RoPE (R3) and before down_proj (R4).
        loss: one of ``kl`` (KL-only, the OSTQuant objective), ``cal_full``, ``cal_topk``, ``cal_topk_partial``,
            ``cal_topk_disagree``, ``cal_paper`` (the paper's loss: pull over the teacher's top-k, push over a second
            set of k' ids), ``kl_top`` (cal_paper's pull alone). See the README's loss table.
        lambda_push: weight of the push away from the base model (>= 0). None = the loss's default: the paper's
            0.75 for ``cal_paper``, 0.3 for the others (``kl``/``kl_top`` have no push).
        top_k: tokens of the (pull) top-k set. None = 500 (the paper's k) for ``cal_paper``/``kl_top``, else 64.
        push_top_k: ``cal_paper``'s push set size k'. None = 500.
        push_topk_by: how ``cal_paper`` picks its push set: ``disagree`` (top-k' of |z_teacher - z_base|, AAQ's
            ``contrastive_kl_exp0``) or ``base`` (the base's own top-k', AAQ's ``contrastive_kl_top``).
        topk_renormalize: ``cal_paper``/``kl_top`` only. False = the partial-sum form of AAQ's ``--post_attn=True``.
        push_bound: ``none`` (unbounded -lambda*KL), ``clamp`` (-lambda*min(KL, push_margin)) or ``margin`` (hinge).
        push_margin: the bound of ``clamp`` / margin of ``margin``, in nats.
        kl_weight, recon_weight: weights of the CAL and of the block reconstruction loss (0 disables it).
        recon: ``relative`` (per token ||s - t||^2 / ||t||^2, scale-free) or ``mse`` (absolute, per dimension).
        lr_rotation, lr_scale, lr_clip: learning rates of rotations, smoothing scales and clipping factors.
        lr_schedule: ``cosine`` (to 0 over the run) or ``constant``.
        rtn_kl_every: every N steps also log ``kl_teacher_rtn``, the KL of plain RTN at the same bits (0 = never).
        dtype: dtype of the frozen models (``float32``, ``bfloat16``, ``float16``); transforms stay fp32.
        trust_remote_code: allow custom modeling code from the model repo (off by default: it runs arbitrary code).
        targets: ``live`` (run the frozen teacher and base every step) or ``cached`` (their top-k log-probs are
            precomputed once per rank at the start of fit, then only the student runs; the base is never kept in
            memory). Cached needs a ``cal_topk*`` loss and ``recon_weight=0`` (see :mod:`caq_lightning.targets`).
        targets_dir: where cached targets live (default ``<trainer.default_root_dir>/targets``); reused if present.
    """

    def __init__(
        self,
        teacher: str = "builtin:tiny",
        base: str | None = "builtin:tiny",
        w_bits: int = 4,
        a_bits: int = 4,
        kv_bits: int = 4,
        w_group_size: int = 0,
        a_group_size: int = 0,
        kv_group_size: int = 0,
        w_symmetric: bool = True,
        a_symmetric: bool = False,
        kv_symmetric: bool = False,
        a_clip_ratio: float = 1.0,
        kv_clip_ratio: float = 1.0,
        learn_w_clip: bool = True,
        w_clip_init: float = 0.98,
        rotate_residual: bool = True,
        rotate_head: bool = True,
        smooth: bool = True,
        online_hadamard: bool = True,
        rotation_seed: int = 0,
        loss: str = "cal_full",
        lambda_push: float | None = None,
        top_k: int | None = None,
        push_top_k: int | None = None,
        push_topk_by: str = "disagree",
        topk_renormalize: bool = True,
        push_bound: str = "none",
        push_margin: float = 1.0,
        kl_weight: float = 1.0,
        recon_weight: float = 1.0,
        recon: str = "relative",
        lr_rotation: float = 1.5e-3,
        lr_scale: float = 5e-3,
        lr_clip: float = 5e-3,
        lr_schedule: str = "cosine",
        rtn_kl_every: int = 10,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        targets: str = "live",
        targets_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Unset loss settings take the variant's defaults; hparams (and checkpoints) hold the values in effect.
        self.hparams.update(loss_defaults(loss, lambda_push, top_k, push_top_k))
        self._validate()
        torch_dtype = DTYPES[dtype]
        self.quant_config = QuantConfig(
            w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits,
            w_group_size=w_group_size, a_group_size=a_group_size, kv_group_size=kv_group_size,
            w_symmetric=w_symmetric, a_symmetric=a_symmetric, kv_symmetric=kv_symmetric,
            a_clip_ratio=a_clip_ratio, kv_clip_ratio=kv_clip_ratio,
            learn_w_clip=learn_w_clip, w_clip_init=w_clip_init,
            rotate_residual=rotate_residual, rotate_head=rotate_head, smooth=smooth,
            online_hadamard=online_hadamard, rotation_seed=rotation_seed,
        )  # fmt: skip
        aligned = load_model(teacher, "teacher", torch_dtype, trust_remote_code)
        self.base = None
        if loss not in ("kl", "kl_top"):
            if base is None:
                raise CAQError(f"loss '{loss}' pushes away from a base model: set --model.base or use loss=kl")
            # Cached targets already hold the base's log-probs: its weights load only for the precompute pass.
            cached = targets == "cached"
            self.base = None if cached else load_model(base, "base", torch_dtype, trust_remote_code)
            check_pair(
                aligned.config,
                load_config(base, trust_remote_code, "base") if cached else self.base.config,
                load_tokenizer(teacher, "teacher", trust_remote_code),
                load_tokenizer(base, "base", trust_remote_code),
            )
        vocab, hp = aligned.config.vocab_size, self.hparams
        for name in ("top_k", "push_top_k"):
            if loss in CACHEABLE and (hp[name] or 0) > vocab:  # every top-k loss
                raise CAQError(f"{name}={hp[name]} exceeds the vocabulary size {vocab}: lower {name}")
        # Which models a checkpoint belongs to; hashed here, before any strategy moves or shards the weights.
        self.fingerprint = {
            "teacher": {"name": teacher, "fingerprint": model_fingerprint(aligned)},
            "base": None if self.base is None else {"name": base, "fingerprint": model_fingerprint(self.base)},
        }
        self.student = CAQStudent(aligned, self.quant_config)
        # Blocks whose outputs are anchored to the teacher; None = all (a block-schedule callback narrows it).
        self.recon_blocks: set[int] | None = None
        self.target_cache: TargetCache | None = None  # opened on first use with targets=cached

    def _validate(self) -> None:
        hp = self.hparams
        if hp.loss not in LOSS_VARIANTS:
            raise CAQError(f"unknown loss '{hp.loss}': choose one of {', '.join(LOSS_VARIANTS)}")
        if hp.push_bound not in PUSH_BOUNDS:
            raise CAQError(f"unknown push_bound '{hp.push_bound}': choose one of {', '.join(PUSH_BOUNDS)}")
        if hp.lambda_push < 0:
            raise CAQError(f"lambda_push={hp.lambda_push} is negative: use lambda_push >= 0 (0 = KL-only)")
        if hp.top_k < 1:
            raise CAQError(f"top_k={hp.top_k} must be >= 1")
        if hp.push_top_k is not None and hp.push_top_k < 1:
            raise CAQError(f"push_top_k={hp.push_top_k} must be >= 1")
        if hp.push_topk_by not in PUSH_TOPK_BY:
            raise CAQError(f"unknown push_topk_by '{hp.push_topk_by}': choose one of {', '.join(PUSH_TOPK_BY)}")
        if not hp.topk_renormalize and hp.loss not in SPLIT_VARIANTS:
            raise CAQError(
                f"topk_renormalize=false applies to cal_paper/kl_top, not loss '{hp.loss}': "
                "use loss=cal_topk_partial for the partial-sum form of the shared-set loss"
            )
        if hp.recon not in RECON_FORMS:
            raise CAQError(f"unknown recon '{hp.recon}': choose one of {', '.join(RECON_FORMS)}")
        if hp.dtype not in DTYPES:
            raise CAQError(f"unknown dtype '{hp.dtype}': choose one of {', '.join(DTYPES)}")
        if hp.lr_schedule not in LR_SCHEDULES:
            raise CAQError(f"unknown lr_schedule '{hp.lr_schedule}': choose one of {', '.join(LR_SCHEDULES)}")
        if hp.targets not in TARGETS:
            raise CAQError(f"unknown targets '{hp.targets}': choose one of {', '.join(TARGETS)}")
        if hp.targets == "cached":
            check_cacheable(hp.loss, hp.recon_weight)
        for name in ("w_bits", "a_bits", "kv_bits"):
            if not 2 <= hp[name] <= 16:
                raise CAQError(f"{name}={hp[name]} is outside 2-16: use 2..8 to quantize or 16 for full precision")

    # ---- forward passes -------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, list[Tensor]]:
        """FP logits (B, T, V) of the aligned model and its block outputs (the reconstruction anchors)."""
        with self.student.mode(transform=False, quant=False), self.student.capture_blocks(self.recon_blocks) as blocks:
            logits = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, list(blocks) if self.hparams.recon_weight > 0 else []

    @torch.no_grad()
    def base_forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
        if self.base is None:
            return None
        return self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @rotations_once
    def compute_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """All loss terms for one batch; ``loss`` is what the optimizer minimises."""
        if self.hparams.targets == "cached":
            return self.cached_loss(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        teacher_logits, teacher_blocks = self.teacher_forward(ids, mask)
        base_logits = self.base_forward(ids, mask)
        with self.student.capture_blocks(self.recon_blocks) as student_blocks:
            student_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        hp = self.hparams
        terms = contrastive_alignment_loss(
            student_logits, teacher_logits, base_logits, mask=mask, **self._loss_settings()
        )
        recon = student_logits.new_zeros((), dtype=torch.float32)
        if hp.recon_weight > 0:
            student_blocks = [self.student.unrotate(h) for h in student_blocks]
            recon = block_reconstruction_loss(student_blocks, teacher_blocks, mask, form=hp.recon)
        terms["cal"] = terms["loss"]
        terms["recon"] = recon
        terms["loss"] = hp.kl_weight * terms["cal"] + hp.recon_weight * recon
        return terms

    def _loss_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(
            variant=hp.loss, lambda_push=hp.lambda_push, top_k=hp.top_k, push_top_k=hp.push_top_k,
            push_topk_by=hp.push_topk_by, bound=hp.push_bound, margin=hp.push_margin,
            renormalize=hp.topk_renormalize,
        )  # fmt: skip

    def _cache_selection(self) -> dict[str, Any]:
        hp = self.hparams
        return selection(hp.loss, hp.top_k, hp.push_top_k, hp.push_topk_by)

    def cached_loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Loss terms with cached top-k targets: the student's forward is the whole step (no teacher, no base)."""
        hp = self.hparams
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "index" not in batch:
            raise CAQError(
                "cached targets are joined on the batch's sample 'index': use caq_lightning.data.CalibrationData"
            )
        if self.target_cache is None:
            self.target_cache = TargetCache(self.resolve_targets_dir(), **self._cache_selection())
        targets = self.target_cache.batch(batch["index"], ids)
        if hp.loss in SPARSE_HEAD or (hp.loss in SPLIT_VARIANTS and hp.topk_renormalize):
            # renormalised over the cached ids: the student's logits there (pull and push sets) are all it needs
            k = targets.index.shape[-1]
            ids_used = targets.index
            if targets.push_index is not None:
                ids_used = torch.cat([targets.index, targets.push_index], -1)  # (B, T, k + k'); shared ids twice
            with sparse_head(self.student, ids_used):
                student_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B,T,k+k')
            positions = torch.arange(ids_used.shape[-1], device=ids.device).expand_as(ids_used)
            push_positions = None if targets.push_index is None else positions[..., k:]
            targets = targets._replace(index=positions[..., :k], push_index=push_positions)
        else:
            student_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        terms = contrastive_alignment_loss(student_logits, mask=mask, targets=targets, **self._loss_settings())
        terms["cal"] = terms["loss"]
        terms["recon"] = student_logits.new_zeros((), dtype=torch.float32)
        terms["loss"] = hp.kl_weight * terms["cal"]
        return terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.compute_loss(batch)
        bad = not bool(torch.isfinite(terms["loss"]))
        if self._trainer is not None:  # all ranks stop together; one rank raising alone would hang DDP's all-reduce
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise divergence_error(
                self._trainer, self.global_step, {k: v.item() for k, v in terms.items()},
                "loss is not finite", "lower the learning rates or lambda_push, or use push_bound=clamp",
            )  # fmt: skip
        for name, value in terms.items():
            self.log(name, value.detach(), on_step=True, prog_bar=name in ("loss", "kl_teacher"))
        every = self.hparams.rtn_kl_every
        if every and self.global_step % every == 0:
            self.log("kl_teacher_rtn", self.rtn_kl(batch), on_step=True, prog_bar=True)
        return terms["loss"]

    @torch.no_grad()
    def rtn_kl(self, batch: dict[str, Tensor]) -> Tensor:
        """KL(teacher || RTN at the same bits) on this batch: the baseline calibration must beat."""
        from caq_lightning.losses import kl_div

        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self.student.mode(transform=False, quant=False):
            teacher_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with self.student.mode(transform=False, quant=True):
            rtn_logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return kl_div(teacher_logits, rtn_logits, mask)

    def fold(self, gptq: bool = False, calibration=None):
        """Bake the calibrated transforms into a plain transformers model; returns (model, QuantRecipe).

        The returned model, with its attached runtime, reproduces the fake-quant student's logits. With
        ``gptq=True`` the weights are GPTQ-rounded on ``calibration`` batches (default: the training data).
        """
        from caq_lightning.fold import fold

        if gptq and calibration is None and self._trainer is not None:
            calibration = self.trainer.datamodule.train_dataloader()
        return fold(self.student, calibration=calibration, gptq=gptq)

    # ---- optimisation ---------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with separate learning rates for rotations, smoothing scales and clipping, like the paper's code."""
        hp = self.hparams
        lrs = {"rotation": hp.lr_rotation, "scale": hp.lr_scale, "clip": hp.lr_clip}
        groups = [
            {"params": params, "lr": lrs[kind], "name": kind}
            for kind, params in self.student.param_groups().items()
            if params
        ]
        if not groups:
            raise CAQError("nothing to calibrate: enable rotate_residual, rotate_head, smooth or learn_w_clip")
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if hp.lr_schedule == "constant":
            return {"optimizer": optimizer}
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- scaling: cached targets, FSDP2 (see caq_lightning.targets and the README's Scaling section) ----------

    def resolve_targets_dir(self) -> Path:
        if self.hparams.targets_dir is not None:
            return Path(self.hparams.targets_dir)
        if self._trainer is None:
            raise CAQError("targets=cached outside a Trainer needs an explicit targets_dir")
        return Path(self.trainer.default_root_dir) / "targets"

    @torch.no_grad()
    def precompute_targets(self, batches: Iterable[dict[str, Tensor]], rank: int = 0) -> Path:
        """Run the teacher and the base once over ``batches`` and cache their top-k targets as ``rank``'s shards.

        The base is loaded for this pass only (and FSDP2-sharded like the student under ModelParallelStrategy).
        """
        hp = self.hparams
        sel = self._cache_selection()
        base = None
        if sel["push_by"] != "none":  # kl_top caches the teacher alone
            base = load_model(hp.base, "base", DTYPES[hp.dtype], hp.trust_remote_code).to(self.device)
            self._shard(base)
        device = self.device

        def logits(model, ids, mask):
            return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits

        meta = {"teacher": hp.teacher, "base": hp.base, "dtype": hp.dtype}
        path = write_targets(
            lambda ids, mask: self.teacher_forward(ids.to(device), mask.to(device))[0],
            lambda ids, mask: logits(base, ids, mask),
            batches, self.resolve_targets_dir(), sel["k"], sel["by"], rank, meta,
            push_k=sel["push_k"], push_by=sel["push_by"],
        )  # fmt: skip
        del base
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the base's memory back before the student-only steps
        return path

    def on_train_start(self) -> None:
        if self.hparams.targets != "cached":
            return
        directory = self.resolve_targets_dir()
        rank = self.global_rank
        # Each rank caches the samples its own (distributed) sampler hands it; reruns reuse the cache.
        if not (directory / index_name(rank)).exists():
            self.precompute_targets(self.trainer.train_dataloader, rank)
        self.trainer.strategy.barrier("caq_targets")
        self.target_cache = TargetCache(directory, **self._cache_selection())

    def _shard(self, model: torch.nn.Module) -> None:
        """FSDP2: shard each decoder block, then the rest of the model, over the data-parallel mesh (no-op without)."""
        if self._device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.student.adapter.layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy: FSDP2-shard the student's model and the base; the transforms stay replicated."""
        if self._device_mesh is None or getattr(self, "_sharded", False):
            return
        if self.device_mesh["tensor_parallel"].size() > 1:
            raise CAQError("tensor parallelism is not supported: use ModelParallelStrategy(tensor_parallel_size=1)")
        self._shard(self.student.model)
        if self.base is not None:
            self._shard(self.base)
        self._sharded = True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # FSDP2 reduces the gradients of the parameters it shards; the replicated transforms (R1, R2, scales) are
        # averaged here, so every rank takes the same step and they stay identical.
        if self._device_mesh is None:
            return
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.parameters() if p.grad is not None and not isinstance(p.grad, DTensor)]
        if not grads:
            return
        group = self.device_mesh["data_parallel"].get_group()
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=group)
        flat /= torch.distributed.get_world_size(group)
        for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(avg.view_as(g))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        if self._device_mesh is None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # torch's clip_grad_norm_ refuses a mix of sharded (DTensor) and replicated grads: take the global norm here.
        if gradient_clip_algorithm not in (None, "norm"):
            raise CAQError("under FSDP2 only gradient_clip_algorithm=norm is supported: drop the algorithm setting")
        from torch.distributed.tensor import DTensor

        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = [g.norm().full_tensor() if isinstance(g, DTensor) else g.norm() for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms).float())
        scale = float((gradient_clip_val / (total + 1e-6)).clamp(max=1.0))
        for g in grads:
            g.mul_(scale)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        max_len = getattr(self.student.model.config, "max_position_embeddings", None)
        seq_len = getattr(datamodule, "seq_len", None)
        if max_len and seq_len and seq_len > max_len:
            raise CAQError(
                f"seq_len {seq_len} exceeds the model's maximum of {max_len} positions: lower --data.seq_len"
            )

    # ---- checkpoints (see caq_lightning.checkpoint) ---------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_state(self, checkpoint)  # trainable tensors only, plus model fingerprint, RNG and block schedule

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_state(self, checkpoint)  # refuses another model's checkpoint, puts the frozen weights back

    def on_train_end(self) -> None:
        # Lightning calls this after every callback's on_train_end and before any on_fit_end or teardown hook
        # (Int4Export, SafetyReport): the calibrated transforms are on disk before post-fit work that could fail.
        save_final_checkpoint(self.trainer)
