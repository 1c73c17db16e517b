"""The math of the CAQ losses: pure functions on logits (B, T, V) and hidden states (B, T, D).

L = L_recon(student, teacher block outputs) + KL(p_teacher || p_student) + push(D(p_base || p_student)),
where push is normally negative (it rewards the student for moving away from the unaligned base model). Which ids
each KL runs over is a loss variant's business (:mod:`caq_lightning.losses.variants`); :func:`select_targets`
picks them.

All math runs in fp32 (inputs are cast with .float()). A `mask` is (B, T), bool or 0/1, or None for all tokens;
"mean over tokens" is the mean over masked tokens. KL(p || q) = sum_v p_v (log p_v - log q_v) per token.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from caq_lightning.errors import CAQError


PUSH_BOUNDS = ("none", "clamp", "margin")
TOPK_BY = ("teacher", "disagree")
PUSH_TOPK_BY = ("disagree", "base")  # cal_paper's push set: top-k' of |z_t - z_b| (AAQ "exp0") or of z_b (AAQ "top")
RECON_FORMS = ("relative", "mse")


class Selection(NamedTuple):
    """Which vocab ids a top-k loss reads, and so what a target cache must hold.

    k, by:           the pull set: the top-k of the teacher's logits ("teacher") or of |z_t - z_b| ("disagree").
    push_k, push_by: the push set: "same" (base log-probs at the pull ids; push_k = k), "none" (no base; push_k = 0)
                     or a set of its own, the top-push_k of |z_t - z_b| ("disagree") or of z_b ("base").
    """

    k: int
    by: str
    push_k: int
    push_by: str

    @property
    def reads_base(self) -> bool:
        return self.by == "disagree" or self.push_by != "none"


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


def check_logits(name: str, logits: Tensor, like: Tensor) -> None:
    if logits.shape != like.shape:
        raise CAQError(
            f"{name} has shape {tuple(logits.shape)} but student_logits is {tuple(like.shape)}; "
            "the models must share the tokenizer/vocab and see the same batch"
        )


def kl_div(target_logits: Tensor, student_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(softmax(target) || softmax(student)) over the full vocab, mean over tokens.

    target_logits, student_logits: (B, T, V); mask: (B, T) or None. Returns a scalar.
    """
    check_logits("target_logits", target_logits, student_logits)
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return masked_mean(_token_kl(target_logp, student_logp), mask)


def select_targets(teacher_logits: Tensor, base_logits: Tensor | None, selection: Selection) -> TopkTargets:
    """Choose the pull (and push) ids of ``selection`` per token and gather the full-vocab log-probs there.

    teacher_logits, base_logits: (B, T, V); base_logits may be None when the selection reads no base (push_by
    "none" with the teacher's top-k). Returns TopkTargets: index, teacher_logp (B, T, k); base_logp at the pull ids
    ("same") or at push_index (B, T, k') (a set of its own); None where the selection has no push.
    """
    k, by, push_k, push_by = selection
    if by not in TOPK_BY:
        raise CAQError(f"unknown top-k selection by={by!r}; choose one of {TOPK_BY}")
    if push_by not in ("same", "none", *PUSH_TOPK_BY):
        raise CAQError(f"unknown push_topk_by={push_by!r}; choose one of {PUSH_TOPK_BY}")
    vocab = teacher_logits.shape[-1]
    base = None
    if selection.reads_base:
        _check_same_vocab(teacher_logits, base_logits)
        base = base_logits.detach().float()
    _check_k("top_k", k, vocab)
    teacher = teacher_logits.detach().float()  # targets: gradients reach the student only
    score = teacher if by == "teacher" else (teacher - base).abs()
    index = score.topk(k, dim=-1).indices
    teacher_logp = F.log_softmax(teacher, dim=-1).gather(-1, index)
    if push_by == "none":
        return TopkTargets(index, teacher_logp, None)
    if push_by == "same":
        return TopkTargets(index, teacher_logp, F.log_softmax(base, dim=-1).gather(-1, index))
    _check_k("push_top_k", push_k, vocab)
    score = (teacher - base).abs() if push_by == "disagree" else base
    push_index = score.topk(push_k, dim=-1).indices
    return TopkTargets(index, teacher_logp, F.log_softmax(base, dim=-1).gather(-1, push_index), push_index)


def _check_same_vocab(teacher_logits: Tensor, base_logits: Tensor | None) -> None:
    if base_logits is None:
        raise CAQError("this top-k selection reads the base model's logits: pass base_logits")
    if base_logits.shape != teacher_logits.shape:
        raise CAQError(
            f"base_logits has shape {tuple(base_logits.shape)} but teacher_logits is {tuple(teacher_logits.shape)}; "
            "base and aligned models must share the tokenizer/vocab"
        )


def _check_k(name: str, k: int, vocab: int) -> None:
    if not 1 <= k <= vocab:
        raise CAQError(f"{name}={k} must be between 1 and the vocab size {vocab}; lower {name}")


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


def check_cached(targets: TopkTargets, top_k: int, push_top_k: int | None) -> None:
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
