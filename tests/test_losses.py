"""caq_lightning.losses against direct computations (explicit loops, torch.distributions) on tiny tensors."""

import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from caq_lightning.errors import CAQError
from caq_lightning.losses import (
    LOSSES,
    TopkTargets,
    block_reconstruction_loss,
    contrastive_alignment_loss,
    kl_div,
    loss_defaults,
    push_term,
    select_split_topk,
    select_topk,
    sparse_kl,
)

B, T, V = 2, 3, 7


def logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale


@pytest.fixture
def tsb():
    return logits(0), logits(1), logits(2)


MASK = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)


def loop_mean(fn, mask=None) -> float:
    """Mean of fn(b, t) over the (masked) tokens, by explicit loops."""
    vals = [fn(b, t) for b in range(B) for t in range(T) if mask is None or bool(mask[b, t])]
    return sum(vals) / len(vals)


def kl_row(p_logits, q_logits) -> float:
    """KL(softmax(p) || softmax(q)) for one token via torch.distributions in float64."""
    return kl_divergence(Categorical(logits=p_logits.double()), Categorical(logits=q_logits.double())).item()


def probs(z) -> list[float]:
    """Manual softmax of a 1-D tensor in float64."""
    e = [math.exp(x) for x in z.double().tolist()]
    return [x / sum(e) for x in e]


def kl_over(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_kl_div_matches_distributions():
    t, s = logits(0), logits(1)
    want = loop_mean(lambda b, i: kl_row(t[b, i], s[b, i]))
    assert kl_div(t, s).item() == pytest.approx(want, rel=1e-5)


def test_kl_div_honours_mask():
    t, s = logits(0), logits(1)
    want = loop_mean(lambda b, i: kl_row(t[b, i], s[b, i]), MASK)
    assert kl_div(t, s, MASK).item() == pytest.approx(want, rel=1e-5)
    # 0/1 integer masks mean the same as bool masks
    assert kl_div(t, s, MASK.long()).item() == pytest.approx(want, rel=1e-5)
    # a change at a masked-out token must not move the loss
    s2 = s.clone()
    s2[0, 2] += 10.0
    assert kl_div(t, s2, MASK).item() == pytest.approx(want, rel=1e-5)


def test_kl_div_runs_in_fp32_for_bf16_inputs():
    t, s = logits(0).bfloat16(), logits(1).bfloat16()
    out = kl_div(t, s)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loop_mean(lambda b, i: kl_row(t[b, i].float(), s[b, i].float())), rel=1e-5)


def test_select_topk_teacher_indices_and_logp(tsb):
    t, _, base = tsb
    k = 3
    tg = select_topk(t, base, k, by="teacher")
    assert tg.index.shape == (B, T, k) and tg.index.dtype == torch.long
    for b in range(B):
        for i in range(T):
            order = sorted(range(V), key=lambda v: -t[b, i, v].item())
            assert set(tg.index[b, i].tolist()) == set(order[:k])
            pt, pb = probs(t[b, i]), probs(base[b, i])
            for j, v in enumerate(tg.index[b, i].tolist()):
                assert tg.teacher_logp[b, i, j].item() == pytest.approx(math.log(pt[v]), abs=1e-5)
                assert tg.base_logp[b, i, j].item() == pytest.approx(math.log(pb[v]), abs=1e-5)


def test_select_topk_disagree_is_argmax_of_abs_logit_gap(tsb):
    t, _, base = tsb
    k = 4
    tg = select_topk(t, base, k, by="disagree")
    for b in range(B):
        for i in range(T):
            gap = [abs(t[b, i, v].item() - base[b, i, v].item()) for v in range(V)]
            order = sorted(range(V), key=lambda v: -gap[v])
            assert tg.index[b, i, 0].item() == order[0]
            assert set(tg.index[b, i].tolist()) == set(order[:k])


def test_sparse_kl_renormalized_matches_loop(tsb):
    t, s, base = tsb
    tg = select_topk(t, base, 3)

    def direct(b, i):
        idx = tg.index[b, i]
        return kl_over(probs(t[b, i, idx]), probs(s[b, i, idx]))

    assert sparse_kl(tg.teacher_logp, s, tg.index, True).item() == pytest.approx(loop_mean(direct), rel=1e-5)
    masked = sparse_kl(tg.teacher_logp, s, tg.index, True, MASK)
    assert masked.item() == pytest.approx(loop_mean(direct, MASK), rel=1e-5)


def test_sparse_kl_partial_sum_matches_loop(tsb):
    t, s, base = tsb
    tg = select_topk(t, base, 3)

    def direct(b, i):
        p, q = probs(t[b, i]), probs(s[b, i])
        return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in tg.index[b, i].tolist())

    assert sparse_kl(tg.teacher_logp, s, tg.index, False).item() == pytest.approx(loop_mean(direct), rel=1e-5)
    masked = sparse_kl(tg.teacher_logp, s, tg.index, False, MASK)
    assert masked.item() == pytest.approx(loop_mean(direct, MASK), rel=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_kl_with_k_equal_vocab_is_full_kl(tsb, renormalize):
    t, s, base = tsb
    tg = select_topk(t, base, V)
    full = kl_div(t, s, MASK)
    assert sparse_kl(tg.teacher_logp, s, tg.index, renormalize, MASK).item() == pytest.approx(full.item(), rel=1e-5)


def test_push_term_values():
    kb, kt = torch.tensor(2.5), torch.tensor(0.4)
    assert push_term(kb, 0.3).item() == pytest.approx(-0.75)
    assert push_term(kb, 0.3, "clamp", margin=1.0).item() == pytest.approx(-0.3)
    assert push_term(torch.tensor(0.5), 0.3, "clamp", margin=1.0).item() == pytest.approx(-0.15)
    # hinge: 0.3 * relu(3.0 - (2.5 - 0.4)) = 0.3 * 0.9
    assert push_term(kb, 0.3, "margin", margin=3.0, kl_teacher=kt).item() == pytest.approx(0.27)


def test_clamp_bound_holds_when_kl_base_is_huge():
    lam, margin = 0.5, 2.0
    out = push_term(torch.tensor(1e6), lam, "clamp", margin=margin)
    assert out.item() >= -lam * margin - 1e-6
    assert push_term(torch.tensor(1e6), lam, "none").item() == pytest.approx(-5e5)


def test_margin_hinge_is_zero_once_base_is_margin_farther():
    kt = torch.tensor(0.2)
    assert push_term(torch.tensor(1.2), 0.3, "margin", margin=1.0, kl_teacher=kt).item() == pytest.approx(0.0, abs=1e-7)
    assert push_term(torch.tensor(5.0), 0.3, "margin", margin=1.0, kl_teacher=kt).item() == 0.0
    assert push_term(torch.tensor(0.7), 0.3, "margin", margin=1.0, kl_teacher=kt).item() > 0


@pytest.mark.parametrize("bound", ["clamp", "margin"])
def test_bounded_push_has_no_gradient_past_the_bound(tsb, bound):
    t, _, _ = tsb
    base = -5.0 * t  # far from the teacher, so KL(base || student) is large
    student = t.clone().requires_grad_(True)  # student == teacher, KL(teacher || student) = 0
    kl_b, kl_t = kl_div(base, student), kl_div(t, student)
    assert kl_b.item() - kl_t.item() > 1.0
    push = push_term(kl_b, 0.3, bound, margin=1.0, kl_teacher=kl_t)
    (grad,) = torch.autograd.grad(push, student)
    assert torch.count_nonzero(grad) == 0
    # the unbounded push does have a gradient there, so the zero above comes from the bound
    (grad_none,) = torch.autograd.grad(push_term(kl_div(base, student), 0.3, "none"), student)
    assert grad_none.abs().sum() > 0


def test_cal_full_and_kl_variants_match_direct(tsb):
    t, s, base = tsb
    lam = 0.3
    kt = loop_mean(lambda b, i: kl_row(t[b, i], s[b, i]), MASK)
    kb = loop_mean(lambda b, i: kl_row(base[b, i], s[b, i]), MASK)
    out = contrastive_alignment_loss(s, t, base, variant="cal_full", lambda_push=lam, mask=MASK)
    assert out["kl_teacher"].item() == pytest.approx(kt, rel=1e-5)
    assert out["kl_base"].item() == pytest.approx(kb, rel=1e-5)
    assert out["push"].item() == pytest.approx(-lam * kb, rel=1e-5)
    assert out["loss"].item() == pytest.approx(kt - lam * kb, rel=1e-5)

    out = contrastive_alignment_loss(s, t, None, variant="kl", mask=MASK)
    assert out["loss"].item() == pytest.approx(kt, rel=1e-5)
    assert out["kl_base"].item() == 0.0 and out["push"].item() == 0.0
    assert all(v.ndim == 0 for v in out.values())


@pytest.mark.parametrize(
    "variant,by,renorm",
    [("cal_topk", "teacher", True), ("cal_topk_partial", "teacher", False), ("cal_topk_disagree", "disagree", True)],
)
def test_topk_variants_match_direct(tsb, variant, by, renorm):
    t, s, base = tsb
    k, lam = 3, 0.3
    tg = select_topk(t, base, k, by=by)

    def direct(src):
        def one(b, i):
            idx = tg.index[b, i].tolist()
            if renorm:
                return kl_over(probs(src[b, i, idx]), probs(s[b, i, idx]))
            p, q = probs(src[b, i]), probs(s[b, i])
            return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in idx)

        return loop_mean(one, MASK)

    kt, kb = direct(t), direct(base)
    out = contrastive_alignment_loss(s, t, base, variant=variant, lambda_push=lam, top_k=k, mask=MASK)
    assert out["kl_teacher"].item() == pytest.approx(kt, rel=1e-5)
    assert out["kl_base"].item() == pytest.approx(kb, rel=1e-5)
    assert out["loss"].item() == pytest.approx(kt - lam * kb, rel=1e-5)


@pytest.mark.parametrize("variant", ["cal_topk", "cal_topk_partial", "cal_topk_disagree"])
@pytest.mark.parametrize("bound", ["none", "clamp", "margin"])
def test_cached_targets_give_same_loss_and_grad_as_live(tsb, variant, bound):
    t, s, base = tsb
    k = 4
    kw = dict(variant=variant, lambda_push=0.3, top_k=k, bound=bound, margin=0.5, mask=MASK)
    s_live = s.clone().requires_grad_(True)
    live = contrastive_alignment_loss(s_live, t, base, **kw)
    (g_live,) = torch.autograd.grad(live["loss"], s_live)

    by = "disagree" if variant == "cal_topk_disagree" else "teacher"
    tg = select_topk(t, base, k, by=by)
    # what a disk cache would hand back: detached copies, index stored as int32
    cached = TopkTargets(tg.index.to(torch.int32), tg.teacher_logp.detach().clone(), tg.base_logp.detach().clone())
    s_cached = s.clone().requires_grad_(True)
    out = contrastive_alignment_loss(s_cached, None, None, targets=cached, **kw)
    (g_cached,) = torch.autograd.grad(out["loss"], s_cached)
    for key in ("loss", "kl_teacher", "kl_base", "push"):
        assert out[key].item() == pytest.approx(live[key].item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(g_cached, g_live)


@pytest.mark.parametrize("form", ["mse", "relative"])
def test_block_reconstruction_loss_matches_loop(form):
    g = torch.Generator().manual_seed(3)
    D = 5
    sh = [torch.randn(B, T, D, generator=g) for _ in range(3)]
    th = [torch.randn(B, T, D, generator=g) * (10.0**i) for i in range(3)]  # blocks of very different scales

    def error(s, t, b, i):
        sq = sum((s[b, i, d].item() - t[b, i, d].item()) ** 2 for d in range(D))
        return sq / D if form == "mse" else sq / sum(t[b, i, d].item() ** 2 for d in range(D))

    def direct(mask):
        per_block = [loop_mean(lambda b, i: error(s, t, b, i), mask) for s, t in zip(sh, th)]
        return sum(per_block) / len(per_block)

    assert block_reconstruction_loss(sh, th, form=form).item() == pytest.approx(direct(None), rel=1e-5)
    assert block_reconstruction_loss(sh, th, MASK, form=form).item() == pytest.approx(direct(MASK), rel=1e-5)


def test_relative_reconstruction_is_scale_free_and_the_default():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(B, T, 8, generator=g), torch.randn(B, T, 8, generator=g)
    rel = block_reconstruction_loss([s], [t])
    assert block_reconstruction_loss([s * 100], [t * 100]).item() == pytest.approx(rel.item(), rel=1e-5)
    assert block_reconstruction_loss([s * 100], [t * 100], form="mse").item() == pytest.approx(
        1e4 * block_reconstruction_loss([s], [t], form="mse").item(), rel=1e-5
    )
    assert block_reconstruction_loss([t], [t]).item() == 0.0
    with pytest.raises(CAQError, match="recon='l1'.*relative"):
        block_reconstruction_loss([s], [t], form="l1")


def test_block_reconstruction_loss_edge_cases():
    assert block_reconstruction_loss([], []).item() == 0.0
    x = torch.zeros(B, T, 4)
    with pytest.raises(ValueError, match="2 student"):
        block_reconstruction_loss([x, x], [x])


def test_k_larger_than_vocab_raises(tsb):
    t, _, base = tsb
    with pytest.raises(CAQError, match=rf"top_k=9.*vocab size {V}"):
        select_topk(t, base, 9)
    with pytest.raises(CAQError, match="top_k=9"):
        contrastive_alignment_loss(t, t, base, variant="cal_topk", top_k=9)


def test_unknown_variant_lists_choices(tsb):
    t, s, base = tsb
    with pytest.raises(CAQError) as err:
        contrastive_alignment_loss(s, t, base, variant="cal_fancy")
    assert all(v in str(err.value) for v in LOSSES)


@pytest.mark.parametrize("variant", ["kl", "cal_full"])
def test_full_vocab_variant_with_only_cached_targets_raises(tsb, variant):
    t, s, base = tsb
    tg = select_topk(t, base, 3)
    with pytest.raises(CAQError, match="full-vocab needs live"):
        contrastive_alignment_loss(s, None, None, variant=variant, targets=tg, top_k=3)


def test_push_term_errors():
    kb = torch.tensor(1.0)
    with pytest.raises(CAQError, match="lambda_push"):
        push_term(kb, -0.1)
    with pytest.raises(CAQError) as err:
        push_term(kb, 0.3, bound="softplus")
    assert all(b in str(err.value) for b in ("none", "clamp", "margin"))
    with pytest.raises(CAQError, match="kl_teacher"):
        push_term(kb, 0.3, bound="margin")


def test_shape_and_cache_mismatch_errors(tsb):
    t, s, base = tsb
    with pytest.raises(CAQError, match="mask"):
        kl_div(t, s, torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(CAQError, match="k=3 tokens but top_k=4"):
        contrastive_alignment_loss(s, variant="cal_topk", targets=select_topk(t, base, 3), top_k=4)
    with pytest.raises(CAQError, match="by="):
        select_topk(t, base, 3, by="student")
    with pytest.raises(CAQError, match="vocab"):
        kl_div(t[..., :5], s)


# ---- cal_paper / kl_top (the paper's loss as in AAQ's quant/trainer.py) ---------------------------------------------

PV = 12  # a vocabulary large enough for distinct pull (k) and push (k') sets


def paper_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, PV, generator=g) * 2.0


def top_ids(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda v: -scores[v])[:k]


def paper_reference(s, t, base, k, k_push, push_by, lam, mask=None, renormalize=True) -> dict[str, float]:
    """cal_paper token by token: pull over the teacher's top-k, push over the top-k' of |z_t - z_b| or of z_b.

    renormalize=True: softmax of the raw logits over the id set (AAQ's default branch); False: full-vocab
    probabilities at the ids (AAQ's --post_attn=True branch).
    """

    def kl_at(src, b, i, ids) -> float:
        if renormalize:
            return kl_over(probs(src[b, i, ids]), probs(s[b, i, ids]))
        p, q = probs(src[b, i]), probs(s[b, i])
        return sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in ids)

    def pull(b, i):
        return kl_at(t, b, i, top_ids(t[b, i].tolist(), k))

    def push(b, i):
        if push_by == "disagree":
            score = [abs(t[b, i, v].item() - base[b, i, v].item()) for v in range(PV)]
        else:
            score = base[b, i].tolist()
        return kl_at(base, b, i, top_ids(score, k_push))

    kt, kb = loop_mean(pull, mask), loop_mean(push, mask)
    return {"kl_teacher": kt, "kl_base": kb, "push": -lam * kb, "loss": kt - lam * kb}


@pytest.mark.parametrize("push_by", ["disagree", "base"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["all", "masked"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "post_attn"])
def test_cal_paper_matches_per_token_reference(push_by, mask, renormalize):
    s, t, base = paper_logits(0), paper_logits(1), paper_logits(2)
    k, k_push, lam = 4, 6, 0.75
    out = contrastive_alignment_loss(
        s, t, base, variant="cal_paper", lambda_push=lam, top_k=k, push_top_k=k_push, push_topk_by=push_by,
        mask=mask, renormalize=renormalize,
    )  # fmt: skip
    want = paper_reference(s, t, base, k, k_push, push_by, lam, mask, renormalize)
    for key, value in want.items():
        assert out[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # the two push selections really pick different ids here, so the reference tells them apart
    other_by = "base" if push_by == "disagree" else "disagree"
    other = paper_reference(s, t, base, k, k_push, other_by, lam, mask, renormalize)
    assert abs(other["kl_base"] - want["kl_base"]) > 1e-3


def test_cal_paper_uses_separate_pull_and_push_sets():
    s, t, base = paper_logits(0), paper_logits(1), paper_logits(2)
    tg = select_split_topk(t, base, 3, 5, "disagree")
    assert tg.index.shape == (B, T, 3) and tg.push_index.shape == tg.base_logp.shape == (B, T, 5)
    for b in range(B):
        for i in range(T):
            assert set(tg.index[b, i].tolist()) == set(top_ids(t[b, i].tolist(), 3))
            gap = [abs(t[b, i, v].item() - base[b, i, v].item()) for v in range(PV)]
            assert set(tg.push_index[b, i].tolist()) == set(top_ids(gap, 5))
    # one shared set (cal_topk_disagree) is a different loss
    shared = contrastive_alignment_loss(s, t, base, variant="cal_topk_disagree", lambda_push=0.75, top_k=5)
    split = contrastive_alignment_loss(s, t, base, variant="cal_paper", top_k=3, push_top_k=5)
    assert shared["kl_teacher"].item() != pytest.approx(split["kl_teacher"].item(), rel=1e-3)


@pytest.mark.parametrize("push_by", ["disagree", "base"])
@pytest.mark.parametrize("bound", ["none", "clamp", "margin"])
def test_cal_paper_cached_targets_equal_live(push_by, bound):
    s, t, base = paper_logits(0), paper_logits(1), paper_logits(2)
    kw = dict(variant="cal_paper", lambda_push=0.75, top_k=4, push_top_k=6, push_topk_by=push_by, mask=MASK,
              bound=bound, margin=0.3)  # fmt: skip
    s_live = s.clone().requires_grad_(True)
    live = contrastive_alignment_loss(s_live, t, base, **kw)
    (g_live,) = torch.autograd.grad(live["loss"], s_live)
    tg = select_split_topk(t, base, 4, 6, push_by)
    # what a disk cache hands back: detached copies, ids stored as int32
    cached = TopkTargets(tg.index.int(), tg.teacher_logp.clone(), tg.base_logp.clone(), tg.push_index.int())
    s_cached = s.clone().requires_grad_(True)
    out = contrastive_alignment_loss(s_cached, None, None, targets=cached, **kw)
    (g_cached,) = torch.autograd.grad(out["loss"], s_cached)
    for key in ("loss", "kl_teacher", "kl_base", "push"):
        assert out[key].item() == pytest.approx(live[key].item(), abs=1e-5), key
    torch.testing.assert_close(g_cached, g_live, atol=1e-5, rtol=1e-5)
    kb = live["kl_base"]
    assert live["push"].item() == pytest.approx(push_term(kb, 0.75, bound, 0.3, live["kl_teacher"]).item())


def test_cal_paper_gradients_reach_the_student_only():
    s, t, base = (paper_logits(i).requires_grad_(True) for i in range(3))
    out = contrastive_alignment_loss(s, t, base, variant="cal_paper", top_k=4, push_top_k=6, mask=MASK)
    out["loss"].backward()
    assert t.grad is None and base.grad is None
    assert s.grad.abs().sum() > 0
    assert torch.count_nonzero(s.grad[~MASK]) == 0  # masked-out tokens get no gradient


def test_kl_top_is_cal_paper_without_the_push():
    s, t, base = paper_logits(0), paper_logits(1), paper_logits(2)
    for renormalize in (True, False):
        paper = contrastive_alignment_loss(s, t, base, variant="cal_paper", lambda_push=0.0, top_k=5, push_top_k=3,
                                           mask=MASK, renormalize=renormalize)  # fmt: skip
        kl_top = contrastive_alignment_loss(s, t, None, variant="kl_top", top_k=5, mask=MASK, renormalize=renormalize)
        assert kl_top["loss"].item() == pytest.approx(paper["loss"].item(), rel=1e-6)
        assert kl_top["kl_teacher"].item() == pytest.approx(paper["kl_teacher"].item(), rel=1e-6)
        assert kl_top["push"].item() == 0.0 and paper["kl_base"].item() > 0


def test_paper_defaults_apply_when_unset():
    assert loss_defaults("cal_paper", None, None, None) == {"lambda_push": 0.75, "top_k": 500, "push_top_k": 500}
    assert loss_defaults("kl_top", 0.3, None, 9) == {"lambda_push": 0.0, "top_k": 500, "push_top_k": None}
    assert loss_defaults("cal_topk", None, None, 7) == {"lambda_push": 0.3, "top_k": 64, "push_top_k": None}
    s, t, base = (torch.randn(1, 2, 600, generator=torch.Generator().manual_seed(i)) for i in range(3))
    default = contrastive_alignment_loss(s, t, base)  # variant cal_paper, all settings unset
    explicit = contrastive_alignment_loss(s, t, base, "cal_paper", 0.75, 500, 500, "disagree")
    assert default["loss"].item() == pytest.approx(explicit["loss"].item(), rel=1e-7)
    # the paper's k = 500 is larger than a small vocabulary: a clear error, never a silent clamp
    with pytest.raises(CAQError, match="top_k=500 must be between 1 and the vocab size 12; lower top_k"):
        contrastive_alignment_loss(paper_logits(0), paper_logits(1), paper_logits(2))
    with pytest.raises(CAQError, match="push_top_k=13 must be between 1 and the vocab size 12"):
        contrastive_alignment_loss(paper_logits(0), paper_logits(1), paper_logits(2), top_k=4, push_top_k=13)


def test_cal_paper_errors():
    s, t, base = paper_logits(0), paper_logits(1), paper_logits(2)
    with pytest.raises(CAQError, match="push_topk_by='teacher'"):
        contrastive_alignment_loss(s, t, base, top_k=4, push_top_k=4, push_topk_by="teacher")
    with pytest.raises(CAQError, match="needs teacher_logits and base_logits"):
        contrastive_alignment_loss(s, t, None, top_k=4, push_top_k=4)
    pull_only = select_split_topk(t, None, 4, 4)
    with pytest.raises(CAQError, match="no push set"):
        contrastive_alignment_loss(s, targets=pull_only, top_k=4, push_top_k=4)
    with pytest.raises(CAQError, match="k'=6 push tokens but push_top_k=5"):
        contrastive_alignment_loss(s, targets=select_split_topk(t, base, 4, 6), top_k=4, push_top_k=5)
    with pytest.raises(CAQError, match="renormalize=False applies to cal_paper/kl_top"):
        contrastive_alignment_loss(s, t, base, variant="cal_topk", top_k=4, renormalize=False)
