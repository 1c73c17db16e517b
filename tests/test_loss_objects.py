"""Losses as objects: a variant is one registered class whose defaults resolve once; live and cached targets feed
the same object; LossTerms carries named fields, which DivergenceGuard reads."""

import pytest
import torch
import torch.nn.functional as F

from callbacks.divergence_guard import DivergenceGuard
from caq_lightning.config import LossConfig
from caq_lightning.errors import CAQError
from caq_lightning.losses import LOSSES, LogitTargets, Loss, LossTerms, register_loss, select_targets, sparse_kl
from caq_lightning.targets import CachedTargets, LiveTargets, target_source


@pytest.fixture
def disagree_split():
    """A variant the table never had, in one class: cal_paper's two id sets with the pull set by disagreement."""

    @register_loss
    class DisagreeSplit(Loss):
        name, pull, push, renormalize = "test_disagree_split", "disagree", "own", True
        lambda_push, top_k, push_top_k = 0.5, 4, 5

    yield DisagreeSplit
    LOSSES.pop(DisagreeSplit.name)


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(seed)) * 2


def test_a_new_loss_is_one_class(disagree_split):
    config = LossConfig(name="test_disagree_split").resolved()  # a registered class is a loss.name choice
    assert (config.lambda_push, config.top_k, config.push_top_k) == (0.5, 4, 5)  # its class defaults, resolved once
    loss = config.build()
    student, teacher, base = _logits(0).requires_grad_(), _logits(1), _logits(2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    live = loss(student, LogitTargets(teacher, base), mask)
    # by hand: pull over the top-4 of |z_t - z_b|, push over the top-5 of the same score, both renormalised
    gap = (teacher - base).abs()
    pull, push = gap.topk(4).indices, gap.topk(5).indices
    kl_teacher = sparse_kl(F.log_softmax(teacher, -1).gather(-1, pull), student, pull, True, mask)
    kl_base = sparse_kl(F.log_softmax(base, -1).gather(-1, push), student, push, True, mask)
    torch.testing.assert_close(live.kl_teacher, kl_teacher, rtol=0, atol=0)
    torch.testing.assert_close(live.kl_base, kl_base, rtol=0, atol=0)
    torch.testing.assert_close(live.loss, kl_teacher - 0.5 * kl_base, rtol=0, atol=0)  # kl_weight 1, no recon
    cached = loss(student, select_targets(teacher, base, loss.selection()), mask)  # the cache's form of targets
    assert all(torch.equal(a, b) for a, b in zip(live, cached))
    cacheable = LossConfig(name="test_disagree_split", recon_weight=0.0).build()
    assert isinstance(target_source("cached", cacheable), CachedTargets)  # a top-k variant runs on cached targets


def test_unknown_and_full_vocab_losses_are_refused_where_they_cannot_run():
    with pytest.raises(CAQError, match="unknown loss 'cal_fancy': choose one of kl, cal_full, cal_topk"):
        LossConfig(name="cal_fancy")
    with pytest.raises(CAQError, match="loss 'kl' uses the full vocabulary, which cached top-k targets do not hold"):
        target_source("cached", LossConfig(name="kl", recon_weight=0.0).build())
    with pytest.raises(CAQError, match="precomputing targets needs targets.kind=cached"):
        LiveTargets().precompute(None, [])


def test_divergence_guard_reads_the_terms_fields():
    guard = DivergenceGuard(max_push=3.0, max_kl_base=8.0)
    terms = dict(loss=0.1, kl_teacher=0.2, kl_base=2.0, push=-0.1, cal=0.1, recon=0.0)
    assert guard.problem(LossTerms(**terms)) is None
    assert guard.problem(LossTerms(**{**terms, "push": -4.0})) == "push=-4 ran past -max_push=-3"
    assert guard.problem(LossTerms(**{**terms, "kl_base": 9.0})) == "kl_base=9 ran past max_kl_base=8"
    assert guard.problem(LossTerms(**{**terms, "recon": float("nan")})) == "loss term recon is not finite"
    with pytest.raises(CAQError, match="DivergenceGuard reads the loss terms a CAQModule's training_step returns"):
        guard.on_train_batch_end(None, None, torch.tensor(0.0), None, 0)
