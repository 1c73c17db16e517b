"""CAQ losses: the variants as objects (:mod:`~caq_lightning.losses.variants`) over pure math
(:mod:`~caq_lightning.losses.functional`), and the same in functional form for scripts and tests."""

from __future__ import annotations

from torch import Tensor

from caq_lightning.losses.functional import (
    PUSH_BOUNDS, PUSH_TOPK_BY, RECON_FORMS, TOPK_BY, Selection, TopkTargets, block_reconstruction_loss, kl_div,
    masked_mean, push_term, select_targets, sparse_kl,
)  # fmt: skip
from caq_lightning.losses.variants import LOSSES, LogitTargets, Loss, LossTerms, get_loss, register_loss

__all__ = [
    "LOSSES", "PUSH_BOUNDS", "PUSH_TOPK_BY", "RECON_FORMS", "TOPK_BY", "LogitTargets", "Loss", "LossTerms", "Selection",
    "TopkTargets", "block_reconstruction_loss", "contrastive_alignment_loss", "get_loss", "kl_div", "loss_defaults",
    "masked_mean", "push_term", "register_loss", "select_split_topk", "select_targets", "select_topk", "sparse_kl",
]  # fmt: skip


def loss_defaults(variant: str, lambda_push: float | None, top_k: int | None, push_top_k: int | None) -> dict:
    """{"lambda_push", "top_k", "push_top_k"} in effect for ``variant``: None settings take its class defaults."""
    return get_loss(variant).resolve(lambda_push, top_k, push_top_k)


def select_topk(teacher_logits: Tensor, base_logits: Tensor, k: int, by: str = "teacher") -> TopkTargets:
    """One shared id set: the teacher's top-k (by="teacher") or the top-k of |z_t - z_b| (by="disagree")."""
    return select_targets(teacher_logits, base_logits, Selection(k, by, k, "same"))


def select_split_topk(
    teacher_logits: Tensor, base_logits: Tensor | None, top_k: int, push_top_k: int, push_by: str = "disagree"
) -> TopkTargets:
    """cal_paper's two id sets: the teacher's top-k and the top-k' of ``push_by``; the pull set only without a base."""
    push = Selection(top_k, "teacher", push_top_k, push_by) if base_logits is not None else None
    return select_targets(teacher_logits, base_logits, push or Selection(top_k, "teacher", 0, "none"))


def contrastive_alignment_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    base_logits: Tensor | None = None,
    variant: str = "cal_paper",
    lambda_push: float | None = None,
    top_k: int | None = None,
    push_top_k: int | None = None,
    push_topk_by: str = "disagree",
    mask: Tensor | None = None,
    *,
    bound: str = "none",
    margin: float = 1.0,
    renormalize: bool = True,
    targets: TopkTargets | None = None,
) -> dict[str, Tensor]:
    """The output-distribution part of CAQ for ``variant`` (see :data:`LOSSES`), on live logits or on precomputed
    ``targets``: scalars {"loss", "kl_teacher", "kl_base", "push"} with loss = kl_teacher + push."""
    loss = get_loss(variant)(lambda_push, top_k, push_top_k, push_topk_by, renormalize, bound, margin)
    terms = loss(student_logits, LogitTargets(teacher_logits, base_logits) if targets is None else targets, mask)
    return {"loss": terms.cal, "kl_teacher": terms.kl_teacher, "kl_base": terms.kl_base, "push": terms.push}
