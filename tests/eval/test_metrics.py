"""caq_lightning.eval.metrics against direct computations on small tensors and a tiny real tokenizer."""

import math

import pytest
import torch

from caq_lightning.errors import CAQError
from caq_lightning.eval.metrics import MeanKL, Perplexity, RefusalLogOdds, RefusalRate, perplexity_windows
from caq_lightning.eval.refusal import is_refusal

RESPONSES = [
    "I'm sorry, but I can't help with that.",
    "Sure, here is how you bake bread: mix flour and water.",
    "As an AI, I cannot provide that information.",
    "The capital of France is Paris.",
    "I must decline this request.",
]


def test_refusal_rate_matches_direct_count_over_updates():
    metric = RefusalRate()
    metric.update(RESPONSES[:2])
    metric.update(RESPONSES[2:])
    expected = sum(is_refusal(r) for r in RESPONSES) / len(RESPONSES)
    assert metric.compute().item() == pytest.approx(expected)
    assert expected == pytest.approx(3 / 5)


def test_refusal_rate_uses_custom_keywords():
    metric = RefusalRate(keywords=["Paris", "bread"])
    metric.update(RESPONSES)
    assert metric.compute().item() == pytest.approx(2 / 5)


def test_refusal_rate_rejects_a_bare_string():
    with pytest.raises(CAQError, match="list"):
        RefusalRate().update("I'm sorry")


def test_refusal_logodds_is_the_pooled_mean():
    metric = RefusalLogOdds()
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0])
    metric.update(a)
    metric.update(b)
    assert metric.compute().item() == pytest.approx(torch.cat([a, b]).mean().item())


def _direct_kl(logits, ref_logits, mask):
    """sum_v p_ref (log p_ref - log p_model), averaged over unmasked tokens, by explicit probabilities."""
    p_ref = ref_logits.softmax(-1)
    per_token = (p_ref * (p_ref.log() - logits.softmax(-1).log())).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def test_mean_kl_matches_direct_formula_with_mask_over_two_updates():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 3, 5, 11, generator=g).unbind(0)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    metric = MeanKL()
    metric.update(logits[:2], ref[:2], mask[:2])
    metric.update(logits[2:], ref[2:], mask[2:])
    assert metric.compute().item() == pytest.approx(_direct_kl(logits, ref, mask).item(), rel=1e-5)


def test_mean_kl_direction_is_ref_to_model_and_zero_for_identical():
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(2, 2, 4, 7, generator=g).unbind(0)
    logits = logits * 3  # sharper model: KL(ref||model) != KL(model||ref)
    ones = torch.ones(2, 4)
    forward, reverse, same = MeanKL(), MeanKL(), MeanKL()
    forward.update(logits, ref)
    reverse.update(ref, logits)
    same.update(ref, ref)
    assert forward.compute().item() == pytest.approx(_direct_kl(logits, ref, ones).item(), rel=1e-5)
    assert abs(forward.compute().item() - reverse.compute().item()) > 1e-3
    assert same.compute().item() == pytest.approx(0.0, abs=1e-7)


def test_mean_kl_rejects_mismatched_vocab():
    with pytest.raises(CAQError, match="tokenizer"):
        MeanKL().update(torch.randn(1, 2, 5), torch.randn(1, 2, 6))


def test_perplexity_is_exp_of_mean_token_nll():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 13, generator=g)
    target = torch.randint(13, (3, 6), generator=g)
    metric = Perplexity()
    metric.update(logits[:1], target[:1])
    metric.update(logits[1:], target[1:])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), target.reshape(-1))
    assert metric.compute().item() == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_perplexity_windows_are_consecutive_token_ids(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = perplexity_windows(tiny_tokenizer, text, seq_len=16, max_windows=5)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
    assert windows.flatten().tolist() == ids[:80]
    all_windows = perplexity_windows(tiny_tokenizer, text, seq_len=16, max_windows=None)
    assert all_windows.shape == (len(ids) // 16, 16)


def test_perplexity_windows_rejects_text_shorter_than_a_window(tiny_tokenizer):
    with pytest.raises(CAQError, match="fewer than one window"):
        perplexity_windows(tiny_tokenizer, "short text", seq_len=256)


def test_perplexity_windows_on_wikitext2_test(tiny_tokenizer, shared_data):
    path = shared_data / "wikitext-2" / "test.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 test split not found at {path} (set CAQ_DATA_DIR)")
    windows = perplexity_windows(tiny_tokenizer, path.read_text(encoding="utf-8"), seq_len=128, max_windows=4)
    assert windows.shape == (4, 128)
    assert int(windows.max()) < len(tiny_tokenizer)
