"""CAQ losses: pure functions on logits (B, T, V) and hidden states (B, T, D).

L = L_recon(student, teacher block outputs) + KL(p_teacher || p_student) + push(D(p_base || p_student)),
where push is normally negative (it rewards the student for moving away from the unaligned base model).

``cal_paper`` is the paper's loss as in its official code (weesunghyun/AAQ, quant/trainer.py, loss types
``contrastive_kl_exp0_K`` / ``contrastive_kl_top_K``): the pull KL over the teacher's top-k tokens and the push KL over
a second set of k' tokens, each renormalised by a softmax of the raw logits over its own id set.

All math runs in fp32 (inputs are cast with .float()). A `mask` is (B, T), bool or 0/1, or None for all tokens;
"mean over tokens" is the mean over masked tokens. KL(p || q) = sum_v p_v (log p_v - log q_v) per token.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from caq_lightning.errors import CAQError


class LossVariant(NamedTuple):
    """What a loss variant needs and computes; the module, :mod:`caq_lightning.targets` and the loss read this.

    needs_base:  runs (or caches) the base model.
    pull:        the ids of KL(teacher || student): "full" vocab, the "teacher"'s top-k, or top-k "disagree"ment.
    push:        the ids of the push KL(base || student): "none", "full" vocab, the pull ids ("shared"), or a set of
                 its own picked by ``push_topk_by`` ("own").
    renormalize: True/False fixed by the variant; None = set by ``topk_renormalize`` (cal_paper, kl_top).
    cacheable:   runs on cached top-k targets (every top-k variant).
    sparse_head: when renormalised, needs the student's logits at the selected ids only.
    """

    needs_base: bool
    pull: Literal["full", "teacher", "disagree"]
    push: Literal["none", "full", "shared", "own"]
    renormalize: bool | None
    cacheable: bool
    sparse_head: bool


# One row per variant; a new loss is a new row (and its branch in contrastive_alignment_loss if it computes anew).
LOSSES: dict[str, LossVariant] = {
    #                               needs_base  pull        push      renormalize  cacheable  sparse_head
    "kl":                LossVariant(False,     "full",     "none",   False,       False,     False),
    "cal_full":          LossVariant(True,      "full",     "full",   False,       False,     False),
    "cal_topk":          LossVariant(True,      "teacher",  "shared", True,        True,      True),
    "cal_topk_partial":  LossVariant(True,      "teacher",  "shared", False,       True,      False),
    "cal_topk_disagree": LossVariant(True,      "disagree", "shared", True,        True,      True),
    "cal_paper":         LossVariant(True,      "teacher",  "own",    None,        True,      True),
    "kl_top":            LossVariant(False,     "teacher",  "none",   None,        True,      True),
}  # fmt: skip

LOSS_VARIANTS = tuple(LOSSES)
SPLIT_VARIANTS = tuple(name for name, v in LOSSES.items() if v.renormalize is None)  # pull and push on own id sets
PUSH_BOUNDS = ("none", "clamp", "margin")
TOPK_BY = ("teacher", "disagree")
PUSH_TOPK_BY = ("disagree", "base")  # cal_paper's push set: top-k' of |z_t - z_b| (AAQ "exp0") or of z_b (AAQ "top")
RECON_FORMS = ("relative", "mse")
# What lambda_push / top_k / push_top_k = None mean: the paper's alpha (its Table 3) and k (Table 4) for the split
# variants, this project's earlier settings for the others.
PAPER_DEFAULTS = {"lambda_push": 0.75, "top_k": 500, "push_top_k": 500}
_OTHER_DEFAULTS = {"lambda_push": 0.3, "top_k": 64, "push_top_k": None}


class TopkTargets(NamedTuple):
    """What the sparse losses need from the frozen models; small enough to cache to disk.

    index:        (B, T, k) long, vocab ids of the selected tokens (the pull set).
    teacher_logp: (B, T, k) full-vocab log_softmax(teacher_logits) gathered at `index`.
    base_logp:    (B, T, k') full-vocab log_softmax(base_logits) gathered at `push_index`, or at `index` when
                  push_index is None (one shared set); None when there is no push (kl_top).
    push_index:   (B, T, k') long, the push set of cal_paper; None for the shared-set variants.
    """

    index: Tensor
    teacher_logp: Tensor
    base_logp: Tensor | None
    push_index: Tensor | None = None


def loss_defaults(variant: str, lambda_push: float | None, top_k: int | None, push_top_k: int | None) -> dict:
    """Resolve None settings to the variant's defaults: {"lambda_push", "top_k", "push_top_k"}.

    cal_paper defaults to the paper's lambda=0.75, k=k'=500, kl_top to k=500 (its lambda is always 0), the other
    variants to lambda=0.3, k=64. push_top_k is None for the variants without a separate push set.
    """
    defaults = PAPER_DEFAULTS if variant in SPLIT_VARIANTS else _OTHER_DEFAULTS
    given = {"lambda_push": lambda_push, "top_k": top_k, "push_top_k": push_top_k}
    out = {name: defaults[name] if value is None else value for name, value in given.items()}
    if LOSSES[variant].push != "own":  # only a variant with its own push set has a k'
        out["push_top_k"] = None
    if LOSSES[variant].push == "none" and variant in SPLIT_VARIANTS:  # kl_top: cal_paper at lambda 0
        out["lambda_push"] = 0.0
    return out


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of per-token `values` (B, T) over tokens where `mask` (B, T) is set; all tokens if mask is None.

    A mask with no tokens set gives 0 (not NaN), so an all-padding batch does not poison the loss.
    """
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise CAQError(
            f"mask has shape {tuple(mask.shape)} but the tokens are {tuple(values.shape)}; pass a (B, T) mask"
        )
    mask = mask.to(device=values.device, dtype=torch.bool)
    # where (not multiply) so NaN/inf at padded positions cannot leak into the mean
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _token_kl(target_logp: Tensor, student_logp: Tensor) -> Tensor:
    """Per-token KL(p || q) from log-probs (..., V) -> (...); terms with p_v = 0 contribute 0 (0 log 0 = 0)."""
    p = target_logp.exp()
    terms = torch.where(p > 0, p * (target_logp - student_logp), torch.zeros_like(p))
    return terms.sum(-1)


def _check_logits(name: str, logits: Tensor, like: Tensor) -> None:
    if logits.shape != like.shape:
        raise CAQError(
            f"{name} has shape {tuple(logits.shape)} but student_logits is {tuple(like.shape)}; "
            "the models must share the tokenizer/vocab and see the same batch"
        )


def kl_div(target_logits: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(softmax(target) || softmax(student)) over the full vocab, mean over tokens.

    target_logits, student_logits: (B, T, V); mask: (B, T) or None. Returns a scalar.
    """
    _check_logits("target_logits", target_logits, student_logits)
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return masked_mean(_token_kl(target_logp, student_logp), mask)


def select_topk(teacher_logits: Tensor, base_logits: Tensor, k: int, by: str = "teacher") -> TopkTargets:
    """Choose k vocab ids per token and gather the full-vocab log-probs of teacher and base there.

    teacher_logits, base_logits: (B, T, V).
    by="teacher":  the teacher's top-k logits.
    by="disagree": the top-k of |z_teacher - z_base| on raw logits (where alignment changed the model most).
    Returns TopkTargets with index (B, T, k) long and teacher_logp / base_logp (B, T, k) fp32.
    """
    if by not in TOPK_BY:
        raise CAQError(f"unknown top-k selection by={by!r}; choose one of {TOPK_BY}")
    _check_same_vocab(teacher_logits, base_logits)
    _check_k("top_k", k, teacher_logits.shape[-1])
    teacher = teacher_logits.detach().float()  # targets: gradients reach the student only
    base = base_logits.detach().float()
    score = teacher if by == "teacher" else (teacher - base).abs()
    index = score.topk(k, dim=-1).indices
    teacher_logp = F.log_softmax(teacher, dim=-1).gather(-1, index)
    base_logp = F.log_softmax(base, dim=-1).gather(-1, index)
    return TopkTargets(index, teacher_logp, base_logp)


def _check_same_vocab(teacher_logits: Tensor, base_logits: Tensor) -> None:
    if base_logits.shape != teacher_logits.shape:
        raise CAQError(
            f"base_logits has shape {tuple(base_logits.shape)} but teacher_logits is {tuple(teacher_logits.shape)}; "
            "base and aligned models must share the tokenizer/vocab"
        )


def _check_k(name: str, k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise CAQError(f"{name}={k} must be between 1 and the vocab size {vocab}; lower {name}")


def select_split_topk(
    teacher_logits: Tensor, base_logits: Tensor | None, top_k: int, push_top_k: int, push_by: str = "disagree"
) -> TopkTargets:
    """cal_paper's two id sets, with the full-vocab log-probs the losses need there.

    teacher_logits, base_logits: (B, T, V); base_logits None gives the pull set only (kl_top).
    Pull set: the teacher's top-`top_k` logits. Push set: the top-`push_top_k` of |z_teacher - z_base| on raw
    logits (push_by="disagree", AAQ's contrastive_kl_exp0) or of z_base (push_by="base", AAQ's contrastive_kl_top).
    Returns TopkTargets: index, teacher_logp (B, T, k); push_index, base_logp (B, T, k') or None.
    """
    vocab = teacher_logits.shape[-1]
    _check_k("top_k", top_k, vocab)
    teacher = teacher_logits.detach().float()  # targets: gradients reach the student only
    index = teacher.topk(top_k, dim=-1).indices
    teacher_logp = F.log_softmax(teacher, dim=-1).gather(-1, index)
    if base_logits is None:
        return TopkTargets(index, teacher_logp, None)
    if push_by not in PUSH_TOPK_BY:
        raise CAQError(f"unknown push_topk_by={push_by!r}; choose one of {PUSH_TOPK_BY}")
    _check_same_vocab(teacher_logits, base_logits)
    _check_k("push_top_k", push_top_k, vocab)
    base = base_logits.detach().float()
    score = (teacher - base).abs() if push_by == "disagree" else base
    push_index = score.topk(push_top_k, dim=-1).indices
    base_logp = F.log_softmax(base, dim=-1).gather(-1, push_index)
    return TopkTargets(index, teacher_logp, base_logp, push_index)


def sparse_kl(
    target_logp: Tensor, student_logits: Tensor, index: Tensor, renormalize: bool, mask: Tensor | None = None
) -> Tensor:
    """KL(target || student) restricted to the k vocab ids in `index`, mean over tokens.

    target_logp: (B, T, k) full-vocab log-probs of the target at `index` (as in TopkTargets).
    student_logits: (B, T, V); index: (B, T, k) integer; mask: (B, T) or None. Returns a scalar.
    renormalize=True:  both distributions renormalised over the k tokens, then an exact KL over them (>= 0).
    renormalize=False: partial sum  sum_{i in index} p_i (log p_i - log q_i)  with full-vocab p, q
                       (can be negative; equals the full KL when index covers the whole vocab).
    """
    if index.shape != target_logp.shape or index.shape[:-1] != student_logits.shape[:-1]:
        raise CAQError(
            f"top-k targets have index {tuple(index.shape)} and logp {tuple(target_logp.shape)} but student_logits "
            f"is {tuple(student_logits.shape)}; the cached targets must come from this batch"
        )
    student = student_logits.float()
    # caches may store narrower ints / other devices; gather needs int64 on the logits' device
    index = index.to(device=student.device, dtype=torch.long)
    target_logp = target_logp.to(device=student.device, dtype=torch.float32)
    if renormalize:
        # log_softmax over the k values renormalises; logits and full-vocab log-probs differ by a per-token shift
        target = F.log_softmax(target_logp, dim=-1)
        student_logp = F.log_softmax(student.gather(-1, index), dim=-1)
    else:
        target = target_logp
        student_logp = F.log_softmax(student, dim=-1).gather(-1, index)
    return masked_mean(_token_kl(target, student_logp), mask)


def push_term(
    kl_base: Tensor, lambda_push: float, bound: str = "none", margin: float = 1.0, kl_teacher: Tensor | None = None
) -> Tensor:
    """The push-away-from-base term ADDED to the loss (normally <= 0). kl_base, kl_teacher: scalars.

    "none":   -lambda * kl_base                                (unbounded below; the student can diverge)
    "clamp":  -lambda * min(kl_base, margin)                   (>= -lambda * margin; no gradient past the bound)
    "margin": lambda * relu(margin - (kl_base - kl_teacher))   (hinge, >= 0: push until the base is `margin` nats
              farther from the student than the teacher is, then stop; needs kl_teacher)
    """
    if not lambda_push >= 0:  # also rejects NaN
        raise CAQError(f"lambda_push={lambda_push} must be >= 0; the sign of the push is fixed by the loss")
    if bound not in PUSH_BOUNDS:
        raise CAQError(f"unknown push bound {bound!r}; choose one of {PUSH_BOUNDS}")
    if bound == "none":
        return -lambda_push * kl_base
    if not margin >= 0:
        raise CAQError(f"margin={margin} must be >= 0 for bound={bound!r}")
    if bound == "clamp":
        return -lambda_push * kl_base.clamp(max=margin)
    if kl_teacher is None:
        raise CAQError("bound='margin' needs kl_teacher; pass it or use bound='clamp'")
    return lambda_push * F.relu(margin - (kl_base - kl_teacher))


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
    """The output-distribution part of CAQ: KL to the teacher plus the push away from the base.

    student_logits, teacher_logits, base_logits: (B, T, V); mask: (B, T) or None.
    lambda_push, top_k, push_top_k: None = the variant's default (see `loss_defaults`: the paper's 0.75 / 500 / 500
        for cal_paper and kl_top, 0.3 / 64 for the others).
    targets: precomputed TopkTargets (e.g. from a cache); when given, the top-k variants use them and
             teacher_logits / base_logits may be None.
    variant:
      "kl":                KL(t || s) full vocab (KL-only objective, as in OSTQuant); base unused
      "cal_full":          KL(t || s) + push(KL(b || s)) over the full vocab
      "cal_topk":          same over the teacher's top-k, renormalised over the k tokens
      "cal_topk_partial":  same over the teacher's top-k, partial-sum form
      "cal_topk_disagree": same over the top-k of |z_t - z_b|, renormalised
      "cal_paper":         KL(t || s) over the teacher's top-k + push(KL(b || s)) over the top-k' of `push_topk_by`
                           ("disagree": |z_t - z_b|, "base": z_b), each renormalised over its own ids
      "kl_top":            cal_paper's pull term alone (the paper's KL-top ablation = cal_paper at lambda 0)
    renormalize: cal_paper / kl_top only. False = AAQ's --post_attn=True form: full-vocab softmaxes gathered at the
        ids (partial sums, as cal_topk_partial), which every run script in AAQ's repository passes.
    Returns scalars {"loss", "kl_teacher", "kl_base", "push"} with loss = kl_teacher + push; kl_teacher (the pull) and
    kl_base (the push KL) are the (full or sparse) quantities the variant uses; kl_base and push are 0 for "kl" and
    "kl_top". Per-token KLs are averaged over the masked tokens.
    """
    if variant not in LOSS_VARIANTS:
        raise CAQError(f"unknown loss variant {variant!r}; choose one of {LOSS_VARIANTS}")
    settings = loss_defaults(variant, lambda_push, top_k, push_top_k)
    lambda_push, top_k, push_top_k = settings["lambda_push"], settings["top_k"], settings["push_top_k"]
    if not renormalize and LOSSES[variant].renormalize is not None:
        raise CAQError(f"renormalize=False applies to cal_paper/kl_top; variant {variant!r} fixes its own form")

    v = LOSSES[variant]
    with_push = v.push != "none"
    if v.renormalize is None:  # pull and push over their own id sets (cal_paper, kl_top)
        if targets is None:
            if teacher_logits is None or (with_push and base_logits is None):
                need = "teacher_logits and base_logits" if with_push else "teacher_logits"
                raise CAQError(f"variant {variant!r} needs {need}, or cached targets")
            _check_logits("teacher_logits", teacher_logits, student_logits)
            targets = select_split_topk(teacher_logits, base_logits if with_push else None, top_k, push_top_k,
                                        push_topk_by)  # fmt: skip
        else:
            _check_cached(targets, top_k, push_top_k if with_push else None)
        kl_teacher = sparse_kl(targets.teacher_logp, student_logits, targets.index, renormalize, mask)
        if not with_push:
            zero = kl_teacher.new_zeros(())
            return {"loss": kl_teacher, "kl_teacher": kl_teacher, "kl_base": zero, "push": zero}
        kl_base = sparse_kl(targets.base_logp, student_logits, targets.push_index, renormalize, mask)
    elif v.pull != "full":  # one shared top-k set
        if targets is None:
            if teacher_logits is None or base_logits is None:
                raise CAQError(f"variant {variant!r} needs teacher_logits and base_logits, or cached targets")
            _check_logits("teacher_logits", teacher_logits, student_logits)
            targets = select_topk(teacher_logits, base_logits, top_k, by=v.pull)
        else:
            _check_cached(targets, top_k, None)
        kl_teacher = sparse_kl(targets.teacher_logp, student_logits, targets.index, v.renormalize, mask)
        kl_base = sparse_kl(targets.base_logp, student_logits, targets.index, v.renormalize, mask)
    else:
        if teacher_logits is None or (with_push and base_logits is None):
            need = "teacher_logits and base_logits" if with_push else "teacher_logits"
            hint = " (cached top-k targets only serve the top-k variants)" if targets is not None else ""
            raise CAQError(
                f"variant {variant!r}: full-vocab needs live {need}{hint}; "
                "run the frozen models or pick a top-k variant"
            )
        kl_teacher = kl_div(teacher_logits, student_logits, mask)
        if not with_push:
            zero = kl_teacher.new_zeros(())
            return {"loss": kl_teacher, "kl_teacher": kl_teacher, "kl_base": zero, "push": zero}
        kl_base = kl_div(base_logits, student_logits, mask)

    push = push_term(kl_base, lambda_push, bound=bound, margin=margin, kl_teacher=kl_teacher)
    return {"loss": kl_teacher + push, "kl_teacher": kl_teacher, "kl_base": kl_base, "push": push}


def _check_cached(targets: TopkTargets, top_k: int, push_top_k: int | None) -> None:
    """Cached split targets must hold the k (and k') this run asks for."""
    if targets.index.shape[-1] != top_k:
        raise CAQError(
            f"cached targets hold k={targets.index.shape[-1]} tokens but top_k={top_k}; "
            "set top_k to match or rebuild the cache"
        )
    if push_top_k is None:
        return
    if targets.push_index is None or targets.base_logp is None:
        raise CAQError("cached targets hold no push set (built for kl_top): rebuild the cache for cal_paper")
    if targets.push_index.shape[-1] != push_top_k:
        raise CAQError(
            f"cached targets hold k'={targets.push_index.shape[-1]} push tokens but push_top_k={push_top_k}; "
            "set push_top_k to match or rebuild the cache"
        )


def block_reconstruction_loss(
    student_hiddens: Sequence[Tensor],
    teacher_hiddens: Sequence[Tensor],
    mask: Tensor | None = None,
    form: str = "relative",
) -> Tensor:
    """Mean over blocks of the per-token reconstruction error of the block outputs, over masked tokens.

    student_hiddens, teacher_hiddens: equal-length sequences of (B, T, D); mask: (B, T) or None.
    form="relative": per token ||s - t||^2 / ||t||^2 (scale-free: real residual streams carry massive activations,
                     which make the absolute error dwarf the KL terms).
    form="mse":      per token mean_d (s - t)^2.
    Per block: mean over masked tokens. Empty sequences give a 0 tensor. Returns a scalar.
    """
    if form not in RECON_FORMS:
        raise CAQError(f"unknown recon={form!r}; choose one of {RECON_FORMS}")
    if len(student_hiddens) != len(teacher_hiddens):
        raise ValueError(f"got {len(student_hiddens)} student block outputs but {len(teacher_hiddens)} teacher ones")
    if len(student_hiddens) == 0:
        return torch.zeros(())
    losses = []
    for i, (s, t) in enumerate(zip(student_hiddens, teacher_hiddens)):
        if s.shape != t.shape:
            raise ValueError(f"block {i}: student output {tuple(s.shape)} vs teacher output {tuple(t.shape)}")
        t = t.float().to(s.device)
        error = (s.float() - t).pow(2)
        if form == "mse":
            per_token = error.mean(-1)
        else:  # a zero teacher vector (never seen in practice) must not divide by 0
            per_token = error.sum(-1) / t.pow(2).sum(-1).clamp(min=torch.finfo(torch.float32).tiny)
        losses.append(masked_mean(per_token, mask))
    return torch.stack(losses).mean()
