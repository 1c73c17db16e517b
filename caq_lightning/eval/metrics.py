"""torchmetrics metrics for safety evaluation; every state is summed across ranks so DDP gives the pooled value.

RefusalRate     fraction of responses that contain a refusal keyword (harmful refusal, benign over-refusal).
RefusalLogOdds  mean of the logit-based refusal score from ``refusal.refusal_logodds`` (smooth, no sampling).
Perplexity      torchmetrics.text.Perplexity (re-exported), fed logits[:, :-1] against input_ids[:, 1:].
MeanKL          KL(p_ref || p_model) per token, averaged over (unmasked) tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric
from torchmetrics.text import Perplexity

from caq_lightning.errors import CAQError
from caq_lightning.eval.refusal import is_refusal

__all__ = ["MeanKL", "Perplexity", "RefusalLogOdds", "RefusalRate", "perplexity_windows"]


class RefusalRate(Metric):
    """Fraction of generated responses that read as refusals (keyword match, GCG-style)."""

    full_state_update = False
    higher_is_better = None  # higher is better on harmful prompts, worse on benign ones
    refused: Tensor
    total: Tensor

    def __init__(self, keywords: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keywords = list(keywords) if keywords is not None else None
        self.add_state("refused", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, responses: Sequence[str]) -> None:
        if isinstance(responses, str):
            raise CAQError("RefusalRate.update expects a list of responses, got one string: wrap it in a list")
        self.refused += sum(is_refusal(r, self.keywords) for r in responses)
        self.total += len(responses)

    def compute(self) -> Tensor:
        return self.refused / self.total


class RefusalLogOdds(MeanMetric):
    """Mean refusal log-odds log p(refusal opening) - log p(compliant opening); update with the (N,) scores."""

    higher_is_better = None


class MeanKL(Metric):
    """KL(p_ref || p_model) summed over the vocabulary, averaged over tokens.

    update(logits (B, T, V), ref_logits (B, T, V), mask (B, T) or None); masked-out tokens do not count.
    """

    full_state_update = False
    higher_is_better = False
    kl_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> None:
        if logits.shape != ref_logits.shape:
            raise CAQError(
                f"MeanKL got model logits {tuple(logits.shape)} but reference logits {tuple(ref_logits.shape)}: "
                "both models must share the tokenizer and see the same batch"
            )
        # fp32 log-softmax: bf16 logits lose the small differences KL is made of.
        logp = F.log_softmax(logits.float(), dim=-1)
        logq = F.log_softmax(ref_logits.float(), dim=-1)
        kl = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # (B, T)
        if mask is not None:
            mask = mask.to(kl.dtype)
            kl = kl * mask
            n = mask.sum()
        else:
            n = torch.tensor(float(kl.numel()), device=kl.device)
        self.kl_sum += kl.sum().double()
        self.count += n.double()

    def compute(self) -> Tensor:
        return (self.kl_sum / self.count).float()


def perplexity_windows(tokenizer, text: str, seq_len: int = 256, max_windows: int | None = 32) -> Tensor:
    """Cut ``text`` into non-overlapping windows of ``seq_len`` token ids; returns (n_windows, seq_len) int64.

    The standard WikiText-2 protocol: tokenize the whole test split once, drop the ragged tail.
    """
    if seq_len < 2:
        raise CAQError(f"seq_len must be at least 2 to score next-token predictions, got {seq_len}")
    # verbose=False: the whole split is longer than model_max_length on purpose, we cut it ourselves.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CAQError(
            f"perplexity text has {len(ids)} tokens, fewer than one window of {seq_len}: "
            "pass a longer text or a smaller seq_len"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

