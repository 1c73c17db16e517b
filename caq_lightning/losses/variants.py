"""The CAL variants as objects: each one a class that says what it needs (base or not, its pull and push ids) and
how its settings default, registered by name; all compute through one :meth:`Loss.__call__` into :class:`LossTerms`.

``cal_paper`` is the paper's loss as in its official code (weesunghyun/AAQ, quant/trainer.py, loss types
``contrastive_kl_exp0_K`` / ``contrastive_kl_top_K``): the pull KL over the teacher's top-k tokens and the push KL over
a second set of k' tokens, each renormalised by a softmax of the raw logits over its own id set.

A new variant is one subclass with ``@register_loss`` (and its test); :class:`~caq_lightning.config.LossConfig`, the
module and the target cache read it from :data:`LOSSES`.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from caq_lightning.errors import CAQError
from caq_lightning.losses.functional import (
    Selection, TopkTargets, check_cached, check_logits, kl_div, push_term, select_targets, sparse_kl,
)  # fmt: skip


class LossTerms(NamedTuple):
    """One step's loss terms (scalar tensors), in the order they are logged."""

    loss: Tensor  # what the optimizer minimises: kl_weight * cal (+ recon_weight * recon with live targets)
    kl_teacher: Tensor  # the pull: KL(teacher || student) over the variant's ids
    kl_base: Tensor  # the push's KL(base || student); 0 without a push
    push: Tensor  # the push term in cal (normally <= 0); 0 without a push
    cal: Tensor  # kl_teacher + push
    recon: Tensor  # block reconstruction; 0 when off or on cached targets


class LogitTargets(NamedTuple):
    """Live targets: the frozen models' full logits (B, T, V) on this batch; base is None without a base model."""

    teacher: Tensor | None
    base: Tensor | None


class Loss:
    """A CAL variant: KL(teacher || student) over its pull ids plus a push away from the base over its push ids.

    Class attributes say what the variant is; the settings a config leaves None take the class defaults, resolved
    once in ``__init__``. ``Loss(...)(student_logits, targets, mask)`` returns the :class:`LossTerms`.
    """

    name: ClassVar[str]
    pull: ClassVar[Literal["full", "teacher", "disagree"]]  # full vocab, the teacher's top-k, top-k |z_t - z_b|
    push: ClassVar[Literal["none", "full", "shared", "own"]]  # shared: the pull ids; own: its own top-k' set
    renormalize: ClassVar[bool | None] = False  # top-k KLs renormalised over their ids; None: topk_renormalize says
    lambda_push: ClassVar[float] = 0.3  # defaults of the settings left None
    top_k: ClassVar[int] = 64
    push_top_k: ClassVar[int | None] = None

    def __init__(
        self, lambda_push: float | None = None, top_k: int | None = None, push_top_k: int | None = None,
        push_topk_by: str = "disagree", renormalize: bool = True, bound: str = "none", margin: float = 1.0,
        kl_weight: float = 1.0, recon_weight: float = 1.0,
    ):  # fmt: skip
        if not renormalize and type(self).renormalize is not None:
            raise CAQError(f"renormalize=False applies to cal_paper/kl_top; variant {self.name!r} fixes its own form")
        settings = self.resolve(lambda_push, top_k, push_top_k)
        self.lambda_push, self.top_k = settings["lambda_push"], settings["top_k"]
        self.push_top_k = settings["push_top_k"]
        self.push_topk_by, self.bound, self.margin = push_topk_by, bound, margin
        self.renormalized = renormalize if type(self).renormalize is None else type(self).renormalize
        self.kl_weight, self.recon_weight = kl_weight, recon_weight

    @classmethod
    def resolve(cls, lambda_push: float | None, top_k: int | None, push_top_k: int | None) -> dict:
        """The settings in effect: each None replaced by the class default; push_top_k only with a push set of its
        own."""
        out = {
            "lambda_push": cls.lambda_push if lambda_push is None else lambda_push,
            "top_k": cls.top_k if top_k is None else top_k,
            "push_top_k": cls.push_top_k if push_top_k is None else push_top_k,
        }
        if cls.push != "own":
            out["push_top_k"] = None
        return out

    @property
    def needs_base(self) -> bool:
        return self.push != "none"

    def selection(self) -> Selection | None:
        """The top-k ids it reads (what cached targets must hold); None for a full-vocabulary variant."""
        if self.pull == "full":
            return None
        if self.push == "own":
            return Selection(self.top_k, self.pull, self.push_top_k, self.push_topk_by)
        if self.push == "none":
            return Selection(self.top_k, self.pull, 0, "none")
        return Selection(self.top_k, self.pull, self.top_k, "same")

    def __call__(
        self, student_logits: Tensor, targets: LogitTargets | TopkTargets, mask: Tensor | None = None,
        recon: Callable[[], Tensor] | None = None,
    ) -> LossTerms:  # fmt: skip
        """The terms on ``student_logits`` (B, T, V) against live logits or top-k targets; mask (B, T) or None.

        ``recon`` computes the block reconstruction (live targets only); it runs after the KLs, which fixes the
        order in which backward sums the gradients. Without it, recon is 0 and loss = kl_weight * cal.
        """
        kl_teacher, kl_base = self._kls(student_logits, targets, mask)
        if kl_base is None:
            kl_base = push = kl_teacher.new_zeros(())
            cal = kl_teacher
        else:
            push = push_term(kl_base, self.lambda_push, bound=self.bound, margin=self.margin, kl_teacher=kl_teacher)
            cal = kl_teacher + push
        if recon is None:
            zero = student_logits.new_zeros((), dtype=torch.float32)
            return LossTerms(self.kl_weight * cal, kl_teacher, kl_base, push, cal, zero)
        value = recon()
        return LossTerms(self.kl_weight * cal + self.recon_weight * value, kl_teacher, kl_base, push, cal, value)

    def _kls(
        self, student_logits: Tensor, targets: LogitTargets | TopkTargets, mask: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """KL(teacher || student) and KL(base || student) over the variant's ids (the latter None without a push)."""
        selection = self.selection()
        live = isinstance(targets, LogitTargets)
        need = "teacher_logits and base_logits" if self.needs_base else "teacher_logits"
        missing = live and (targets.teacher is None or (self.needs_base and targets.base is None))
        if selection is None and (missing or not live):
            hint = "" if live else " (cached top-k targets only serve the top-k variants)"
            raise CAQError(
                f"variant {self.name!r}: full-vocab needs live {need}{hint}; "
                "run the frozen models or pick a top-k variant"
            )
        if missing:
            raise CAQError(f"variant {self.name!r} needs {need}, or cached targets")
        if selection is None:
            kl_teacher = kl_div(targets.teacher, student_logits, mask)
            return kl_teacher, kl_div(targets.base, student_logits, mask) if self.needs_base else None
        if live:
            check_logits("teacher_logits", targets.teacher, student_logits)
            targets = select_targets(targets.teacher, targets.base, selection)
        else:
            check_cached(targets, self.top_k, self.push_top_k if self.push == "own" else None)
        kl_teacher = sparse_kl(targets.teacher_logp, student_logits, targets.index, self.renormalized, mask)
        if not self.needs_base:
            return kl_teacher, None
        push_index = targets.push_index if self.push == "own" else targets.index
        return kl_teacher, sparse_kl(targets.base_logp, student_logits, push_index, self.renormalized, mask)


LOSSES: dict[str, type[Loss]] = {}


def register_loss(cls: type[Loss]) -> type[Loss]:
    """Class decorator: make ``cls.name`` a loss that ``loss.name`` in a config can choose."""
    LOSSES[cls.name] = cls
    return cls


def get_loss(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise CAQError(f"unknown loss variant {name!r}; choose one of {tuple(LOSSES)}")
    return LOSSES[name]


@register_loss
class KL(Loss):
    """KL(t || s) over the full vocabulary, no push: the KL-only objective (as in OSTQuant)."""

    name, pull, push = "kl", "full", "none"


@register_loss
class CALFull(Loss):
    """KL(t || s) + push(KL(b || s)), both over the full vocabulary."""

    name, pull, push = "cal_full", "full", "full"


@register_loss
class CALTopk(Loss):
    """The same over the teacher's top-k, renormalised over the k tokens."""

    name, pull, push, renormalize = "cal_topk", "teacher", "shared", True


@register_loss
class CALTopkPartial(Loss):
    """The same over the teacher's top-k, as partial sums of the full-vocab distributions."""

    name, pull, push, renormalize = "cal_topk_partial", "teacher", "shared", False


@register_loss
class CALTopkDisagree(Loss):
    """The same over the top-k of |z_t - z_b|, renormalised."""

    name, pull, push, renormalize = "cal_topk_disagree", "disagree", "shared", True


@register_loss
class CALPaper(Loss):
    """The paper's loss: KL(t || s) over the teacher's top-k plus push(KL(b || s)) over the top-k' of
    ``push_topk_by`` ("disagree": |z_t - z_b|, "base": z_b), each renormalised over its own ids unless
    topk_renormalize=false (AAQ's --post_attn=True partial sums). Defaults: the paper's alpha = 0.75 (its Table 3)
    and k = k' = 500 (Table 4)."""

    name, pull, push, renormalize = "cal_paper", "teacher", "own", None
    lambda_push, top_k, push_top_k = 0.75, 500, 500


@register_loss
class KLTop(CALPaper):
    """cal_paper's pull term alone: the paper's KL-top ablation, cal_paper at lambda 0."""

    name, push = "kl_top", "none"

    @classmethod
    def resolve(cls, lambda_push: float | None, top_k: int | None, push_top_k: int | None) -> dict:
        return {**super().resolve(lambda_push, top_k, push_top_k), "lambda_push": 0.0}
