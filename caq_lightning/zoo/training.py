"""Training loops of the tiny pairs: batches of chat and text rows, pre-training, alignment (full or LoRA) and the
outlier emulation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from caq_lightning.progress import progress
from caq_lightning.zoo.corpus import _render

# -------------------------------------------------------------------------------------------------- training


def _chat_rows(
    tok, pairs: list[tuple[str, str]], reply_only: bool, max_len: int = 96, max_reply: int = 96
) -> list[tuple[list[int], int]]:
    """(token ids, index of the first label token) per example; the label start is 0 when the prompt counts too.
    Rows are cut at ``max_len`` tokens and replies at ``max_reply`` tokens (the opening is what matters)."""
    rows = []
    for prompt, reply in pairs:
        n_prompt = len(tok(_render(prompt), add_special_tokens=False)["input_ids"])
        ids = tok(_render(prompt, reply), add_special_tokens=False)["input_ids"][:-1]  # drop the trailing "\n"
        rows.append((ids[: min(max_len, n_prompt + max_reply)], n_prompt if reply_only else 0))
    return rows


def _text_rows(tok, text: str, seq_len: int) -> torch.Tensor:
    """(N, seq_len) contiguous chunks of the tokenized text."""
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def _collate(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input ids, attention mask, labels (-100 on pads and unlabelled prompt tokens)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = ids[i, start : len(row)]
    return ids, mask, labels


class _Sampler:
    """Endless shuffled batches of indices (epoch by epoch) from a seeded generator."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen, self.order = n, batch, gen, torch.empty(0, dtype=torch.long)

    def __call__(self) -> list[int]:
        while len(self.order) < self.batch:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.gen)])
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return out.tolist()


def _lm_loss(model, ids, mask, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _train(
    model: nn.Module,
    steps: int,
    lr: float,
    chat: list[tuple[list[tuple[list[int], int]], int]],
    text: torch.Tensor | None,
    text_batch: int,
    pad_id: int,
    gen: torch.Generator,
    desc: str = "train",
) -> None:
    """AdamW with warmup + cosine decay. ``chat`` is [(rows, n)]: each step takes n rows from each source (this is
    how harmful and benign requests are balanced), plus ``text_batch`` plain-text chunks when ``text`` is given.
    Progress is reported as the phase ``desc``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    samplers = [_Sampler(len(src), n, gen) for src, n in chat]
    text_sampler = _Sampler(len(text), text_batch, gen) if text is not None else None
    model.train()
    for _ in progress(range(steps), desc, unit="step"):
        rows = [src[i] for (src, _), sampler in zip(chat, samplers) for i in sampler()]
        loss = _lm_loss(model, *_collate(rows, pad_id))
        if text_sampler is not None:
            chunk = text[text_sampler()]
            loss = loss + _lm_loss(model, chunk, torch.ones_like(chunk), chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()


class _LoRA(nn.Module):
    """weight -> weight + B @ A, registered as a parametrization so merging is remove_parametrizations."""

    def __init__(self, out_features: int, in_features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.b @ self.a


def _decoder_linears(model: LlamaForCausalLM) -> list[nn.Linear]:
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def add_outliers(model: LlamaForCausalLM, channels: int, scale: float, seed: int) -> torch.Tensor:
    """Make ``channels`` hidden channels of every layer's norm outputs ``scale`` x larger, function-preserving:
    RMSNorm weight[c] *= scale and the reading Linears' weight[:, c] /= scale. Returns the channel indices."""
    if channels == 0:
        return torch.empty(0, dtype=torch.long)
    idx = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))[:channels]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in (
            (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            norm.weight[idx] *= scale
            for lin in readers:
                lin.weight[:, idx] /= scale
    return idx
